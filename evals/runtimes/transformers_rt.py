"""Hugging Face transformers on CPU or CUDA: the source model and compressed-tensors artifacts.

Compute dtype: float32 on CPU (the reference: exact for bf16/fp16 weights, and
the same kernels on every x86 CPU, whereas CPU bf16 kernels depend on AMX/AVX512
support), the checkpoint's dtype on CUDA (what a GPU user serves).

Low-bit artifacts: transformers 5 loads compressed-tensors folders by
decompressing the weights to dense floating-point ``Linear`` layers on CPU, and
(measured on H100/H200 with transformers 5.17) on CUDA too. The session checks
the loaded modules rather than assuming: ``dequantized`` is true when the config
names a quantization method but every Linear weight is a plain float tensor, i.e.
speed numbers then say nothing about int4/FP8 kernels.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from evals.runtimes.base import Runtime, Session, missing_module_reason
from pipeline.backends.devices import Device

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


class TransformersSession(Session):
    def __init__(self, path: Path, device: str, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        config = json.loads((Path(path) / "config.json").read_text())
        qcfg = config.get("quantization_config") or {}
        method = qcfg.get("quant_method")
        if method == "modelopt":
            raise RuntimeError("transformers has no 'modelopt' quant method: it would load this checkpoint silently wrong")
        torch.set_num_threads(threads)
        self.device = Device.of(device).torch
        if self.device == "cpu":
            dtype = torch.float32
        else:
            name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
            dtype = getattr(torch, name) if name in FLOAT_DTYPES and name != "float64" else torch.bfloat16
        kwargs = {}
        if method == "compressed-tensors":
            from transformers import CompressedTensorsConfig

            # Explicit, so the behaviour does not change under us: the deprecated
            # run_compressed=False means the same thing.
            kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map=self.device, **kwargs)
        self.model.eval()
        self.vocab_size = int(self.model.config.vocab_size)
        self.max_batch = 1 << 16
        self.info = self._describe(method, dtype)

    def _describe(self, method, dtype) -> dict:
        import torch

        linear_dtypes, classes = set(), set()
        for module in self.model.modules():
            w = getattr(module, "weight", None)
            if isinstance(module, torch.nn.Linear) or type(module).__name__.endswith("Linear"):
                classes.add(type(module).__name__)
                if isinstance(w, torch.Tensor):
                    linear_dtypes.add(str(w.dtype).removeprefix("torch."))
        dense = all(d in FLOAT_DTYPES for d in linear_dtypes)
        # compressed-tensors leaves its scheme on each module it quantized; schemes with
        # input_activations quantize-dequantize activations on every forward (fake quant),
        # which costs time and is why a decompressed FP8 model decodes slower than the source.
        schemes = [m.quantization_scheme for m in self.model.modules() if getattr(m, "quantization_scheme", None) is not None]
        fake_act = sum(1 for sc in schemes if getattr(sc, "input_activations", None) is not None)
        qmods = [m for m in self.model.modules() if getattr(m, "quantization_scheme", None) is not None]
        statuses = sorted({str(getattr(m, "quantization_status", "")).rsplit(".", 1)[-1].lower() for m in qmods})
        fake_weight = 0
        if qmods:
            # compressed-tensors re-quantizes weights on every forward while status < COMPRESSED.
            from compressed_tensors.quantization import QuantizationStatus

            fake_weight = sum(1 for m in qmods if m.quantization_scheme.weights is not None
                              and getattr(m, "quantization_status", None) is not None
                              and m.quantization_status < QuantizationStatus.COMPRESSED)
        emb = self.model.get_input_embeddings().weight
        tied = emb is getattr(self.model.get_output_embeddings(), "weight", None)
        total = sum(t.numel() * t.element_size() for t in self.model.parameters())
        total += sum(t.numel() * t.element_size() for t in self.model.buffers())
        # One embedding row is read per token; an untied input table is not streamed.
        per_token = total - (0 if tied else emb.numel() * emb.element_size())
        info = {
            "compute_dtype": str(dtype).removeprefix("torch."),
            "quant_method": method,
            "dequantized": bool(method) and dense,
            "linear_classes": sorted(classes),
            "linear_weight_dtypes": sorted(linear_dtypes),
            "quantized_modules": len(schemes),
            "activation_fake_quant_modules": fake_act,
            "quantization_status": statuses,
            "weight_fake_quant_modules": fake_weight,
            "weight_bytes_in_memory": int(total),
            "weight_bytes_per_token": int(per_token),
        }
        if method and dense:
            info["notes"] = (f"{method} weights were decompressed to dense {info['compute_dtype']} at load "
                             "(no low-bit kernels ran); speed reflects dense compute")
            if fake_act:
                info["notes"] += f", plus on-the-fly activation quantize-dequantize in {fake_act} modules"
            if fake_weight:
                info["notes"] += f"; {fake_weight} modules (status {statuses}) re-quantize their weights on every forward"
        elif method:
            info["notes"] = f"ran {method} modules {sorted(classes)} with weight dtypes {sorted(linear_dtypes)}"
        return info

    def window_logprobs(self, ids: Sequence[int], first: int) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
            logits = self.model(input_ids=x, use_cache=False).logits[0, first:-1].float()
            return torch.log_softmax(logits, dim=-1).cpu().numpy()

    def _sync(self):
        if self.device != "cpu":
            import torch

            torch.cuda.synchronize()

    def generate(self, prompts: list[list[int]], n_new: int) -> tuple[float, float]:
        # A hand-written greedy loop rather than model.generate(): it never stops early at
        # EOS, has no logits processors, and lets us time the first token exactly.
        import torch

        with torch.inference_mode():
            x = torch.tensor(prompts, dtype=torch.long, device=self.device)
            self._sync()
            t0 = time.perf_counter()
            out = self.model(input_ids=x, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            self._sync()
            t1 = time.perf_counter()
            past = out.past_key_values
            for _ in range(n_new - 1):
                out = self.model(input_ids=tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
            tok.cpu()
            self._sync()
            t2 = time.perf_counter()
        return t1 - t0, t2 - t0

    def close(self) -> None:
        del self.model
        if self.device != "cpu":
            import torch

            torch.cuda.empty_cache()


class TransformersRuntime(Runtime):
    name = "transformers"
    dists = ("torch", "transformers", "compressed-tensors")

    def unavailable(self, device: str) -> str | None:
        reason = missing_module_reason("torch", "torch") or missing_module_reason("transformers", "transformers")
        if reason or not Device.of(device).on_gpu:
            return reason
        import torch

        if not torch.cuda.is_available():
            return f"device {device!r} needs CUDA, which torch {torch.__version__} does not see here"
        return None

    def open(self, path: Path, device: str, threads: int, *, logits: bool = False) -> Session:
        return TransformersSession(Path(path), device, threads)
