"""A small but real report.json with real artifact folders, for registry tests and screenshots.

Artifacts are committed through ``pipeline.core.store.Store`` (so manifests carry real
sha256s), evals and gates have the shapes the eval and gate stages write, and the
recipe config is a validated ``Recipe`` dumped to a dict. Nothing here imports mlflow.

    python -m tests.registry_fixtures ARTIFACTS_DIR   # writes ARTIFACTS_DIR/<recipe>/report.json
"""

from __future__ import annotations

import hashlib
import struct
import sys
import zlib
from pathlib import Path

from pipeline.recipe import Recipe
from pipeline.core.report import ArtifactReport, Report, SourceReport, read_report, report_path, updating, write_report
from pipeline.core.store import Store

# The two artifacts: (name, target, kind, variant, format, runtimes, bits, group_size, files)
ARTIFACTS = [
    ("gguf-Q4_K_M", "gguf", "gguf", "Q4_K_M", "gguf", ["llama_cpp"], 4, None, {"model-Q4_K_M.gguf": 48_000}),
    ("w4a16-gptq", "w4a16-gptq", "gptq", None, "compressed-tensors", ["transformers"], 4, 128,
     {"model.safetensors": 40_000, "config.json": 0, "tokenizer.json": 0}),
]


def recipe_dict(name: str, model_name: str | None, upload_max_mb: float, devices: list[str], long_description: bool) -> dict:
    return {
        "name": name,
        # Longer than MLflow's 6000-char param limit, to exercise truncation.
        "description": ("A fixture recipe. " * 400) if long_description else "A fixture recipe.",
        "source": {"model": "builtin:tiny-llama", "revision": "main"},
        "calibration": {"samples": 8, "seq_len": 64},
        "targets": [
            {"name": "w4a16-gptq", "kind": "gptq", "bits": 4, "group_size": 128},
            {"name": "gguf", "kind": "gguf", "quants": ["Q4_K_M"]},
        ],
        "evals": {"devices": devices},
        "gates": {"max_perplexity_increase_pct": 5.0, "required_devices": devices},
        "registry": {"model_name": model_name, "upload_max_mb": upload_max_mb, "tags": {"team": "quant", "fixture": "yes"}},
    }


def _bytes(seed: str, n: int) -> bytes:
    """Deterministic pseudo-random bytes: same seed, same content hash."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


def png(width: int = 64, height: int = 32, rgb: tuple[int, int, int] = (40, 120, 200)) -> bytes:
    """A real (tiny, solid-colour) PNG, written by hand so tests need no plotting library."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def build_artifact(store: Store, kind: str, name: str, seed: str, files: dict[str, int], recipe: str = "") -> tuple[Path, dict]:
    # The recipe is in the key (its own folder, so tests sharing a store can't touch each
    # other's files) but not in the bytes (same seed, same content hash).
    key = hashlib.sha256(f"{recipe}:{kind}:{name}:{seed}".encode()).hexdigest()
    found = store.get(kind, key)
    if found is not None:
        return store.path_for(kind, key), found
    tmp = store.new_tmp(kind, key)
    for fname, size in files.items():
        if fname.endswith(".json"):
            (tmp / fname).write_text(f'{{"fixture": "{name}", "seed": "{seed}"}}\n')
        else:
            (tmp / fname).write_bytes(_bytes(f"{name}:{seed}:{fname}", size))
    (tmp / "README.md").write_text(f"# {name}\n\nFixture model card for `{name}` (seed `{seed}`).\n\n| metric | value |\n|---|---|\n| bits | 4 |\n")
    return store.commit(tmp, kind, key, {"stage": f"quantize:{name}"})


def evals_for(device: str, runtime: str, ppl_increase_pct: float, decode_tps: float) -> dict:
    base_ppl = 54.78
    return {
        "runtime": runtime,
        "perplexity": round(base_ppl * (1 + ppl_increase_pct / 100), 4),
        "perplexity_increase_pct": ppl_increase_pct,
        "kl_divergence_mean": round(ppl_increase_pct / 150, 5),
        "top1_agreement_pct": round(100 - 1.5 * ppl_increase_pct, 3),
        "decode_tps": decode_tps,
        "native_kernels": runtime == "llama_cpp",
        "fingerprint": {"device": device, "cpu": "fixture-cpu", "threads": 1},
    }


