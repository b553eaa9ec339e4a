"""Registration's descriptions: what a build run, artifact runs, model versions and the experiment say
(metrics, tags, descriptions, the results table, the report.json view), all from the merge of
every job's report part.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from pipeline.core.report import ArtifactReport, RegistryEntry, RegistryInfo, Report
from pipeline.core.store import sha256_file
from pipeline.registry import cards, parts as P, promotion
from pipeline.registry.tracking import (
    MAX_PARAM_VALUE, TAG_PREFIX, flatten, key, retry_races,
    tag_value,
)
from pipeline.registry.writes import artifact_identity, build_identity, RECIPE_ARTIFACT


class Describing:
    """Descriptions and views (mixed into Registration)."""

    def _metric_keys(self, merged: Report) -> dict[str, list[str]]:
        """device -> metric names measured there for any model, so every run logs the same keys."""
        keys: dict[str, list[str]] = {}
        for device in cards.devices_of(merged):
            names: dict[str, None] = {}
            for ev in [merged.baseline.get(device), *(a.evals.get(device) for a in merged.built())]:
                if ev is not None:
                    names.update(dict.fromkeys(cards.entry_values(ev)))
            keys[device] = list(names)
        return keys

    @staticmethod
    def _device_metrics(evals: dict, keys: dict[str, list[str]] | None) -> dict[str, float]:
        """``<device>.<metric>``; with `keys`, every key measured for any model there (NaN where
        this one has no value), so the compare and chart views line up across formats."""
        out: dict[str, float] = {}
        for device in (keys if keys is not None else evals):
            ev = evals.get(device)
            values = cards.entry_values(ev) if ev is not None else {}
            for n in (keys[device] if keys is not None else values):
                out[key(f"{device}.{n}")] = values.get(n, float("nan"))
        return out

    def _eval_tags(self, evals: dict, prefix: str) -> dict[str, str]:
        tags: dict[str, str] = {}
        for device, ev in evals.items():
            p = f"{prefix}.{device}" if prefix else device
            # Every field, "-" when unset: tags cannot be removed by a later view, only overwritten.
            tags[f"{p}.status"] = ev.status
            for field in ("runtime", "speed_runtime", "fingerprint", "reason", "speed_reason", "tasks_reason"):
                tags[f"{p}.{field}"] = tag_value(getattr(ev, field))
            tags[f"{p}.dequantized"] = "-" if ev.dequantized is None else str(ev.dequantized).lower()
        return tags

    def _describe_run(self, run, parent, merged: Report, a: ArtifactReport, name: str, version: str, keys: dict, step: int) -> None:
        ident = artifact_identity(merged, a)
        tags = {
            **ident,
            "mlflow.parentRunId": parent.info.run_id,
            f"{TAG_PREFIX}registered_model": name,
            f"{TAG_PREFIX}model_version": version,
            f"{TAG_PREFIX}source_model": merged.source.model if merged.source else "-",
            **promotion.gate_tags(a),
            **self._eval_tags(a.evals, "eval"),
            **{f"{TAG_PREFIX}recommended.{d}": str(v).lower() for d, v in promotion.recommended_on(merged, a.name).items()},
            **self.user_tags,
        }
        self._tags(run.info.run_id, run.data.tags, tags)
        metrics = self._device_metrics(a.evals, keys)
        if a.bytes is not None:
            metrics["size_mib"] = round(a.bytes / 2**20, 3)
        self._metrics(run.info.run_id, run.data.metrics, metrics, step)
        excerpt = {
            "recipe": merged.recipe, "recipe_sha256": merged.recipe_sha256,
            "source": merged.source.model_dump(mode="json", exclude={"config", "path"}) if merged.source else None,
            "baseline": {d: e.model_dump(mode="json") for d, e in merged.baseline.items()},
            "devices": {d: i.model_dump(mode="json") for d, i in merged.devices.items()},
            "recommendations": {d: r.model_dump(mode="json") for d, r in merged.recommendations.items()},
            "artifact": a.model_dump(mode="json", exclude={"registry", "path"}),
        }
        self._upload_json(run, excerpt, "quantforge/report_excerpt.json", f"{TAG_PREFIX}excerpt_sha256")
        self._finish(run)

    def _upload_json(self, run, data: Any, path: str, tag: str) -> None:
        self._upload_text(run, json.dumps(data, indent=2, sort_keys=True, default=str), path, tag)

    def _upload_text(self, run, text: str, path: str, tag: str) -> None:
        """A file on the run, uploaded again only when its content changes (its digest is a tag)."""
        digest = hashlib.sha256(text.encode()).hexdigest()
        if run.data.tags.get(tag) == digest:
            return
        with tempfile.TemporaryDirectory(prefix="qf-json-") as tmp:
            f = Path(tmp) / Path(path).name
            f.write_text(text)
            self.client.log_artifact(run.info.run_id, str(f), str(Path(path).parent))
        self._tags(run.info.run_id, {}, {tag: digest})

    def _describe_version(self, mv, merged: Report, a: ArtifactReport, held: dict[str, str]) -> None:
        src = merged.source
        tags = {
            "content_sha256": a.content_sha256, "artifact": a.name, "target": a.target, "kind": a.kind, "variant": a.variant or "-",
            "format": a.format or "-", "bits": tag_value(a.bits), "group_size": tag_value(a.group_size),
            "runtimes": ",".join(a.runtimes) or "-", "bytes": tag_value(a.bytes), "size_mib": f"{(a.bytes or 0) / 2**20:.2f}",
            "recipe": merged.recipe, "recipe_sha256": merged.recipe_sha256 or "-",
            "source_model": src.model if src else "-", "source_revision": src.revision if src else "-",
            "source_commit": (src.commit if src else None) or "-",
            **promotion.gate_tags(a),
            **{f"recommended.{d}": str(v).lower() for d, v in promotion.recommended_on(merged, a.name).items()},
            **self.user_tags,
        }
        for device, ev in a.evals.items():
            for k, v in cards.entry_values(ev).items():
                tags[f"{device}.{k}"] = repr(v)
            tags[f"{device}.runtime"] = tag_value(ev.runtime)
            tags[f"{device}.status"] = ev.status
        have = mv.tags or {}
        if a.kind == "gguf" and not have.get("gguf_file"):  # a version registered before the tag existed
            import mlflow.artifacts

            names = [Path(f.path).name for f in mlflow.artifacts.list_artifacts(artifact_uri=mv.source, tracking_uri=self.uri)]
            gguf = next((n for n in names if n.endswith(".gguf")), None)
            if gguf:
                tags["gguf_file"] = gguf
        for k, v in tags.items():
            k, v = key(k), tag_value(v)
            if have.get(k) != v:
                retry_races(self.client.set_model_version_tag, mv.name, str(mv.version), k, v)
        desc = cards.version_description(merged, a, mv.name, str(mv.version), self.uri, self.spec.promotion_alias,
                                         tags.get("gguf_file") or have.get("gguf_file"), held)
        if (mv.description or "") != desc:
            self.client.update_model_version(mv.name, str(mv.version), description=desc)

    def _describe_build(self, parent, merged: Report, keys: dict, step: int) -> None:
        from pipeline import __version__

        r, src = merged, merged.source
        truncated = self._params(parent, flatten(self.config))
        tags = {
            **build_identity(r),
            f"{TAG_PREFIX}recipe": r.recipe,
            f"{TAG_PREFIX}recipe_path": r.recipe_path or "-",
            f"{TAG_PREFIX}version": r.quantforge_version or __version__,
            f"{TAG_PREFIX}git_commit": r.git_commit or "-",
            f"{TAG_PREFIX}source_model": src.model if src else "-",
            f"{TAG_PREFIX}source_revision": src.revision if src else "-",
            f"{TAG_PREFIX}source_commit": (src.commit if src else None) or "-",
            **{f"tool.{k}": v for k, v in r.tools.items()},
            **self.user_tags,
            "mlflow.note.content": cards.build_note(r),
            **{f"{TAG_PREFIX}recommended.{d}": rec.artifact or "none" for d, rec in r.recommendations.items()},
        }
        if truncated:
            tags[f"{TAG_PREFIX}params_truncated"] = f"values over {MAX_PARAM_VALUE} chars cut: " + ", ".join(truncated)
        for device, info in r.devices.items():
            tags[f"device.{device}.status"] = info.status
            tags[f"device.{device}.fingerprint"] = tag_value(info.fingerprint_hash)
            tags[f"device.{device}.reason"] = tag_value(info.reason)
        tags.update(self._eval_tags(r.baseline, "baseline"))
        self._tags(parent.info.run_id, parent.data.tags, tags)
        self._metrics(parent.info.run_id, parent.data.metrics, self._device_metrics(r.baseline, None), step)
        # The recipe as validated (defaults filled in): the same bytes for every job of this build
        # run, whose identity includes its sha256.
        import yaml

        self._upload_text(parent, yaml.safe_dump(self.config, sort_keys=False, allow_unicode=True), RECIPE_ARTIFACT, f"{TAG_PREFIX}recipe_yaml_sha256")

    def _describe_experiment(self, experiment_id: str, parent, merged: Report) -> None:
        """The experiment's description (what MLflow shows above its runs, by default): the
        formats side by side per device, of the build registered last."""
        note = cards.build_note(merged) + f"\n\nBuild run: `{parent.info.run_id}`."
        exp = self.client.get_experiment(experiment_id)
        if (exp.tags or {}).get("mlflow.note.content") != note:
            retry_races(self.client.set_experiment_tag, experiment_id, "mlflow.note.content", note)

    def _held(self, models: list[str], moves: list) -> dict[str, dict[str, str]]:
        """model -> {alias: version} it holds: the ones this policy decides from the plan, the
        others (a person's @champion, say) as MLflow holds them."""
        from mlflow.exceptions import MlflowException

        governed = {(m.model, m.alias): m.version for m in moves} if promotion.promotion_enabled() else {}
        out: dict[str, dict[str, str]] = {}
        for name in models:
            try:
                held: dict[str, str | None] = {k: str(v) for k, v in (self.client.get_registered_model(name).aliases or {}).items()}
            except MlflowException:
                held = {}
            for (model, alias), v in governed.items():
                if model == name:
                    held[alias] = v
            out[name] = {k: v for k, v in held.items() if v is not None}
        return out

    def _entries(self, merged: Report, versions: dict, runs: dict, held: dict[str, dict[str, str]]) -> dict[str, RegistryEntry]:
        """Where each artifact is registered, with the aliases its version holds."""
        out = {}
        for a in merged.built():
            if a.name not in versions:
                continue
            name, version = versions[a.name]
            aliases = sorted(al for al, v in held.get(name, {}).items() if v == version)
            run = runs.get(a.name)
            out[a.name] = RegistryEntry(name=name, version=version, uri=f"models:/{name}/{version}",
                                        run_id=run.info.run_id if run is not None else None, aliases=aliases)
        return out

    def _write_view(self, parent, merged: Report, experiment_id: str) -> None:
        view = merged.model_copy(deep=True)
        for a in view.artifacts:
            a.registry = self.entries.get(a.name)
        view.registry = RegistryInfo(tracking_uri=self.uri, experiment_id=experiment_id, experiment_name=view.recipe, parent_run_id=parent.info.run_id)
        from pipeline.core.report import portable_paths, report_digest

        # Paths inside the artifacts dir relative to it, as in report.json: a build machine's folders
        # mean nothing to whoever downloads this copy.
        text = json.dumps(portable_paths(view.model_dump(mode="json"), self.report_path), indent=2, default=str)

        digest = report_digest(view)
        if parent.data.tags.get(P.REPORT_TAG) != digest:
            with tempfile.TemporaryDirectory(prefix="qf-report-") as tmp:
                f = Path(tmp) / Path(P.REPORT_ARTIFACT).name
                f.write_text(text)
                self.client.log_artifact(parent.info.run_id, str(f), str(Path(P.REPORT_ARTIFACT).parent))
            self._tags(parent.info.run_id, {}, {P.REPORT_TAG: digest})
            registered = [a.name for a in view.artifacts if a.registry]
            self.log(f"register: merged report.json on build run {parent.info.run_id}: {', '.join(registered) or 'no'} artifact(s) registered so far")

    def _log_files(self, parent) -> None:
        """Plots and the HTML report next to report.json, on the build run; again only when they change."""
        files = sorted(p for p in self.report_path.parent.iterdir() if p.is_file() and p.suffix in (".png", ".html"))
        if not files:
            return
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.name}\0{sha256_file(p)}\n".encode())
        if parent.data.tags.get(f"{TAG_PREFIX}plots_sha256") == h.hexdigest():
            return
        for p in files:
            self.client.log_artifact(parent.info.run_id, str(p), "plots" if p.suffix == ".png" else None)
        self._tags(parent.info.run_id, {}, {f"{TAG_PREFIX}plots_sha256": h.hexdigest()})

    # ------------------------------------------------------------- the job
