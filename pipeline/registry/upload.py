"""Registration's uploads: an artifact's files (or a reference to them above registry.upload_max_mb)
put under its run, then downloaded back and checked file by file against the manifest.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from pipeline.core.report import ArtifactReport
from pipeline.core.store import MANIFEST, sha256_file, verify_folder
from pipeline.errors import StageFailed
from pipeline.registry.tracking import (
    TAG_PREFIX,
)
from pipeline.registry.writes import ARTIFACT_DIR, REF_FILE


class Uploading:
    """Upload and verify (mixed into Registration)."""

    def upload(self, run, a: ArtifactReport, folder: Path) -> bool:
        """Put the artifact files (or a reference) under <run>/artifact; returns True for a reference."""
        limit_mb = float(self.spec.upload_max_mb)
        size = a.bytes if a.bytes is not None else sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        if size > limit_mb * 2**20:
            with tempfile.TemporaryDirectory(prefix="qf-ref-") as tmp:
                stub = Path(tmp)
                shutil.copy2(folder / MANIFEST, stub / MANIFEST)
                if (folder / "README.md").is_file():
                    shutil.copy2(folder / "README.md", stub / "README.md")
                (stub / REF_FILE).write_text(json.dumps({
                    "store_path": str(folder), "bytes": size, "content_sha256": a.content_sha256,
                    "reason": f"{size / 2**20:.3g} MB is above registry.upload_max_mb={limit_mb:g}; files stay in the store",
                }, indent=2))
                self.client.log_artifacts(run.info.run_id, str(stub), ARTIFACT_DIR)
            ref = f"{folder} ({size / 2**20:.3g} MB > upload_max_mb {limit_mb:g}): manifest and reference uploaded, files not"
            self._tags(run.info.run_id, {}, {f"{TAG_PREFIX}artifact_ref": ref})
            run.data.tags[f"{TAG_PREFIX}artifact_ref"] = ref
            self.counts["uploads"] += 1
            self.log(f"register: {a.name}: {size / 2**20:.3g} MB over upload_max_mb={limit_mb:g}; logged a reference to {folder}")
            return True
        self.log(f"register: {a.name}: uploading {size / 2**20:.2f} MB")
        self.client.log_artifacts(run.info.run_id, str(folder), ARTIFACT_DIR)
        self.counts["uploads"] += 1
        return False

    def verify(self, run, a: ArtifactReport, folder: Path, manifest: dict, referenced: bool) -> None:
        """Download <run>/artifact back and compare every file's sha256 with the manifest (MLflow issue 18581)."""
        import mlflow.artifacts

        source = f"{run.info.artifact_uri}/{ARTIFACT_DIR}"
        # Download beside the report, not in /tmp: artifacts can be GBs and /tmp may be small.
        with tempfile.TemporaryDirectory(prefix=".verify-", dir=self.report_path.parent) as tmp:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=self.uri))
            problems = []
            if not (got / MANIFEST).is_file() or sha256_file(got / MANIFEST) != sha256_file(folder / MANIFEST):
                problems.append(f"{MANIFEST} missing or different")
            if referenced:
                have = sorted(p.name for p in got.iterdir())
                want = sorted({MANIFEST, REF_FILE} | ({"README.md"} if (folder / "README.md").is_file() else set()))
                if have != want:
                    problems.append(f"the reference holds {have}, expected {want}")
                elif (got / "README.md").is_file() and sha256_file(got / "README.md") != sha256_file(folder / "README.md"):
                    problems.append("README.md did not arrive intact")
            else:
                problems += [p.replace("changed since it was stored (sha256 differs)", "sha256 differs from the manifest")
                             for p in verify_folder(got, manifest)]
        if problems:
            raise StageFailed(f"{a.name}: the uploaded artifact at {source} does not match its manifest: " + "; ".join(problems[:10])
                              + "; no model version was created")
        self.log(f"register: {a.name}: download verified ({len(manifest.get('files', []))} files match the manifest)")

    # ------------------------------------------------------ convergence
