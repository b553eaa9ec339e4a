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
from dataclasses import dataclass
from typing import Callable, Iterator

from pipeline.core.proc import pid_alive

MANIFEST = "manifest.json"
KEY_LEN = 24


# Digests of files this process has read, keyed by what changes when a file does: device, inode,
# size, modification and status-change times (ctime cannot be set back by a user, so an edit that
# restores mtime still misses the cache). Not by path: the store renames a finished temp folder into
# place, and a path key would read every new file twice; hard links (a budget target's winner) share
# an inode and so a digest. A run reads the same files several times (a source's fingerprint and its
# manifest; an artifact's hit check, tamper check and registration): each is hashed once. HASHED
# counts the files actually read, for benchmarks and tests.
_DIGESTS: dict[tuple, str] = {}
HASHED = {"files": 0, "bytes": 0, "cached": 0}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _DIGESTS:
        HASHED["cached"] += 1
        return _DIGESTS[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    HASHED["files"] += 1
    HASHED["bytes"] += st.st_size
    _DIGESTS[key] = digest = h.hexdigest()
    return digest


def file_table(root: Path) -> list[dict]:
    """Every file under root (but the manifest) with its size and sha256, sorted by path."""
    rows = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rows.append({"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)})
    return rows


def stored_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder but its manifest, by stat (no hashing)."""
    p = Path(path)
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and f.name != MANIFEST)


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

    def run_once(self, kind: str, key: str, produce: Callable[[Path], dict | None], *,
                 accept: Callable[[dict], bool] | None = None, expect_content: str | None = None) -> "Entry":
        """The output stored under (kind, key): found, or produced exactly once.

        This is the store's one run-once mechanism, used by build stages, eval
        results, the bandwidth measurement and pull: look up; take the key's lock;
        look up again (another process may have finished it meanwhile); let
        ``produce(tmp)`` write into a fresh temp folder and return the manifest's
        fields (``result``, ``params``, ...); hash every file, write the manifest
        last and rename the folder into place. If ``produce`` raises (or the process
        dies) nothing is stored: the temp folder is removed (or cleaned by the next
        run) and the exception propagates.

        ``accept(manifest)`` may refuse a stored entry (pull refuses one whose bytes
        differ from the registered ones): it is then produced again and replaced.
        ``expect_content`` refuses to commit files whose content hash differs.
        """
        found = self.get(kind, key)
        if found is not None and (accept is None or accept(found)):
            return Entry(kind, key, self.path_for(kind, key), found, hit=True)
        with self.lock(key):
            found = self.get(kind, key)
            if found is not None and (accept is None or accept(found)):
                return Entry(kind, key, self.path_for(kind, key), found, hit=True)
            tmp = self.new_tmp(kind, key)
            try:
                fields = produce(tmp) or {}
                path, manifest = self.commit(tmp, kind, key, fields, expect_content=expect_content)
            except BaseException:  # KeyboardInterrupt and SIGTERM too: leave nothing half-written
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return Entry(kind, key, path, manifest, hit=False)

    def commit(self, tmp: Path, kind: str, key: str, manifest: dict, expect_content: str | None = None) -> tuple[Path, dict]:
        """Hash the files, write the manifest last, and rename the folder into place (call under the key's lock)."""
        normalize_modes(tmp)
        files = file_table(tmp)
        if expect_content is not None and content_hash(files) != expect_content:
            raise StoreError(f"{kind}/{key[:KEY_LEN]}: the files hash to {content_hash(files)[:12]}, expected {expect_content[:12]}; nothing was stored")
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
        if final.exists():
            # A leftover without a valid manifest, or an entry `accept` refused: move it
            # aside first, so the key never names a half-replaced folder.
            aside = Path(tempfile.mkdtemp(prefix=f"replaced-{key[:12]}-{os.getpid()}-", dir=self.root / ".tmp"))
            os.rename(final, aside / "old")
            os.rename(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(final.parent)
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
            if not pid_alive(pid):
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
        return removed

    def verify(self, kind: str, key: str) -> list[str]:
        """Files whose size or hash no longer matches the manifest (empty when all do)."""
        manifest = self.get(kind, key)
        if manifest is None:
            return ["<manifest missing>"]
        return verify_folder(self.path_for(kind, key), manifest)


def verify_folder(root: Path, manifest: dict, content_sha256: str | None = None) -> list[str]:
    """The one manifest verifier: what differs between a folder and its manifest's file table.

    Names each file that is missing, has another size or another sha256, each file the
    manifest does not list, a file table that does not hash to the manifest's
    content_sha256, and, given the ``content_sha256`` a build recorded for the folder, a
    manifest that is not that build's.
    """
    problems = []
    rows = manifest.get("files") or []
    listed = set()
    for row in rows:
        listed.add(row["path"])
        p = root / row["path"]
        if not p.is_file():
            problems.append(f"{row['path']} missing")
        elif p.stat().st_size != row["bytes"]:
            problems.append(f"{row['path']} has {p.stat().st_size} bytes, the manifest says {row['bytes']}")
        elif sha256_file(p) != row["sha256"]:
            problems.append(f"{row['path']} changed since it was stored (sha256 differs)")
    extra = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST
                   and p.relative_to(root).as_posix() not in listed)
    if extra:
        problems.append(f"files not in the manifest: {', '.join(extra[:5])}")
    if manifest.get("content_sha256") and content_hash(rows) != manifest["content_sha256"]:
        problems.append("the manifest's file table does not hash to its content_sha256")
    if content_sha256 and manifest.get("content_sha256") != content_sha256:
        problems.append("its manifest is not the one the build recorded")
    return problems


def normalize_modes(root: Path) -> None:
    """Ordinary permissions (0755 folders, 0644 files, modulo the umask) on everything under root.

    The temp folder comes from mkdtemp (0700) and some writers go through mkstemp (0600): renamed
    into the store as they are, artifacts would be unreadable to the other users and jobs a shared
    artifacts dir serves. Executable files stay executable.
    """
    mask = os.umask(0)
    os.umask(mask)
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        if p.is_dir():
            p.chmod(0o777 & ~mask)
        elif p.is_file():
            p.chmod((0o777 if p.stat().st_mode & 0o111 else 0o666) & ~mask)


class StoreError(Exception):
    pass


@dataclass
class Entry:
    """One stored output, found (hit) or just produced."""

    kind: str
    key: str
    path: Path
    manifest: dict
    hit: bool

    @property
    def result(self) -> dict:
        return self.manifest.get("result", {})


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (a crash right after must not lose it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


