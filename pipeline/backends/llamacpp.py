"""Locating llama.cpp: its one build (tools and shared libraries) and the Python binding.

``make setup`` (scripts/build_llama_cpp.sh) compiles llama.cpp once per version and
backend into ``~/.cache/quantforge/llama.cpp-<version>-<backend>/bin``: the tools
``llama-imatrix``, ``llama-perplexity``, ``llama-bench``, ``llama-quantize`` and the
shared libraries (libllama, libggml*) they link. The Python binding
(llama-cpp-python, built without its own copy) loads those same libraries through
its ``LLAMA_CPP_LIB_PATH`` override, which :func:`binding` sets; so the binding and
the tools always read and write the same formats (GGUF, imatrix) with the same
kernels. On a machine with an NVIDIA GPU a ``cuda<arch>`` build is preferred when
present. ``QUANTFORGE_LLAMA_CPP_BIN`` names another folder.

Loading a GGUF with the binding for a check happens in a child process (``python -m
pipeline.backends.llamacpp ...``): a llama.cpp crash (a segfault in a kernel, e.g.
a native build's AMX kernels on quantized types, llama.cpp issue 20824) then fails one
stage with a message instead of killing the whole build.
"""

from __future__ import annotations

import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version as dist_version
from pathlib import Path
from typing import Callable, Sequence

from pipeline.errors import StageFailed

BINDING_DIST = "llama_cpp_python"
DEFAULT_VERSION = "0.3.36"  # the version scripts/build_llama_cpp.sh builds
TOOLS = ("llama-imatrix", "llama-perplexity", "llama-bench", "llama-quantize")
BIN_ENV = "QUANTFORGE_LLAMA_CPP_BIN"
LIB_ENV = "LLAMA_CPP_LIB_PATH"  # llama-cpp-python's own override of where libllama is
CACHE_ENV = "QUANTFORGE_CACHE"
SETUP_HINT = "run `make setup` (scripts/build_llama_cpp.sh builds llama.cpp into ~/.cache/quantforge)"


class LlamaCppMissing(StageFailed):
    """The binding or a tool is not installed here."""


def binding_version() -> str | None:
    """Installed llama-cpp-python version, without importing it (cheap at plan time)."""
    try:
        return dist_version(BINDING_DIST)
    except PackageNotFoundError:
        return None


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "quantforge").expanduser()


def _nvidia_gpu_present() -> bool:
    from pipeline.backends.devices import nvidia_gpus

    return bool(nvidia_gpus())


def tools_dir() -> Path:
    """The llama.cpp build to use: $QUANTFORGE_LLAMA_CPP_BIN, else a CUDA build on a GPU machine, else the CPU build."""
    env = os.environ.get(BIN_ENV)
    if env:
        return Path(env).expanduser()
    v = binding_version() or DEFAULT_VERSION
    root = cache_dir()
    if _nvidia_gpu_present():
        for candidate in sorted(root.glob(f"llama.cpp-{v}-cuda*"), reverse=True):
            if (candidate / "bin" / "libllama.so").is_file():
                return candidate / "bin"
    return root / f"llama.cpp-{v}-cpu" / "bin"


def backend() -> str:
    """cpu or cuda<arch>: which llama.cpp build runs here (from the build's VERSION file)."""
    return _tools_version_file().get("backend", "cpu")


def offload_args() -> list[str]:
    """Tool arguments that put every layer on the GPU when this is a CUDA build (else none)."""
    return ["-ngl", "999"] if backend().startswith("cuda") else []


def binding():
    """The llama_cpp module, bound to the libraries of :func:`tools_dir` (imported on first use).

    Load it first in a process, and never in one that imports torch: with a CUDA build of
    llama.cpp, a process that had loaded numpy or torch before it segfaulted, and one that
    imported torch after it aborted (both seen on an H200; the CPU build is unaffected).
    quantforge therefore uses llama.cpp only in child processes made for it (this module's
    checks, eval workers of GGUF files), which load it before anything else.
    """
    if binding_version() is None:
        raise LlamaCppMissing(f"llama-cpp-python is not installed: {SETUP_HINT}")
    lib = tools_dir()
    if not (lib / "libllama.so").is_file() and not os.environ.get(LIB_ENV):
        raise LlamaCppMissing(f"llama.cpp's libraries are not in {lib}: {SETUP_HINT} (or set {BIN_ENV})")
    os.environ.setdefault(LIB_ENV, str(lib))
    import llama_cpp

    return llama_cpp


#: Modules that must never load in a process holding llama.cpp. With a CUDA build, pyarrow (and
#: pandas, datasets, which import it) aborted such a process with `free(): invalid pointer`
#: whichever loaded first, and torch after llama.cpp aborted it (both seen on an H200);
#: transformers imports torch.
FORBIDDEN_BESIDE = ("torch", "pyarrow", "pandas", "datasets", "transformers")


