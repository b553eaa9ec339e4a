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
- Scoring uses the low-level API (own llama_model + llama_context, not the Llama class) with
  logits requested ONLY for the positions that predict continuation tokens (no full-sequence
  lm_head, no n_ctx x n_vocab buffer as with ``Llama(logits_all=True)``); log-softmax in
  float64 numpy.
- Multi-sequence decoding (unified KV cache, n_seq_max sequences): requests with the same
  context token list form a group (one item's choices); the group's longest common token
  prefix goes into the batch ONCE, tagged with all the group's sequence ids, and each request's
  remaining tokens go in under its own sequence id. A 4-choice item thus costs
  len(ctx) + sum(len(choice)) tokens in ONE llama_decode (HFLM pays 4 x (ctx + choice)).
  pack="item" (default) decodes each group alone; pack="multi" also packs several groups into
  one decode (no faster on CPU: ~250 tok/s either way); pack="off" = sequential path below.
  Why "item": with QUANTIZED weights llama.cpp's logits depend on the decode batch shape
  (activations are re-quantized to Q8 per matmul, which amplifies tiny reduction-order
  differences: up to ~0.5 nats on one item, ~0.05 mean; with F32 weights + F32 KV results are
  bit-identical across batch shapes). Per-item decoding makes an item's score independent of
  limit / task mix / neighbours.
  Groups longer than n_batch use a sequential path on sequence 0 with chunked decoding and KV
  prefix reuse (llama_memory_seq_rm), also used by generate_until.
- ``loglikelihood_rolling`` mirrors HFLM: lm_eval.utils.get_rolling_token_windows(
  prefix_token=prefix_token_id, max_seq_len=max_length, context_len=1) + make_disjoint_window.
- ``generate_until``: greedy argmax decoding with stop strings, max_gen_toks (default 256).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from pipeline.backends.llamacpp import binding  # noqa: E402

llama_cpp = binding()  # the llama.cpp build quantforge made: tools and binding share it
from llama_cpp._internals import LlamaBatch, LlamaContext, LlamaModel  # noqa: E402
from llama_cpp._logger import set_verbose  # noqa: E402
from tqdm import tqdm  # noqa: E402

from lm_eval import utils as lm_utils  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402

from evals.accuracy import log_softmax  # noqa: E402


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
        # accepted and ignored: simple_evaluate forwards these to every model class
        batch_size: Any = None,
        max_batch_size: Any = None,
        device: Any = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        path = model_path or pretrained
        if not path:
            raise ValueError("model_path (or pretrained) must point to a .gguf file")
        self.model_path = str(path)
        n_batch, n_threads = int(n_batch), int(n_threads)
        n_ctx = max(int(n_ctx), n_batch)
        # llama.cpp asserts n_outputs_max <= cparams.n_outputs_max at context creation when
        # n_seq_max > n_batch (llama-context.cpp output_reserve): keep n_seq_max <= n_batch
        n_seq_max = max(1, min(int(n_seq_max), n_batch))
        set_verbose(bool(verbose))
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = int(n_gpu_layers)  # -1: every layer on the GPU (a CUDA build)
        self._model = LlamaModel(path_model=self.model_path, params=mp, verbose=bool(verbose))
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, n_batch
        cp.n_seq_max = int(n_seq_max)
        cp.kv_unified = True  # sequences share one KV buffer: a token may belong to several
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.embeddings = False
        cp.no_perf = True
        # flash attention: None = llama.cpp auto (on for CPU), False/True = off/on.
        fa = None if flash_attn is None or str(flash_attn).lower() == "auto" else str(flash_attn).lower() in ("1", "true")
        cp.flash_attn_type = -1 if fa is None else int(fa)
        kv = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8}[str(kv_type).lower()]
        cp.type_k = cp.type_v = kv
        self._lctx = LlamaContext(model=self._model, params=cp, verbose=bool(verbose))
        self._ctx = self._lctx.ctx
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._vocab = self._model.vocab
        self.n_vocab = self._model.n_vocab()
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        self.n_batch = n_batch
        self.n_seq_max = int(n_seq_max)
        self._batch = LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=self.n_seq_max, verbose=False)
        self._max_length = int(max_length) if max_length else self.n_ctx
        self.add_bos_token = None if add_bos_token is None else str(add_bos_token).lower() in ("1", "true")
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        self._max_gen_toks = int(max_gen_toks)
        # "item": one decode per context group (an item's choices) -> an item's scores never depend
        #         on which other requests are evaluated (limit, task mix); default.
        # "multi": also pack several groups into one decode (up to n_batch tokens); no faster on
        #         CPU here, and with quantized weights scores then depend on the neighbours.
        # "off":  sequential on sequence 0 with KV prefix reuse (single-token decodes possible).
        self.pack = {"true": "item", "1": "item", "false": "off", "0": "off"}.get(str(pack).lower(), str(pack).lower())
        assert self.pack in ("item", "multi", "off"), pack
        self._kv: list[int] = []  # tokens held by seq 0 in the KV cache (sequential path only)
        self.stats = {"decode_calls": 0, "tokens_decoded": 0, "logit_rows": 0, "decode_s": 0.0}

    # ------------------------------------------------------------------ properties
    @property
    def eot_token_id(self) -> int:
        return self._model.token_eos()

    @property
    def prefix_token_id(self) -> int:  # HFLM: custom > BOS > EOS
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        bos = self._model.token_bos()
        return bos if bos is not None and bos >= 0 else self.eot_token_id

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
            bos = self._model.token_bos()
            if bos is not None and bos >= 0:
                bos_txt = self._model.token_to_piece(bos, special=True).rstrip(b"\0").decode("utf-8", "replace")
                if bos_txt and string.startswith(bos_txt):  # HFLM: has_bos_prefix -> no BOS
                    add_special_tokens = False
        toks = self._model.tokenize(string.encode("utf-8"), add_bos=bool(add_special_tokens), special=True)
        if left_truncate_len:
            toks = toks[-left_truncate_len:]
        return list(toks)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self._model.detokenize(list(tokens), special=not skip_special_tokens).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ low level
    def _run(self, n: int, n_out: int) -> np.ndarray | None:
        """llama_decode the first n entries of self._batch; return its n_out logits rows."""
        b = self._batch.batch
        b.n_tokens = n
        t0 = time.perf_counter()
        rc = llama_cpp.llama_decode(self._ctx, b)
        if rc != 0:
            self._kv = []
            llama_cpp.llama_memory_clear(self._mem, True)
            raise RuntimeError(f"llama_decode returned {rc}")
        out = None
        if n_out:
            ptr = llama_cpp.llama_get_logits(self._ctx)
            out = np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab)).copy()
        self.stats["decode_s"] += time.perf_counter() - t0
        self.stats["decode_calls"] += 1
        self.stats["tokens_decoded"] += n
        self.stats["logit_rows"] += n_out
        return out

    def _decode_seq0(self, tokens: list[int], want_from: int) -> np.ndarray:
        """Sequential path: make seq 0 hold exactly ``tokens`` (reusing the cached common prefix);
        return the logits rows of positions want_from .. len(tokens)-1."""
        n = len(tokens)
        assert 0 <= want_from < n <= self.n_ctx, (want_from, n, self.n_ctx)
        p, lim = 0, min(len(self._kv), want_from)
        while p < lim and self._kv[p] == tokens[p]:
            p += 1
        if not self._kv or not llama_cpp.llama_memory_seq_rm(self._mem, 0, p, -1):
            llama_cpp.llama_memory_clear(self._mem, True)
            p = 0
        b = self._batch.batch
        out = []
        for s in range(p, n, self.n_batch):
            e = min(n, s + self.n_batch)
            n_out = 0
            for j, pos in enumerate(range(s, e)):
                b.token[j] = tokens[pos]
                b.pos[j] = pos
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = 0
                b.logits[j] = need = pos >= want_from
                n_out += need
            rows = self._run(e - s, n_out)
            if rows is not None:
                out.append(rows)
        self._kv = list(tokens)
        return np.concatenate(out, axis=0)

    @staticmethod
    def _finish(logits: np.ndarray, cont: list[int]) -> tuple[float, bool]:
        logp = log_softmax(logits)
        c = np.asarray(cont, dtype=np.int64)
        return float(logp[np.arange(len(c)), c].sum()), bool((logits.argmax(axis=-1) == c).all())

    def _prep(self, ctx_enc, cont_enc):
        # HFLM: inp = (ctx + cont)[-(max_length + 1):][:-1]  (left truncation)
        full = (list(ctx_enc) + list(cont_enc))[-(self.max_length + 1):]
        inp = full[:-1]
        return inp, len(inp) - len(cont_enc)

    def _score_packs(self, groups) -> dict:
        """groups: list of (inps, want_froms, keys). Packs groups into decode calls."""
        results = {}
        pack, pack_tok, pack_seq = [], 0, 0

        def flush():
            nonlocal pack, pack_tok, pack_seq
            if not pack:
                return
            llama_cpp.llama_memory_clear(self._mem, True)
            self._kv = []
            b = self._batch.batch
            j, seq, row = 0, 0, 0
            plan = []  # per request: (key, cont, [row indices])
            for inps, wants, conts, keys, shared in pack:
                seqs = list(range(seq, seq + len(inps)))
                seq += len(inps)
                wmin = min(wants)
                shared_rows = {}
                for pos in range(shared):
                    b.token[j] = inps[0][pos]
                    b.pos[j] = pos
                    b.n_seq_id[j] = len(seqs)
                    for k, sid in enumerate(seqs):
                        b.seq_id[j][k] = sid
                    need = pos >= wmin
                    b.logits[j] = need
                    if need:
                        shared_rows[pos] = row
                        row += 1
                    j += 1
                for inp, w, cont, key, sid in zip(inps, wants, conts, keys, seqs):
                    rows = []
                    for pos in range(shared, len(inp)):
                        b.token[j] = inp[pos]
                        b.pos[j] = pos
                        b.n_seq_id[j] = 1
                        b.seq_id[j][0] = sid
                        need = pos >= w
                        b.logits[j] = need
                        if need:
                            rows.append(row)
                            row += 1
                        j += 1
                    rows = [shared_rows[p] for p in range(w, min(shared, len(inp)))] + rows
                    plan.append((key, cont, rows))
            logits = self._run(j, row)
            for key, cont, rows in plan:
                results[key] = self._finish(logits[rows], cont)
            pack, pack_tok, pack_seq = [], 0, 0

        for inps, wants, conts, keys in groups:
            shared = len(inps[0])
            for x in inps[1:]:
                m = min(shared, len(x))
                k = 0
                while k < m and x[k] == inps[0][k]:
                    k += 1
                shared = k
            ntok = shared + sum(len(x) - shared for x in inps)
            if ntok > self.n_batch or len(inps) > self.n_seq_max or self.pack == "off":
                flush()
                for inp, w, cont, key in zip(inps, wants, conts, keys):
                    results[key] = self._finish(self._decode_seq0(inp, w), cont)
                continue
            if pack and (self.pack == "item" or pack_tok + ntok > self.n_batch
                         or pack_seq + len(inps) > self.n_seq_max):
                flush()
            pack.append((inps, wants, conts, keys, shared))
            pack_tok += ntok
            pack_seq += len(inps)
        flush()
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw) -> list[tuple[float, bool]]:
        # unique (ctx, cont) pairs, grouped by context, in lexicographic token order
        uniq: dict[tuple, tuple] = {}
        for _, ctx_enc, cont_enc in requests:
            assert len(ctx_enc) > 0 and len(cont_enc) > 0
            uniq.setdefault((tuple(ctx_enc), tuple(cont_enc)), None)
        by_ctx: dict[tuple, list] = {}
        for ctx_t, cont_t in sorted(uniq):
            by_ctx.setdefault(ctx_t, []).append(cont_t)
        groups = []
        for ctx_t, conts in by_ctx.items():
            inps, wants = zip(*(self._prep(ctx_t, c) for c in conts))
            groups.append((list(inps), list(wants), [list(c) for c in conts], [(ctx_t, c) for c in conts]))
        scored = {}
        step = 64  # progress granularity (groups)
        for s in tqdm(range(0, len(groups), step), disable=disable_tqdm, desc="llama.cpp loglikelihood"):
            scored.update(self._score_packs(groups[s:s + step]))
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
            gen: list[int] = []
            text = ""
            for _ in range(max_gen):
                seq = toks + gen
                if len(seq) >= self.n_ctx:
                    break
                nxt = int(self._decode_seq0(seq, len(seq) - 1)[-1].argmax())
                if llama_cpp.llama_vocab_is_eog(self._vocab, nxt):
                    break
                gen.append(nxt)
                text = self.tok_decode(gen)
                if any(u in text for u in until):
                    break
            for u in until:
                text = text.split(u)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out