def gates_for(evals: dict[str, dict], required: list[str], limit_pct: float = 5.0) -> dict:
    checks = []
    pending = []
    for dev in required:
        e = evals.get(dev)
        if not e or "perplexity_increase_pct" not in e:
            pending.append(dev)
            continue
        checks.append({"device": dev, "name": "max_perplexity_increase_pct", "value": e["perplexity_increase_pct"], "limit": limit_pct,
                       "passed": e["perplexity_increase_pct"] <= limit_pct})
    failed = any(not c["passed"] for c in checks)
    return {"passed": False if failed else (None if pending else True), "checks": checks, "pending_devices": pending}


def make_report(
    artifacts_dir: Path,
    recipe: str = "regtest",
    model_name: str | None = None,
    seed: str = "v1",
    ppl_increase_pct: float = 2.0,
    devices: tuple[str, ...] = ("cpu",),
    evaluated: tuple[str, ...] = ("cpu",),
    upload_max_mb: float = 2048,
    long_description: bool = True,
    plot: bool = True,
) -> Path:
    """Write <artifacts_dir>/<recipe>/report.json for two built artifacts; return its path."""
    artifacts_dir = Path(artifacts_dir)
    store = Store(artifacts_dir)
    cfg = Recipe.model_validate(recipe_dict(recipe, model_name, upload_max_mb, list(devices), long_description))
    report = Report(
        recipe=recipe,
        recipe_path=f"recipes/{recipe}.yaml",
        recipe_sha256=cfg.sha256(),
        quantforge_version="0.1.0",
        git_commit="0123456789abcdef0123456789abcdef01234567",
        tools={"torch": "2.13.0", "transformers": "5.17.0", "llama_cpp": "0.3.36"},
        source=SourceReport(model="builtin:tiny-llama", revision="main", commit="fixturecommit", fingerprint="src-" + hashlib.sha256(recipe.encode()).hexdigest()[:16]),
        baseline={d: {"runtime": "transformers", "perplexity": 54.78, "decode_tps": 900.0} for d in evaluated},
        devices={d: {"status": "done" if d in evaluated else "pending"} for d in devices},
        recipe_config=cfg.model_dump(mode="json"),
    )
    for name, target, kind, variant, fmt, runtimes, bits, gs, files in ARTIFACTS:
        path, manifest = build_artifact(store, kind, name, seed, files, recipe)
        evals = {d: evals_for(d, runtimes[0], ppl_increase_pct, 5000.0 if kind == "gguf" else 800.0) for d in evaluated}
        for d in devices:
            evals.setdefault(d, {"status": "pending"})
        report.artifacts.append(ArtifactReport(
            name=name, target=target, kind=kind, variant=variant, status="built", path=str(path),
            bytes=manifest["bytes"], content_sha256=manifest["content_sha256"], stage_key=manifest["key"],
            format=fmt, runtimes=runtimes, bits=bits, group_size=gs, evals=evals, gates=gates_for(evals, list(devices)),
        ))
    report.artifacts.append(ArtifactReport(name="trt-fp8", target="trt-fp8", kind="tensorrt", status="skipped", reason="needs a GPU"))
    out = report_path(artifacts_dir, recipe)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(out, report)
    if plot:
        (out.parent / "perplexity_vs_size.png").write_bytes(png())
    return out


def add_device_results(path: Path, device: str, ppl_increase_pct: float = 2.5) -> None:
    """Simulate an eval job on another device finishing later: its metrics land, gates re-decided."""
    rep = read_report(path)
    with updating(path, rep.recipe) as r:
        r.devices[device] = {"status": "done"}
        r.baseline[device] = {"runtime": "transformers", "perplexity": 54.78, "decode_tps": 4000.0}
        required = r.recipe_config["gates"]["required_devices"]
        for a in r.artifacts:
            if a.status != "built":
                continue
            a.evals[device] = evals_for(device, a.runtimes[0], ppl_increase_pct, 20000.0)
            a.gates = gates_for(a.evals, required)


if __name__ == "__main__":
    print(make_report(Path(sys.argv[1]), *(sys.argv[2:3] or [])))
