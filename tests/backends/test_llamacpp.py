"""quantforge's llama.cpp build as users meet it outside quantforge (skipped without llama.cpp)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.backends import llamacpp

pytestmark = pytest.mark.skipif(llamacpp.missing() is not None, reason=str(llamacpp.missing()))


def test_a_plain_import_of_the_binding_finds_the_build(tmp_path):
    """A model card's `pip install llama-cpp-python` instructions end in `import llama_cpp`: in the
    project's environment that must load quantforge's one build, with no variable set."""
    env = {k: v for k, v in os.environ.items() if k not in (llamacpp.LIB_ENV, "PYTHONPATH")}
    proc = subprocess.run([sys.executable, "-c", "import llama_cpp, os; print(os.path.realpath(llama_cpp.llama_cpp._lib._name))"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.path.realpath(proc.stdout.strip()) == os.path.realpath(llamacpp.tools_dir() / "libllama.so")
