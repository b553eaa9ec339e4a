"""The connection to MLflow: which tracking URI, is it reachable, and the rules of its API.

Everything here is shared by the registration and pull jobs. mlflow is imported
inside functions only, so ``quantforge --help`` stays fast.

What this module knows about MLflow 3.17 (read in its sources):

* limits on keys and values (``mlflow/utils/validation.py``): params 6000 chars, tags
  8000, keys 250; ``log_batch`` takes 100 params+tags and 1000 metrics;
* a quick reachability check must not go through MLflow's HTTP retries (7 with
  backoff by default: minutes against a dead server);
* a write that loses a race on a unique key of the SQL store (an alias or version tag
  set by two jobs at once: ``session.merge`` is a SELECT then an INSERT) comes back
  as ``BAD_REQUEST ... UNIQUE constraint failed`` (``mlflow/store/db/utils.py``
  turns every ``SQLAlchemyError`` but ``OperationalError`` into BAD_REQUEST, and the
  client does not retry 4xx). Repeating the same upsert then finds the row and
  updates it: :func:`retry_races` does that.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

TAG_PREFIX = "quantforge."
# MLflow 3.17 limits (mlflow/utils/validation.py); values over them are rejected.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_BATCH_PARAMS_TAGS = 100
MAX_BATCH_METRICS = 1000
# Quick reachability check: fail in seconds, not after MLflow's default 7 retries with backoff.
CHECK_RETRIES = "0"
CHECK_TIMEOUT_S = "5"
#: The experiment tag MLflow's UI reads to pick its layout; "custom_model_development" is the
#: model-training view (runs table with metric columns, charts), not the GenAI/traces view.
#: Values: the ExperimentKind enum in mlflow/server/js/build/static/js/main.*.js (3.17).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

_BAD_KEY_CHARS = re.compile(r"[^\w./\- :]")
# How SQL stores word a lost race on a unique key (SQLite, PostgreSQL, MySQL, MSSQL).
_UNIQUE_RACE = re.compile(r"UNIQUE constraint failed|IntegrityError|duplicate key value|Duplicate entry|Violation of PRIMARY KEY", re.I)

T = TypeVar("T")


# ------------------------------------------------------------------ URIs
def tracking_uri_for(artifacts_dir: Path | str, explicit: str | None = None) -> str:
    """The tracking URI to use: explicit argument, else $MLFLOW_TRACKING_URI, else a local SQLite store.

    The local store is ``<artifacts_dir>/mlflow/mlflow.db`` with artifacts under
    ``<artifacts_dir>/mlflow/artifacts`` (also what ``scripts/mlflow_server.sh start
    <artifacts_dir>/mlflow`` serves).
    """
    if explicit:
        return explicit
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    db = (Path(artifacts_dir) / "mlflow" / "mlflow.db").resolve()
    return f"sqlite:///{db}"


def local_db(tracking_uri: str) -> Path | None:
    """The SQLite file of a local store; None for servers."""
    return Path(tracking_uri[len("sqlite:///"):]) if tracking_uri.startswith("sqlite:///") else None


def local_artifact_root(tracking_uri: str) -> Path | None:
    """Artifact root beside a SQLite store (``<db folder>/artifacts``); None for servers, which choose their own."""
    db = local_db(tracking_uri)
    return None if db is None else db.parent / "artifacts"


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def mlflow_command() -> str:
    """The mlflow CLI of the Python running quantforge, as a shell word that runs as printed: the
    script beside the interpreter (a virtual environment's bin/ is often not on PATH), else
    ``python -m mlflow`` with that interpreter."""
    import shlex
    import sys

    script = Path(sys.executable).parent / "mlflow"
    if script.is_file() and os.access(script, os.X_OK):
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m mlflow"


def ui_hint(tracking_uri: str, experiment_id: str | None, run_ids: list[str], port: int = 5000) -> list[str]:
    """Lines that tell a user how to look: the exact `mlflow ui` command for a local store (this
    environment's mlflow, by path) or the server's URL, the experiment's chart view, and a
    compare page of the runs."""
    if is_http(tracking_uri):
        base = tracking_uri.rstrip("/")
        lines = [f"browse: {base}"]
    else:
        db = local_db(tracking_uri)
        root = local_artifact_root(tracking_uri)
        base = f"http://127.0.0.1:{port}"
        target = f"sqlite:///{db}" if db else tracking_uri
        lines = [f"browse: {mlflow_command()} ui --backend-store-uri {target}"
                 + (f" --default-artifact-root {root}" if root else "") + f" --port {port}   # then open {base}"]
    if experiment_id:
        lines.append(f"charts: {base}/#/experiments/{experiment_id}/runs?compareRunsMode=CHART")
        if run_ids:
            runs = json.dumps(list(run_ids), separators=(",", ":"))
            lines.append(f"compare: {base}/#/compare-runs?runs={runs}&experiments={json.dumps([str(experiment_id)], separators=(',', ':'))}")
    return lines


# ------------------------------------------------------------ the client
#: Test hook: pause at random before each call a job makes to the tracking server, up to this
#: many seconds, and one call in STALL_ONE_IN up to STALL_TIMES as long (a job descheduled on a
#: loaded machine: the stalls are what lets a parallel job act between two calls of one step).
#: So a test can make parallel jobs interleave where on a quiet machine they rarely do.
#: Read here only; unset (the default) changes nothing.
DELAY_ENV = "QUANTFORGE_TEST_REGISTRY_DELAY_S"
STALL_ONE_IN = 10
STALL_TIMES = 10


class _Delayed:
    """The real client, with a random pause before each of its calls (see DELAY_ENV)."""

    def __init__(self, real: Any, most_s: float):
        self._real, self._most_s = real, most_s

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            stall = random.randrange(STALL_ONE_IN) == 0
            time.sleep(random.uniform(0.0, self._most_s * (STALL_TIMES if stall else 1)))
            return attr(*args, **kwargs)

        return call


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    real = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    delay = os.environ.get(DELAY_ENV, "").strip()
    if delay:
        try:
            most_s = float(delay)
        except ValueError:
            from pipeline.errors import InvalidInput

            raise InvalidInput(f"${DELAY_ENV}={delay!r} is not a number of seconds") from None
        if most_s > 0:
            return _Delayed(real, most_s)
    return real


@contextlib.contextmanager
def env(**values: str) -> Iterator[None]:
    """Set environment variables for a block (MLflow reads its HTTP settings per request)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


#: Retries of one request when the server errs or goes away: MLflow's default (7, backoff
#: factor 2: about 4 minutes) is sized for rate-limited hosted servers; a quantforge job
#: against its own server should say within ~30 s that the server went away (4 retries:
#: 2+4+8+16 s), and still ride out a restart or a busy SQLite store (503). The user's own
#: MLFLOW_HTTP_REQUEST_MAX_RETRIES wins.
JOB_RETRIES = "4"


def quiet() -> contextlib.AbstractContextManager:
    """The environment a job talks to MLflow in: no run URLs printed to stdout, no progress bars
    (our log says what happened), and retries sized for a job (see JOB_RETRIES)."""
    return env(MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT="true", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
               MLFLOW_HTTP_REQUEST_MAX_RETRIES=os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", JOB_RETRIES))


def check_reachable(mlflow_client) -> None:
    """One cheap request with no retries and a short timeout; raises whatever the client raised."""
    with env(MLFLOW_HTTP_REQUEST_MAX_RETRIES=CHECK_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT=CHECK_TIMEOUT_S):
        mlflow_client.search_experiments(max_results=1)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def is_connection_error(exc: BaseException) -> bool:
    """The server is gone (refused, reset, timed out), as opposed to a request it refused."""
    import requests
    from mlflow.exceptions import MlflowException

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.ChunkedEncodingError,
                            ConnectionError)):
            return True
        if isinstance(exc, MlflowException) and any(s in str(exc) for s in (
                "Max retries exceeded", "Connection refused", "ConnectionError", "Failed to establish",
                "Connection aborted", "Connection broken", "RemoteDisconnected", "IncompleteRead", "Read timed out")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def error_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None)


def is_unique_race(exc: BaseException) -> bool:
    """A write that lost a race on a unique key (two jobs inserting the same alias or tag row)."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and error_code(exc) in ("BAD_REQUEST", "INTERNAL_ERROR") and bool(_UNIQUE_RACE.search(str(exc)))


def is_gone(exc: BaseException) -> bool:
    """What a job was writing to was removed by a parallel job: a model version it created that
    another job deleted as a duplicate (RESOURCE_DOES_NOT_EXIST), or a run deleted as a duplicate
    (MLflow refuses writes to a deleted run: INVALID_PARAMETER_VALUE "must be in the 'active'
    state", store/tracking/sqlalchemy_store.py ``_check_run_is_active``)."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    code = error_code(exc)
    return code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE" and "must be in the 'active' state" in str(exc))


def is_race(exc: BaseException) -> bool:
    """A request that lost to a parallel job (see :func:`is_gone` and :func:`is_unique_race`):
    looking again at what the registry holds now resolves it."""
    return is_gone(exc) or is_unique_race(exc)


def retry_races(fn: Callable[..., T], *args: Any, attempts: int = 8, **kwargs: Any) -> T:
    """Call an idempotent upsert (set alias, set tag, log params), repeating it when it lost a
    race on a unique key: the repeat finds the other job's row and updates it."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is the race
            if attempt == attempts - 1 or not is_unique_race(exc):
                raise
            time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


# --------------------------------------------------------------- names
def key(name: str) -> str:
    """A name MLflow accepts as param/metric/tag key (letters, digits, _ - . / space :)."""
    return _BAD_KEY_CHARS.sub("_", str(name))[:MAX_KEY]


def quote(value: str) -> str:
    """A string literal for MLflow's search filters."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def scalar(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def tag_value(value: Any) -> str:
    return ("-" if value is None or value == "" else scalar(value))[:MAX_TAG_VALUE]


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists -> dotted keys. Lists of scalars stay one JSON value; lists of dicts get indices."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        if not obj and prefix:
            out[prefix] = "{}"
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}.{i}"))
    else:
        out[prefix] = scalar(obj)
    return out