class _Forbid:
    """A meta-path finder that refuses the modules above: a clear ImportError at the import,
    instead of a native abort later (a library that imports one of them optionally goes on)."""

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in FORBIDDEN_BESIDE:
            raise ImportError(f"{name} must not be imported in a process that holds llama.cpp "
                              "(a CUDA build of llama.cpp cannot share a process with it)", name=name)
        return None


def isolate():
    """Make this process one that holds llama.cpp: load the binding first (numpy loaded before a
    CUDA build of it segfaulted at model load), then refuse :data:`FORBIDDEN_BESIDE` for the rest
    of the process. Called first by every process made for llama.cpp, on every build, so that a
    CPU-only test run fails the same way a CUDA machine would crash."""
    early = [m for m in (*FORBIDDEN_BESIDE, "numpy") if m in sys.modules]
    if early:
        raise RuntimeError(f"{', '.join(early)} already loaded: llama.cpp must be the first library of its process")
    module = binding()
    if not any(isinstance(f, _Forbid) for f in sys.meta_path):
        sys.meta_path.insert(0, _Forbid())
    return module


def loaded_forbidden() -> list[str]:
    """Which of :data:`FORBIDDEN_BESIDE` this process holds (a check for tests and workers)."""
    return sorted(m for m in FORBIDDEN_BESIDE if m in sys.modules)


def link_libraries() -> Path:
    """Link this build's shared libraries into the installed binding's own ``lib`` folder, so that
    a plain ``import llama_cpp`` (a model card's instructions, a user's script) finds them without
    ``LLAMA_CPP_LIB_PATH``: quantforge builds the binding without a copy of llama.cpp
    (scripts/build_llama_cpp.sh), and llama-cpp-python looks in its package's ``lib`` folder."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise LlamaCppMissing(f"llama-cpp-python is not installed: {SETUP_HINT}")
    src = tools_dir()
    libs = sorted(src.glob("lib*.so*"))
    if not any(p.name == "libllama.so" for p in libs):
        raise LlamaCppMissing(f"llama.cpp's libraries are not in {src}: {SETUP_HINT}")
    dest = Path(list(spec.submodule_search_locations)[0]) / "lib"
    dest.mkdir(exist_ok=True)
    for lib in libs:
        link = dest / lib.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(lib)
    return dest


def missing(tools: Sequence[str] = (), binding: bool = True) -> str | None:
    """Why llama.cpp cannot run here (None when everything asked for is present)."""
    problems = []
    if binding and binding_version() is None:
        problems.append("the Python binding llama-cpp-python is not installed")
    absent = [t for t in tools if not (tools_dir() / t).is_file()]
    if binding and not absent and not (tools_dir() / "libllama.so").is_file():
        absent.append("libllama.so")
    if absent:
        problems.append(f"{', '.join(absent)} not found in {tools_dir()}")
    if not problems:
        return None
    return f"llama.cpp: {'; '.join(problems)}: {SETUP_HINT} (or set {BIN_ENV})"


def tool(name: str) -> Path:
    """Path of one built tool; a clear error naming `make setup` when it is absent."""
    path = tools_dir() / name
    if not path.is_file():
        raise LlamaCppMissing(f"llama.cpp tool {name} not found in {tools_dir()}: {SETUP_HINT} (or set {BIN_ENV})")
    return path


def version() -> str:
    """llama.cpp version for cache keys and manifests: the vendored commit and the binding version.

    The tools folder's VERSION file (written by the build script) names the llama.cpp
    commit; a tools folder built from another binding version is named too, since the
    two then may disagree on formats.
    """
    binding = binding_version() or "missing"
    tools_version = _tools_version_file()
    commit = tools_version.get("llama.cpp", "unknown")
    built_from = tools_version.get("llama-cpp-python")
    out = f"{commit} (llama-cpp-python {binding})"
    if built_from and built_from != binding:
        out += f" tools from llama-cpp-python {built_from}"
    return out


def _tools_version_file() -> dict[str, str]:
    path = tools_dir().parent / "VERSION"
    if not path.is_file():
        return {}
    pairs = (line.split(" ", 1) for line in path.read_text().splitlines() if " " in line)
    return {k: v.strip() for k, v in pairs}


def source_dir() -> Path | None:
    """The llama.cpp sources the tools were built from, when the build cache still has them."""
    v = _tools_version_file().get("llama-cpp-python") or binding_version() or DEFAULT_VERSION
    path = tools_dir().parent.parent / "src" / f"llama_cpp_python-{v}" / "vendor" / "llama.cpp"
    return path if path.is_dir() else None


def vocab_pre_names() -> set[str]:
    """Values of tokenizer.ggml.pre that this llama.cpp accepts, read from its llama-vocab.cpp (empty if absent)."""
    import re

    src = source_dir()
    vocab = src / "src" / "llama-vocab.cpp" if src else None
    if vocab is None or not vocab.is_file():
        return set()
    return set(re.findall(r'tokenizer_pre == "([^"]+)"', vocab.read_text(encoding="utf-8", errors="replace")))


def run_tool(name: str, args: Sequence[str], log: Callable[[str], None], cwd: Path | None = None) -> str:
    """Run one tool (through :func:`pipeline.core.proc.run_tool`), return its combined output;
    ChildFailed with how it ended, its telling line and its output's tail on failure."""
    from pipeline.core.proc import run_tool as run_program

    cmd = [str(tool(name)), *map(str, args)]
    log(" ".join(cmd))
    return run_program(cmd, what=name, cwd=cwd)


