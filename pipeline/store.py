"""Content-addressed artifact store: temp folder, manifest, atomic rename.

Layout under the artifacts dir::

    store/<stage kind>/<key[:24]>/       a finished output, with manifest.json
    store/.tmp/<kind>-<key[:12]>-<pid>-<random>/   work in progress
    store/.locks/<key[:24]>.lock         held while a stage builds

A folder without a manifest is never treated as finished; the manifest is the
last thing written before the rename, and the rename is atomic on one
filesystem. A killed build leaves only a temp folder, removed by the next run.
Two builds of the same key at once serialize on the lock; the second finds the
first's output and does no work.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

MANIFEST = "manifest.json"
KEY_LEN = 24


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_table(root: Path) -> list[dict]:
    """Every file under root (but the manifest) with its size and sha256, sorted by path."""
    rows = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rows.append({"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)})
    return rows


def content_hash(files: list[dict]) -> str:
    """One hash over a file table: equal artifacts have equal content hashes."""
    h = hashlib.sha256()
    for row in files:
        h.update(f"{row['path']}\0{row['sha256']}\n".encode())
    return h.hexdigest()


class Store:
    def __init__(self, artifacts_dir: Path):
        # Absolute: paths end up in report.json, which other commands read from elsewhere.
        self.root = Path(artifacts_dir).resolve() / "store"

    def path_for(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:KEY_LEN]

    def get(self, kind: str, key: str) -> dict | None:
        """The manifest of a finished output, or None."""
        manifest = self.path_for(kind, key) / MANIFEST
        if not manifest.is_file():
            return None
        try:
            data = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return data if data.get("key") == key else None

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{key[:KEY_LEN]}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def new_tmp(self, kind: str, key: str) -> Path:
        tmp_root = self.root / ".tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{kind}-{key[:12]}-{os.getpid()}-", dir=tmp_root))

    def commit(self, tmp: Path, kind: str, key: str, manifest: dict) -> tuple[Path, dict]:
        """Hash the files, write the manifest last, and rename the folder into place."""
        files = file_table(tmp)
        manifest = {
            **manifest,
            "key": key,
            "kind": kind,
            "files": files,
            "bytes": sum(f["bytes"] for f in files),
            "content_sha256": content_hash(files),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        final = self.path_for(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # an unfinished leftover without a valid manifest
            shutil.rmtree(final)
        os.rename(tmp, final)
        return final, manifest

    def clean_stale_tmp(self) -> int:
        """Remove temp folders of builds that are no longer running."""
        tmp_root = self.root / ".tmp"
        if not tmp_root.is_dir():
            return 0
        removed = 0
        for d in tmp_root.iterdir():
            parts = d.name.rsplit("-", 2)
            try:
                pid = int(parts[-2])
            except (IndexError, ValueError):
                continue
            if not _pid_alive(pid):
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
        return removed

    def verify(self, kind: str, key: str) -> list[str]:
        """Files whose size or hash no longer matches the manifest."""
        manifest = self.get(kind, key)
        if manifest is None:
            return ["<manifest missing>"]
        root = self.path_for(kind, key)
        bad = []
        for row in manifest["files"]:
            p = root / row["path"]
            if not p.is_file() or p.stat().st_size != row["bytes"] or sha256_file(p) != row["sha256"]:
                bad.append(row["path"])
        return bad


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
