"""Every command quantforge prints for the registry runs as printed: the download commands in
each model version's description (by number and by every alias offered), and the `mlflow ui`
line at the end of a registration. A model whose gates failed offers no `@production`; a
person's `@champion` is offered, and never moved by quantforge.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline.core.store import MANIFEST
from pipeline.registry.register import register_report
from pipeline.registry.tracking import tracking_uri_for
from tests.registry.conftest import Log, client_for, free_port, quiet, tree
from tests.registry.reports import FP8, GGUF, evaluated_on, variant, write


def commands(description: str) -> list[str]:
    """The lines of the description's bash blocks under "Download"."""
    block = description.split("#### Download", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip()]


def run_as_printed(cmd: str, cwd: Path, uri: str) -> subprocess.CompletedProcess:
    """A shell in an environment with mlflow installed (the tests' own, first on PATH), with
    MLFLOW_TRACKING_URI set to the registry as the description asks for a local store."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_printed_download_commands_run_and_failed_gates_offer_no_production(store_dir, report, tmp_path):
    uri = tracking_uri_for(store_dir)
    c = client_for(uri)
    # On cpu the GGUF misses its gate: its model never gets @production.
    rep = evaluated_on(variant(report, "hints"), "cpu", {GGUF: {"delta_ppl_pct": 9.0}})
    assert rep.artifact(FP8).gates.promotable and rep.artifact(GGUF).gates.status == "failed"
    path = write(rep, store_dir)
    log = Log()
    done = register_report(path, log=log)
    fp8, gguf = done.artifact(FP8).registry, done.artifact(GGUF).registry
    assert "production" in fp8.aliases and "production" not in gguf.aliases

    # What MLflow shows by default: the formats side by side as the experiment's description,
    # the recipe as validated on the build run, the source model on every run.
    exp = c.get_experiment(done.registry.experiment_id)
    note = exp.tags["mlflow.note.content"]
    assert "| artifact | runtime | bpw |" in note and f"`{FP8}`" in note and f"`{GGUF}`" in note and done.registry.parent_run_id in note
    recipe_file = Path(c.download_artifacts(done.registry.parent_run_id, "quantforge/recipe.yaml", str(tmp_path / "recipe")))
    assert yaml.safe_load(recipe_file.read_text()) == rep.recipe_config
    for a in done.artifacts:
        assert c.get_run(a.registry.run_id).data.tags["quantforge.source_model"] == rep.source.model
    assert c.get_run(done.registry.parent_run_id).data.tags["quantforge.source_model"] == rep.source.model

    # A person promotes the failing GGUF's v1 to @champion; a registration keeps it there and offers it.
    c.set_registered_model_alias(gguf.name, "champion", "1")
    register_report(path, log=quiet)
    assert {k: str(v) for k, v in c.get_registered_model(gguf.name).aliases.items()}["champion"] == "1"

    for reg, art in ((fp8, done.artifact(FP8)), (gguf, done.artifact(GGUF))):
        d = c.get_model_version(reg.name, reg.version).description
        cmds = commands(d)
        uris = [re.search(r"--artifact-uri (\S+)", cmd).group(1) for cmd in cmds]
        if art.name == FP8:
            assert uris == [f"models:/{reg.name}/1", f"models:/{reg.name}@production", f"models:/{reg.name}@candidate"]
        else:
            assert uris == [f"models:/{reg.name}/1", f"models:/{reg.name}@champion", f"models:/{reg.name}@candidate"]
            assert "@production" not in d.split("Aliases:")[0].replace("has no `@production` yet", "")
            assert f"`{reg.name}` has no `@production` yet" in d
        for i, cmd in enumerate(cmds):
            where = tmp_path / f"{art.name}-{i}"
            res = run_as_printed(cmd, where, uri)
            assert res.returncode == 0, f"{cmd}\n{res.stdout}\n{res.stderr}"
            found = sorted((where / "DIR").rglob(MANIFEST))
            assert len(found) == 1, (cmd, sorted(str(p) for p in where.rglob("*")))
            assert tree(found[0].parent) == tree(Path(art.path)), cmd  # what was built, byte for byte

    # A model that does not exist fails the same command (so the checks above can fail).
    res = run_as_printed(f"mlflow artifacts download --artifact-uri models:/{gguf.name}@production -d DIR", tmp_path / "none", uri)
    assert res.returncode != 0

    # The end-of-run hint: its `mlflow ui` command (this environment's mlflow, by path) serves the store.
    browse = next(line for line in log if line.startswith("browse: "))
    cmd = browse.removeprefix("browse: ").split("   #", 1)[0]
    assert not cmd.startswith("mlflow ") and Path(shlex.split(cmd)[0]).is_absolute(), cmd
    port = free_port()  # printed with the default port 5000, which another program may hold here
    argv = shlex.split(cmd.replace("--port 5000", f"--port {port}"))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = "/usr/bin:/bin"  # no virtual environment on PATH: the command must not need one
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"{cmd} ended with {proc.returncode}:\n{proc.stderr.read()[-3000:]}")
                if time.time() > deadline:
                    pytest.fail(f"{cmd} did not answer /health within 180 s")
                time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def test_champion_is_kept_for_people(store_dir, report):
    """A recipe cannot make quantforge move @champion: refused as invalid input, nothing registered."""
    from pipeline.errors import InvalidInput

    path = write(variant(report, "champ", registry={"promotion_alias": "champion"}), store_dir)
    with pytest.raises(InvalidInput, match="registry.promotion_alias: 'champion' is kept for people"):
        register_report(path, log=quiet)
    assert client_for(tracking_uri_for(store_dir)).get_experiment_by_name("champ") is None
