"""lm-eval (0.4.13) LM adapter over llama-cpp-python (0.3.36): task accuracy of GGUF files with
llama.cpp's own kernels, on the same items the transformers-loaded formats are scored on.

Why quantforge has its own: lm-eval's ``gguf`` model talks to a llama.cpp server and is
broken against current servers for loglikelihood (lm-eval issues 1437, 4158) and has no
``loglikelihood_rolling``. Registered with lm-eval's model registry as
``quantforge-llamacpp``::

    import evals.runtimes.lmeval_llamacpp  # registers the model
    lm_eval.simple_evaluate(model="quantforge-llamacpp", model_args={"model_path": "/abs/model.gguf"}, tasks=[...])

Design
- Subclasses ``lm_eval.api.model.TemplateLM``, so context/continuation splitting is lm-eval's
  own code (TemplateLM._encode_pair / TemplateLM.loglikelihood, lm_eval/api/model.py): trailing
  context whitespace moves into the continuation, the pair is tokenized as a whole and split at
  len(tok(context)); an empty context becomes [prefix_token_id]. This is exactly the path HFLM
  takes, so only the tokenizer differs (the GGUF's own, via llama_tokenize).
- ``tok_encode`` mirrors HFLM.tok_encode: HF ``encode(s)`` defaults to add_special_tokens=True,
  which adds BOS only if the tokenizer is configured to; llama_tokenize(add_special=True) adds
  BOS only if the GGUF says ``tokenizer.ggml.add_bos_token``. Special-token text is parsed
  (special=True), as HF fast tokenizers do. ``prefix_token_id`` = BOS if any else EOS (HFLM).
- The model itself lives in a process of its own (:mod:`evals.runtimes.llamacpp_scorer`, started
  by this class and called over a pipe): lm-eval imports datasets -> pandas -> pyarrow, which a
  CUDA build of llama.cpp cannot share a process with (it aborted with ``free(): invalid
  pointer`` on an H200). That module says how requests are batched into llama.cpp decodes.
- ``loglikelihood_rolling`` mirrors HFLM: lm_eval.utils.get_rolling_token_windows(
  prefix_token=prefix_token_id, max_seq_len=max_length, context_len=1) + make_disjoint_window.
- ``generate_until``: greedy argmax decoding with stop strings, max_gen_toks (default 256), in
  the scorer's process.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from tqdm import tqdm

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model


@register_model("quantforge-llamacpp", "qf-llamacpp")
class LlamaCppLM(TemplateLM):
    backend = "causal"

    def __init__(
        self,
        model_path: str | None = None,
        pretrained: str | None = None,  # alias of model_path (lm-eval CLI habit)
        n_ctx: int = 2048,
        n_batch: int = 512,
        n_seq_max: int = 64,
        n_threads: int = 1,
        n_gpu_layers: int = 0,
        max_length: int | None = None,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        max_gen_toks: int = 256,
        pack: str = "item",
        flash_attn: bool | None = False,
        kv_type: str = "f16",
        verbose: bool = False,
        log_path: str | None = None,
        # accepted and ignored: simple_evaluate forwards these to every model class
        batch_size: Any = None,
        max_batch_size: Any = None,
        device: Any = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        from pipeline.backends.llamacpp import server

        path = model_path or pretrained
        if not path:
            raise ValueError("model_path (or pretrained) must point to a .gguf file")
        self.model_path = str(path)
        options = {"model_path": self.model_path, "n_ctx": int(n_ctx), "n_batch": int(n_batch), "n_seq_max": int(n_seq_max), "n_threads": int(n_threads),
                   "n_gpu_layers": int(n_gpu_layers), "pack": str(pack), "flash_attn": flash_attn,
                   "kv_type": str(kv_type), "verbose": bool(verbose)}
        # The scorer's stderr (llama.cpp's own messages, a native crash) goes to a file, so that an
        # error can quote its telling line; `close` copies it to this process's stderr (the eval
        # stage's log) unless `log_path` asked to keep it in a file of the caller's.
        self._own_log = log_path is None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="llamacpp-scorer-", suffix=".log")
            os.close(fd)
        self._log = open(log_path, "a", encoding="utf-8")
        self._scorer = server("evals.runtimes.llamacpp_scorer:LlamaScorer", options, stderr=self._log,
                              what=f"the llama.cpp scorer of {os.path.basename(self.model_path)}")
        info = self._scorer.call("describe")
        self._eos, self._bos, self._bos_text = info["eos"], info["bos"], info["bos_text"]
        self.scorer_info = info
        self.n_vocab, self.n_ctx, self.n_batch = info["n_vocab"], info["n_ctx"], info["n_batch"]
        self._max_length = int(max_length) if max_length else self.n_ctx
        self.add_bos_token = None if add_bos_token is None else str(add_bos_token).lower() in ("1", "true")
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        self._max_gen_toks = int(max_gen_toks)

    def close(self) -> None:
        """Stop the scorer process (also done when this object is collected)."""
        if getattr(self, "_scorer", None) is not None:
            self._scorer.close()
            crashed = self._scorer.proc.returncode not in (0, None)
            self._scorer = None
            self._log.close()
            if self._own_log:
                import sys

                with open(self._log.name, encoding="utf-8", errors="replace") as f:
                    sys.stderr.write(f.read())
                if not crashed:  # a crash's log stays where its error message points
                    os.unlink(self._log.name)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    @property
    def stats(self) -> dict:
        return self._scorer.call("stats")

    # ------------------------------------------------------------------ properties
    @property
    def eot_token_id(self) -> int:
        return self._eos

    @property
    def prefix_token_id(self) -> int:  # HFLM: custom > BOS > EOS
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        return self._bos if self._bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return os.path.basename(self.model_path)

    def get_model_info(self) -> dict:
        return {"model_path": self.model_path, "n_ctx": self.n_ctx, "n_vocab": self.n_vocab,
                "n_batch": self.n_batch}

    # ------------------------------------------------------------------ tokenizer
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kw) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = True if self.add_bos_token is None else self.add_bos_token
            if self._bos_text and string.startswith(self._bos_text):  # HFLM: has_bos_prefix -> no BOS
                add_special_tokens = False
        toks = self._scorer.call("tokenize", string, bool(add_special_tokens), True)
        if left_truncate_len:
            toks = toks[-left_truncate_len:]
        return list(toks)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self._scorer.call("detokenize", list(tokens), not skip_special_tokens)

    # ------------------------------------------------------------------ requests
    def _prep(self, ctx_enc, cont_enc):
        # HFLM: inp = (ctx + cont)[-(max_length + 1):][:-1]  (left truncation)
        full = (list(ctx_enc) + list(cont_enc))[-(self.max_length + 1):]
        inp = full[:-1]
        return inp, len(inp) - len(cont_enc)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw) -> list[tuple[float, bool]]:
        # unique (ctx, cont) pairs, grouped by context, in lexicographic token order
        uniq: dict[tuple, tuple] = {}
        for _, ctx_enc, cont_enc in requests:
            assert len(ctx_enc) > 0 and len(cont_enc) > 0
            uniq.setdefault((tuple(ctx_enc), tuple(cont_enc)), None)
        by_ctx: dict[tuple, list] = {}
        for ctx_t, cont_t in sorted(uniq):
            by_ctx.setdefault(ctx_t, []).append(cont_t)
        groups, keys = [], []
        for ctx_t, conts in by_ctx.items():
            inps, wants = zip(*(self._prep(ctx_t, c) for c in conts))
            groups.append([list(inps), list(wants), [list(c) for c in conts]])
            keys.append([(ctx_t, c) for c in conts])
        scored = {}
        step = 64  # groups per call into the scorer (and progress granularity)
        for s in tqdm(range(0, len(groups), step), disable=disable_tqdm, desc="llama.cpp loglikelihood"):
            for group_keys, group_results in zip(keys[s:s + step], self._scorer.call("score", groups[s:s + step])):
                for key, (ll, greedy) in zip(group_keys, group_results):
                    scored[key] = (float(ll), bool(greedy))
        out = []
        for key, ctx_enc, cont_enc in requests:
            r = scored[(tuple(ctx_enc), tuple(cont_enc))]
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
            out.append(r)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="llama.cpp rolling"):
            windows = [
                (None,) + lm_utils.make_disjoint_window(w)
                for w in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            total = sum(ll for ll, _ in self._loglikelihood_tokens(windows, disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm, desc="llama.cpp generate"):
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            if isinstance(until, str):
                until = [until]
            max_gen = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            toks = self.tok_encode(context)[-max(1, self.max_length - max_gen):] or [self.prefix_token_id]
            text = self._scorer.call("generate", toks, max_gen, list(until))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out
