"""The eval job: evaluate the source and every built artifact on each device here.

Reads ``<artifacts>/<recipe>/report.json`` (written by build, or by pull on another
runner) and, for each requested device that is present, runs that device's eval
stages (:mod:`evals.stages`: cached, keyed, each model in its own process), then
turns their results into typed :class:`~pipeline.core.report.EvalEntry` objects:
accuracy against the source on the same tokens, speed in the runtime users serve
the format with, and decode speed as a share of the memory-bandwidth roofline.

Before anything is measured, every artifact's files are checked against its
manifest: a file altered since the build is reported, never evaluated.

Devices of the recipe that are not here are recorded as pending; gates and the
per-device recommendation are computed from whatever devices have results; the
report is merged back under its lock (other devices' jobs may write the same
report), and plots and the HTML report are written next to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline.core.report import DeviceInfo, EvalEntry, Metrics, Report, read_report, report_path, updating
from pipeline.core.runner import StageResult, stage_keys
from pipeline.core.store import stored_bytes
from pipeline.executors import execute
from pipeline.errors import InvalidInput
from pipeline.recipe import LoadedRecipe

Log = Callable[[str], None]


def changed_artifacts(report: Report) -> dict[str, str]:
    """artifact name -> what differs from its manifest, for built artifacts whose files changed."""
    import json

    from pipeline.core.store import MANIFEST, verify_folder

    out = {}
    for a in report.built():
        if not a.path:
            continue
        folder = Path(a.path)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            out[a.name] = f"{folder / MANIFEST} is missing or unreadable"
            continue
        problems = verify_folder(folder, manifest, a.content_sha256)
        if problems:
            out[a.name] = "; ".join(problems[:5])
    return out


def entry_from(result: StageResult, baseline: EvalEntry | None, bandwidth: dict, size: int | None,
               stored_per_token: int | None = None) -> EvalEntry:
    """A typed eval entry from one eval stage's outcome; `stored_per_token`: the artifact's stored
    weight bytes read per decoded token (the format's own, whatever the runtime expanded them to)."""
    from evals.roofline import roofline
    from evals.speed import headline

    stage = result.stage
    entry = EvalEntry(fingerprint=stage.device_fingerprint, threads=stage.params.get("threads"),
                      runtime=stage.params.get("accuracy_runtime"), speed_runtime=stage.params.get("speed_runtime"),
                      stage_key=result.key)
    if result.output is None:
        entry.status = "skipped" if result.status == "skipped" else "failed"
        entry.reason = result.reason
        return entry
    facts = result.output.result
    acc, spd = facts.get("accuracy") or {}, facts.get("speed") or {}
    entry.status = "done" if acc else "failed"
    entry.accuracy, entry.speed = acc, spd
    if not acc:
        entry.reason = "no runtime here measures its accuracy: " + "; ".join(facts.get("runtime_notes") or [])
    if not spd:
        entry.speed_reason = "no runtime here measures its speed: " + "; ".join(facts.get("runtime_notes") or [])
    entry.dequantized = acc.get("dequantized", spd.get("dequantized"))
    head = headline(spd) if spd else {}
    entry.roofline = roofline(head.get("decode_tps"), stored_per_token or spd.get("weight_bytes_per_token"), bandwidth.get("bandwidth_gbs"))
    m = Metrics(
        size_bytes=size,
        perplexity=acc.get("perplexity"),
        ppl_ratio=acc.get("ppl_ratio"), ppl_ratio_err=acc.get("ppl_ratio_err"),
        kl_mean=acc.get("kl_mean"), kl_median=acc.get("kl_median"), kl_p90=acc.get("kl_p90"), kl_p95=acc.get("kl_p95"),
        kl_p99=acc.get("kl_p99"), kl_p999=acc.get("kl_p999"), kl_max=acc.get("kl_max"),
        top1_agreement_pct=acc.get("top1_agreement_pct"), rms_dp_pct=acc.get("rms_dp_pct"),
        prefill_tps=head.get("prefill_tps"), decode_tps=head.get("decode_tps"), ttft_s=head.get("ttft_s"),
        roofline_pct=entry.roofline.get("pct"), decode_bound_tps=entry.roofline.get("bound_tps"), peak_rss_mib=spd.get("peak_rss_mib"),
        peak_vram_mib=spd.get("cuda_max_allocated_mib"),
    )
    base = baseline.metrics if baseline is not None and baseline.status == "done" else None
    if base is not None:
        if m.perplexity and base.perplexity:
            m.delta_ppl_pct = 100.0 * (m.perplexity / base.perplexity - 1.0)
        if m.decode_tps and base.decode_tps:
            m.decode_speedup = m.decode_tps / base.decode_tps
    entry.metrics = m
    return entry


def write_lm_eval_results(results: dict, device: str, folder: Path, log: Log) -> None:
    """lm-eval's own results JSON of each model's tasks, beside report.json
    (``lm_eval/<device>/<model>.json``), in the layout its ``--output_path`` writes."""
    import json

    written = 0
    for stage, res in results.items():
        if not stage.startswith(f"eval/{device}/") or res.output is None:
            continue
        native = (res.output.result.get("tasks") or {}).get("lm_eval")
        if not native:
            continue
        out = folder / "lm_eval" / device / f"{stage.rsplit('/', 1)[1]}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(native, indent=2))
        written += 1
    if written:
        log(f"[eval {device}] lm-eval results: {folder / 'lm_eval' / device}/*.json")


def evaluate_device(loaded: LoadedRecipe, artifacts_dir: Path, device: str, report: Report, log: Log,
                    changed: dict[str, str]) -> tuple[EvalEntry, dict[str, EvalEntry], DeviceInfo]:
    from evals.stages import eval_context, eval_stages

    ec = eval_context(loaded, device)
    spec = loaded.recipe.evals
    log(f"[eval {device}] suite {ec.suite.spec.name!r}, context {spec.context}, up to {spec.max_windows} windows, {ec.threads} thread(s)")
    clean = report.model_copy(deep=True)
    clean.artifacts = [a for a in clean.artifacts if a.name not in changed]
    stages = eval_stages(ec, clean)
    results = execute(stages, Path(artifacts_dir), log=log, keys=stage_keys(stages),
                      logs_dir=Path(artifacts_dir) / loaded.recipe.name / "logs")
    bw = results.get(f"eval/{device}/bandwidth")
    bandwidth = bw.output.result if bw and bw.output else {}
    from evals.roofline import stored_bytes_per_token

    source_size = stored_bytes(Path(report.source.path))
    baseline = entry_from(results[f"eval/{device}/source"], None, bandwidth, source_size,
                          stored_bytes_per_token(Path(report.source.path)))
    entries: dict[str, EvalEntry] = {}
    for a in report.built():
        if a.name in changed:
            entries[a.name] = EvalEntry(status="failed", fingerprint=ec.fingerprint_hash,
                                        reason=f"not evaluated: its files changed since the build ({changed[a.name]}); rebuild it")
            continue
        res = results.get(f"eval/{device}/{a.name}")
        if res is None:
            continue
        entries[a.name] = entry_from(res, baseline, bandwidth, a.bytes or stored_bytes(Path(a.path)),
                                     stored_bytes_per_token(Path(a.path)))
    if spec.tasks:
        from evals.tasks import attach_scores

        def scores(stage: str):
            res = results.get(stage)
            return ((res.output.result.get("tasks") or {}).get("scores") if res is not None and res.output is not None else None)

        raw = {"source": scores(f"eval/{device}/source")}
        raw.update({a.name: scores(f"eval/{device}/{a.name}") for a in report.built()})
        attach_scores(raw, baseline, entries)
        write_lm_eval_results(results, device, report_path(artifacts_dir, loaded.recipe.name).parent, log)
    info = DeviceInfo(status="done", fingerprint=ec.fingerprint, fingerprint_hash=ec.fingerprint_hash,
                      bandwidth=bandwidth, suite=ec.suite.spec.name, suite_fingerprint=ec.suite.fingerprint[:16])
    return baseline, entries, info


def evaluate(loaded: LoadedRecipe, artifacts_dir: Path, device: str = "auto", log: Log = print) -> Report:
    """Evaluate the source and every built artifact on the requested devices; merge into report.json."""
    from pipeline.backends.devices import resolve_devices
    from evals.policy import judge

    recipe = loaded.recipe
    rpath = report_path(artifacts_dir, recipe.name)
    report = read_report(rpath)
    if report is None or report.source is None or not report.source.path:
        raise InvalidInput(f"no build report with a source model at {rpath}: run `quantforge build` first")
    if not Path(report.source.path).is_dir():
        raise InvalidInput(f"the source model folder {report.source.path} named in {rpath} is missing: run `quantforge build` again")
    now, pending = resolve_devices(device, recipe.evals.devices)
    changed = changed_artifacts(report)
    for name, why in changed.items():
        log(f"[eval] {name}: NOT evaluated, its stored files changed since the build: {why}")
    results = {d: evaluate_device(loaded, Path(artifacts_dir), d, report, log, changed) for d in now}
    with updating(rpath, recipe.name) as rep:
        for d, (baseline, entries, info) in results.items():
            rep.devices[d] = info
            rep.baseline[d] = baseline
            for a in rep.artifacts:
                if a.name in entries:
                    a.evals[d] = entries[a.name]
        for d in pending:
            if (rep.devices.get(d) or DeviceInfo()).status != "done":
                rep.devices[d] = DeviceInfo(status="pending", reason="no such device on this machine; evaluate it on one that has it")
                rep.baseline[d] = EvalEntry(status="pending")
            for a in rep.built():
                if (a.evals.get(d) or EvalEntry()).status == "pending":
                    a.evals[d] = EvalEntry(status="pending")
        judge(rep, recipe)
        final = rep.model_copy(deep=True)
    write_views(final, rpath.parent, log)
    return final


def write_views(report: Report, folder: Path, log: Log) -> None:
    """Plots and the HTML report next to report.json (for people: a problem here never fails an eval)."""
    try:
        from evals.plots import write_plots

        for p in write_plots(report, folder):
            log(f"[eval] plot {p}")
    except Exception as exc:  # noqa: BLE001
        log(f"[eval] plots not written: {type(exc).__name__}: {exc}")
    try:
        from evals.html import write_html

        log(f"[eval] report {write_html(report, folder)}")
    except ImportError:
        pass
    except Exception as exc:  # noqa: BLE001
        log(f"[eval] HTML report not written: {type(exc).__name__}: {exc}")
