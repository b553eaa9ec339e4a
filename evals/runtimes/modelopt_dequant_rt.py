"""ModelOpt checkpoints on CPU/CUDA, by dequantizing their weights with quantforge's reader.

No runtime installable here serves a ``quant_method: modelopt`` checkpoint
(TensorRT-LLM, vLLM and SGLang do), and plain transformers loads it silently
wrong, so it is refused there. For accuracy against the source, this adapter
reads the export by ModelOpt's documented layout
(:func:`pipeline.backends.modelopt.load_modelopt_dequantized`: FP8 weights x
scales with FP8-rounded Linear inputs, INT4-AWQ unpacked x per-group scales),
which is what a weight-dequantizing kernel computes. Its speed is dense
compute and says nothing about TensorRT-LLM's kernels: the session says so.
"""

from __future__ import annotations

from pathlib import Path

from evals.runtimes.base import Session
from evals.runtimes.transformers_rt import TransformersRuntime, TransformersSession


class ModelOptDequantSession(TransformersSession):
    def __init__(self, path: Path, device: str, threads: int):
        import torch

        from pipeline.backends.modelopt import load_modelopt_dequantized, read_quant_config

        torch.set_num_threads(threads)
        from pipeline.backends.devices import Device

        self.device = Device.of(device).torch
        dtype = torch.float32 if self.device == "cpu" else torch.bfloat16
        self.model = load_modelopt_dequantized(path, dtype=dtype).to(self.device)
        self.model.eval()
        self.vocab_size = int(self.model.config.vocab_size)
        self.max_batch = 1 << 16
        self.info = self._describe(None, dtype)
        _, hf_quant = read_quant_config(Path(path))
        algo = hf_quant.get("quantization", {}).get("quant_algo")
        self.info.update(
            quant_method="modelopt",
            quant_algo=algo,
            dequantized=True,
            notes=f"ModelOpt {algo} weights dequantized by ModelOpt's layout (FP8 also rounds Linear inputs through e4m3); "
            "no TensorRT-LLM kernels ran: speed is dense compute",
        )


class ModelOptDequantRuntime(TransformersRuntime):
    name = "modelopt_dequant"
    # The reader needs only safetensors and torch, not ModelOpt itself.
    dists = ("torch", "transformers", "safetensors")

    def open(self, path: Path, device: str, threads: int, *, logits: bool = False) -> Session:
        return ModelOptDequantSession(Path(path), device, threads)