# ---------------------------------------------------------------- binding checks
# Each check is a child process (see the module docstring) speaking pipeline.core.proc's protocol.


def _child(request: dict, what: str, timeout: float = 600) -> dict:
    if binding_version() is None:
        raise LlamaCppMissing(f"llama-cpp-python is not installed: {SETUP_HINT}")
    from pipeline.core.proc import call

    return call("pipeline.backends.llamacpp", request, what=what, timeout=timeout, env={LIB_ENV: str(tools_dir())})


def tokenize(gguf_file: Path, text: str) -> list[int]:
    """Token ids llama.cpp gives `text` with the GGUF's vocabulary (no BOS, special tokens as text)."""
    return _child({"command": "tokenize", "path": str(gguf_file), "text": text},
                  f"the llama.cpp check tokenizing with {gguf_file.name}")["ids"]


def greedy_decode(gguf_file: Path, prompt: str, n_tokens: int = 8) -> dict:
    """Load a GGUF with n_threads=1 and greedily decode `n_tokens` after `prompt`."""
    return _child({"command": "decode", "path": str(gguf_file), "prompt": prompt, "n_tokens": n_tokens},
                  f"the llama.cpp check decoding {gguf_file.name}")


def _load(path: str, **kw):
    return binding().Llama(model_path=path, verbose=False, **kw)


def _cmd_tokenize(path: str, text: str) -> dict:
    llm = _load(path, vocab_only=True)
    return {"ids": llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)}


def _cmd_decode(path: str, prompt: str, n_tokens: int) -> dict:
    n = int(n_tokens)
    gpu = -1 if backend().startswith("cuda") else 0
    llm = _load(path, n_threads=1, n_threads_batch=1, n_ctx=256, seed=0, n_gpu_layers=gpu)
    prompt_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
    ids: list[int] = []
    # top_k=1 is greedy: the highest logit wins, no randomness.
    for tok in llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):
        ids.append(int(tok))
        if len(ids) >= n:
            break
    text = llm.detokenize(ids).decode("utf-8", errors="replace")
    return {"prompt_ids": prompt_ids, "ids": ids, "text": text, "n_vocab": llm.n_vocab()}


def _serve(target: str, kwargs_json: str) -> int:
    """``serve MODULE:CLASS KWARGS_JSON``: the process made for llama.cpp that other processes
    call over a pipe (:mod:`pipeline.backends.pipe`); CLASS(**KWARGS) is built after isolate()."""
    import importlib

    from pipeline.backends.pipe import serve

    module, _, attr = target.partition(":")
    return serve(getattr(importlib.import_module(module), attr)(**json.loads(kwargs_json)))


def server(target: str, kwargs: dict, *, stderr=None, what: str):
    """A client of CLASS(**kwargs) living in a process made for llama.cpp (see :func:`_serve`)."""
    from pipeline.backends.pipe import Client

    return Client("pipeline.backends.llamacpp", ["serve", target, json.dumps(kwargs)],
                  env={LIB_ENV: str(tools_dir())}, stderr=stderr, what=what)


def _handle(request: dict) -> dict:
    """A check's child: llama.cpp first (:func:`isolate`), then the command of the request."""
    isolate()  # before anything else loads numpy (see binding)
    commands = {"tokenize": _cmd_tokenize, "decode": _cmd_decode}
    args = {k: v for k, v in request.items() if k != "command"}
    return commands[request["command"]](**args)


def main(argv: list[str]) -> int:
    from pipeline.core.proc import CHILD_FLAG, die_with_parent, serve

    if argv[:1] == [CHILD_FLAG]:
        return serve(_handle, argv)
    die_with_parent()
    if argv[:1] == ["link-libraries"]:
        print(f"llama.cpp's libraries linked into {link_libraries()}")
        return 0
    if argv[:1] == ["serve"] and len(argv) == 3:
        isolate()  # before anything else loads numpy (see binding)
        return _serve(argv[1], argv[2])
    print(f"usage: python -m pipeline.backends.llamacpp {{link-libraries,serve MODULE:CLASS KWARGS_JSON,{CHILD_FLAG} REQUEST RESPONSE}}",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
