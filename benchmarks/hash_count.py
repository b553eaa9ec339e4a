"""How many times a cold run reads each stored byte to hash it: SHA-256 bytes over the store's bytes.

    python benchmarks/hash_count.py [RECIPE] [--json OUT] [--repo CHECKOUT]

Runs ``quantforge run RECIPE`` (build, eval, register into a fresh local MLflow) on an empty
artifacts folder, with every Python process it starts counting the bytes it feeds to SHA-256
(``hashlib.sha256`` and ``hashlib.new("sha256")`` wrapped by a ``sitecustomize`` on
``PYTHONPATH``: the eval workers, the verifiers and the converters count too). It prints the
bytes hashed, the bytes the store holds after the run, and their ratio: 1.0 would be every
stored file read once to hash it. Small hashes (cache keys of a few hundred bytes) are in the
total and change nothing at this scale.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SITECUSTOMIZE = '''
import atexit, hashlib, os, sys
_LOG = os.environ["QF_HASH_LOG"]
_count = [0]
_sha256, _new = hashlib.sha256, hashlib.new


class _Counted:
    def __init__(self, inner):
        self._inner = inner

    def update(self, data):
        _count[0] += len(memoryview(data).cast("B"))
        self._inner.update(data)

    def copy(self):
        return _Counted(self._inner.copy())

    def __getattr__(self, name):
        return getattr(self._inner, name)


def sha256(data=b"", **kw):
    h = _Counted(_sha256(**kw))
    if data:
        h.update(data)
    return h


def new(name, data=b"", **kw):
    if str(name).lower().replace("-", "") == "sha256":
        return sha256(data, **kw)
    return _new(name, data, **kw)


hashlib.sha256, hashlib.new = sha256, new


@atexit.register
def _write():
    if _count[0]:
        with open(_LOG, "a") as f:
            f.write(f"{os.getpid()} {_count[0]} {' '.join(sys.argv[:2])[-80:]}\\n")
'''


def store_bytes(artifacts: Path) -> int:
    return sum(p.stat().st_size for p in (artifacts / "store").rglob("*") if p.is_file() and not p.is_symlink())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", nargs="?", default="recipes/tiny.yaml")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-register", action="store_true", help="build and eval only (registration re-reads its uploaded copies)")
    ap.add_argument("--repo", type=Path, default=REPO, help="the quantforge checkout to run (another commit's, to compare)")
    a = ap.parse_args(argv)
    repo = a.repo.resolve()
    with tempfile.TemporaryDirectory(prefix="qf-hash-") as tmp:
        tmp = Path(tmp)
        (tmp / "site").mkdir()
        (tmp / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        log = tmp / "hashes.log"
        env = {**os.environ, "QF_HASH_LOG": str(log),
               "PYTHONPATH": os.pathsep.join([str(tmp / "site"), str(repo), os.environ.get("PYTHONPATH", "")])}
        artifacts = tmp / "artifacts"
        t0 = time.perf_counter()
        register = ["--no-register"] if a.no_register else ["--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}"]
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli.main", "run", a.recipe, "--artifacts-dir", str(artifacts),
                               *register], cwd=repo, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode not in (0, 3):  # 3: an artifact failed its gate, which hashing does not care about
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            return proc.returncode
        rows = [line.split(maxsplit=2) for line in log.read_text().splitlines()] if log.exists() else []
        per_process = [int(r[1]) for r in rows]
        by_command: dict[str, int] = {}
        for r in rows:
            by_command[r[2] if len(r) > 2 else "?"] = by_command.get(r[2] if len(r) > 2 else "?", 0) + int(r[1])
        hashed, stored = sum(per_process), store_bytes(artifacts)
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {"recipe": a.recipe, "commit": commit, "registered": not a.no_register, "exit": proc.returncode, "seconds": round(seconds, 1), "processes_hashing": len(per_process),
           "sha256_bytes": hashed, "store_bytes": stored, "reads_per_stored_byte": round(hashed / stored, 2) if stored else None,
           "sha256_bytes_by_process": dict(sorted(by_command.items(), key=lambda kv: -kv[1]))}
    print(json.dumps(out, indent=2))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
