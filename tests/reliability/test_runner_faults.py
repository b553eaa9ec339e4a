"""Fast checks of the runner's fault handling (the end-to-end tests beside this one run the
real CLI): a stored artifact altered after its build is built again, and a full disk is
recognised whatever library raised it."""

from __future__ import annotations

import errno

import pytest

from pipeline.core.runner import disk_full, execute
from pipeline.core.stage import ArtifactInfo, Stage
from pipeline.core.store import Store


def _stage(artifact: bool) -> Stage:
    def run(ctx):
        (ctx.out_dir / "weights.bin").write_bytes(b"w" * 64)
        return {}

    info = ArtifactInfo(name="a", target="a", kind="test") if artifact else None
    return Stage(name="a/build", kind="test-art", version="1", params={}, run=run, artifact=info)


def test_an_altered_artifact_is_built_again_and_replaced(tmp_path):
    logs: list[str] = []
    first = execute([_stage(True)], tmp_path, log=logs.append)["a/build"]
    weights = first.output.path / "weights.bin"
    weights.write_bytes(b"x" * 64)  # same size, other bytes
    again = execute([_stage(True)], tmp_path, log=logs.append)["a/build"]
    assert again.status == "built"
    assert any("weights.bin changed since it was stored" in m and "building it again" in m for m in logs)
    assert weights.read_bytes() == b"w" * 64
    assert Store(tmp_path).verify("test-art", again.key) == []
    assert not list((Store(tmp_path).root / ".tmp").iterdir()), "the replaced folder is removed"
    assert execute([_stage(True)], tmp_path, log=logs.append)["a/build"].status == "hit"


def test_an_intermediate_output_is_trusted_on_a_hit(tmp_path):
    """Only artifacts are hashed on a hit (what eval and register check, what users ship):
    intermediate outputs (a converted GGUF, calibration data) are not, to keep cached
    builds of large models fast."""
    first = execute([_stage(False)], tmp_path, log=lambda m: None)["a/build"]
    (first.output.path / "weights.bin").write_bytes(b"x" * 64)
    assert execute([_stage(False)], tmp_path, log=lambda m: None)["a/build"].status == "hit"


class SafetensorError(Exception):
    pass


@pytest.mark.parametrize("exc, full", [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), True),
    (RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0; No space left on device"), True),
    (OSError(errno.EACCES, "Permission denied"), False),
    (RuntimeError("quantizer exploded"), False),
], ids=["ENOSPC", "EDQUOT", "safetensors", "torch.save", "EACCES", "other"])
def test_disk_full_is_recognised_from_any_library(exc, full):
    assert disk_full(exc) is full


def test_disk_full_is_found_in_the_exception_chain():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert disk_full(outer)
