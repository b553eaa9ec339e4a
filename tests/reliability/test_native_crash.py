"""A child process killed from native code (SIGABRT after glibc's "free(): invalid pointer", as
the GPU eval workers died when pyarrow and llama.cpp's CUDA build shared a process) must say
how it died, the native error line, and where its log is.

The crash is real: the test hook (``pipeline.core.proc.ABORT_ENV``) makes the child write the
line from C and call libc ``abort()``; faulthandler, on in every child, then prints Python's
"Fatal Python error: Aborted" and the stack, as it would for a crash inside a library.
"""

from __future__ import annotations

import signal

import pytest

from pipeline.core.proc import ABORT_ENV, ABORT_LINE, ChildFailed, call, first_error_line
from pipeline.core.report import read_report, report_path
from tests.reliability.helpers import NAME, cli, recipe_text, run


def test_a_child_aborted_from_native_code_reports_signal_native_line_and_python_frame(tmp_path):
    with pytest.raises(ChildFailed) as err:
        call("evals.worker", {"runtime": "llama_cpp"}, what="the llama_cpp worker", env={ABORT_ENV: "llama_cpp-job"},
             tag="llama_cpp-job", timeout=120)
    exc = err.value
    output = exc.output
    assert exc.returncode == -signal.SIGABRT and exc.error is None, output
    # What the process printed: the native line first, then faulthandler's report with a stack.
    assert ABORT_LINE in output and "Fatal Python error: Aborted" in output, output
    assert output.index(ABORT_LINE) < output.index("Fatal Python error"), output
    assert 'File "' in output.split("Fatal Python error", 1)[1], output  # faulthandler was on
    # The native line, not Python's "Fatal Python error: Aborted", is the one that tells.
    assert first_error_line(output, exc.returncode) == ABORT_LINE
    first, _, rest = str(exc).partition("\n")
    assert first == f"the llama_cpp worker ended with killed by SIGABRT (a native library aborted): {ABORT_LINE}"
    assert rest.startswith('in Python at File "') and "proc.py" in rest, str(exc)


def test_hook_fires_only_in_the_matching_child():
    # no part to run: an empty result
    assert call("evals.worker", {"runtime": "transformers"}, what="the worker", env={ABORT_ENV: "no-such-command-line"},
                timeout=120) == {}


def test_a_child_error_comes_back_as_the_same_exception_with_its_message():
    """An exception in the child is a structured error: same exception type, the child's own message,
    and where in Python it was raised (a second line: the runner then names the stage log)."""
    with pytest.raises(ChildFailed) as err:
        call("pipeline.sources.gguf", {}, what="the tokenizer check", timeout=120)  # a request without its file
    first, _, rest = str(err.value).partition("\n")
    assert first == "the tokenizer check failed: KeyError: 'gguf'", str(err.value)
    assert rest.startswith('in Python at File "') and "gguf.py" in rest, str(err.value)
    assert err.value.returncode == 1 and err.value.error["type"] == "KeyError"
    assert "Traceback" in err.value.output  # the child's traceback went to its log


@pytest.mark.slow
def test_eval_worker_killed_by_sigabrt_names_its_log_and_native_line(tmp_path, mini_model, monkeypatch):
    """The GGUF's llama.cpp worker aborts; the source's worker (transformers) is untouched. The
    eval table and report.json say SIGABRT, the native line and the stage log, which holds
    faulthandler's Python stack."""
    recipe = tmp_path / "rel.yaml"
    recipe.write_text(recipe_text(mini_model, "gguf"))
    artifacts = (tmp_path / "artifacts").resolve()
    built = run(cli("build", recipe, "--artifacts-dir", artifacts), tmp_path / "build.log")
    assert built.returncode == 0, built.stdout[-3000:]

    with monkeypatch.context() as m:
        m.setenv(ABORT_ENV, "llama_cpp-job")  # the request file of the llama.cpp worker (evals.stages._worker)
        ev = run(cli("eval", recipe, "--artifacts-dir", artifacts, "--device", "cpu"), tmp_path / "eval.log")
    assert ev.returncode == 1, ev.stdout[-3000:]
    assert "Traceback" not in ev.stdout, ev.stdout[-3000:]

    report = read_report(report_path(artifacts, NAME))
    assert report.baseline["cpu"].status == "done", report.baseline["cpu"].reason
    (gguf,) = report.built()
    entry = gguf.evals["cpu"]
    assert entry.status == "failed"
    log_file = artifacts / NAME / "logs" / f"eval__cpu__{gguf.name}.log"
    assert log_file.is_file(), sorted(p.name for p in (artifacts / NAME / "logs").iterdir())
    assert "killed by SIGABRT" in entry.reason and ABORT_LINE in entry.reason and str(log_file) in entry.reason, entry.reason
    log = log_file.read_text()
    assert ABORT_LINE in log and "Fatal Python error: Aborted" in log and "Current thread" in log, log[-3000:]

    # The eval table a user reads (`quantforge report`) names both (the note under the table may wrap anywhere).
    shown = run(cli("report", recipe, "--artifacts-dir", artifacts), tmp_path / "report.log")
    assert shown.returncode == 0, shown.stdout[-3000:]
    flat = "".join(shown.stdout.split())
    assert "".join(f"worker ended with killed by SIGABRT (a native library aborted): {ABORT_LINE} (full log: {log_file})".split()) in flat, shown.stdout
    assert flat.index(f"{gguf.name}:failed:") < flat.index("SIGABRT"), shown.stdout
