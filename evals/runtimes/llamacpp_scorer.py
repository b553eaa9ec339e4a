"""The llama.cpp side of quantforge's lm-eval adapter: a GGUF model that scores and generates.

It runs in a process of its own, made for llama.cpp (:func:`pipeline.backends.llamacpp.server`),
which imports nothing but the binding and numpy: lm-evaluation-harness imports datasets -> pandas -> pyarrow, and a CUDA
build of llama.cpp aborts in a process that also holds pyarrow (``free(): invalid
pointer``, seen on an H200). lm-eval's side (:mod:`evals.runtimes.lmeval_llamacpp`) calls
it over a pipe (:mod:`pipeline.backends.pipe`), so both sides keep their own libraries.

Scoring uses the low-level API (own llama_model + llama_context, not the Llama class) with
logits requested ONLY for the positions that predict continuation tokens (no full-sequence
lm_head, no n_ctx x n_vocab buffer as with ``Llama(logits_all=True)``).

Multi-sequence decoding (unified KV cache, n_seq_max sequences): requests with the same
context token list form a group (one item's choices); the group's longest common token
prefix goes into the batch ONCE, tagged with all the group's sequence ids, and each
request's remaining tokens go in under its own sequence id. A 4-choice item thus costs
len(ctx) + sum(len(choice)) tokens in ONE llama_decode (HFLM pays 4 x (ctx + choice)).
pack="item" (default) decodes each group alone; pack="multi" also packs several groups into
one decode (no faster on CPU: ~250 tok/s either way); pack="off" = sequential path.
Why "item": with QUANTIZED weights llama.cpp's logits depend on the decode batch shape
(activations are re-quantized to Q8 per matmul, which amplifies tiny reduction-order
differences: up to ~0.5 nats on one item, ~0.05 mean; with F32 weights + F32 KV results are
bit-identical across batch shapes). Per-item decoding makes an item's score independent of
limit / task mix / neighbours. Groups longer than n_batch use a sequential path on sequence
0 with chunked decoding and KV prefix reuse (llama_memory_seq_rm), also used by generation.
"""

from __future__ import annotations

import time

import numpy as np

from evals.accuracy import log_softmax  # numpy only: safe beside llama.cpp


class LlamaScorer:
    """One GGUF loaded for scoring: tokenize, score (context, continuation) groups, generate."""

    remote_methods = ("describe", "tokenize", "detokenize", "piece", "score", "generate", "stats")

    def __init__(self, model_path: str, n_ctx: int = 2048, n_batch: int = 512, n_seq_max: int = 64,
                 n_threads: int = 1, n_gpu_layers: int = 0, pack: str = "item", flash_attn=False,
                 kv_type: str = "f16", verbose: bool = False) -> None:
        from pipeline.backends.llamacpp import binding

        llama_cpp = binding()
        from llama_cpp._internals import LlamaBatch, LlamaContext, LlamaModel
        from llama_cpp._logger import set_verbose

        self._llama_cpp = llama_cpp
        self.model_path = str(model_path)
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
        # "item": one decode per context group (an item's choices) -> an item's scores never depend
        #         on which other requests are evaluated (limit, task mix); default.
        # "multi": also pack several groups into one decode (up to n_batch tokens); no faster on
        #         CPU here, and with quantized weights scores then depend on the neighbours.
        # "off":  sequential on sequence 0 with KV prefix reuse (single-token decodes possible).
        self.pack = {"true": "item", "1": "item", "false": "off", "0": "off"}.get(str(pack).lower(), str(pack).lower())
        if self.pack not in ("item", "multi", "off"):
            raise ValueError(f"pack must be item, multi or off, not {pack!r}")
        self._kv: list[int] = []  # tokens held by seq 0 in the KV cache (sequential path only)
        self._stats = {"decode_calls": 0, "tokens_decoded": 0, "logit_rows": 0, "decode_s": 0.0}

    # ------------------------------------------------------------------ remote methods
    def describe(self) -> dict:
        from pipeline.backends.llamacpp import loaded_forbidden

        bos = self._model.token_bos()
        bos_text = ""
        if bos is not None and bos >= 0:
            bos_text = self.piece(bos, True)
        return {"eos": self._model.token_eos(), "bos": bos if bos is not None and bos >= 0 else None,
                "bos_text": bos_text, "n_ctx": self.n_ctx, "n_vocab": self.n_vocab, "n_batch": self.n_batch,
                "modules_beside_llama_cpp": loaded_forbidden()}

    def tokenize(self, text: str, add_bos: bool, special: bool = True) -> list[int]:
        return list(self._model.tokenize(text.encode("utf-8"), add_bos=bool(add_bos), special=bool(special)))

    def detokenize(self, tokens: list[int], special: bool = False) -> str:
        return self._model.detokenize(list(tokens), special=bool(special)).decode("utf-8", errors="replace")

    def piece(self, token: int, special: bool = True) -> str:
        return self._model.token_to_piece(int(token), special=bool(special)).rstrip(b"\0").decode("utf-8", "replace")

    def stats(self) -> dict:
        return dict(self._stats)

    def score(self, groups: list) -> list:
        """groups: [[inps, want_froms, conts], ...], one group per shared context (an item's
        choices). Returns, per group, [[loglikelihood, greedy], ...] per continuation."""
        keyed = [(inps, wants, conts, [(g, j) for j in range(len(inps))]) for g, (inps, wants, conts) in enumerate(groups)]
        results = self._score_packs(keyed)
        return [[list(results[(g, j)]) for j in range(len(inps))] for g, (inps, _, _) in enumerate(groups)]

    def generate(self, toks: list[int], max_gen: int, until: list[str]) -> str:
        """Greedy continuation of `toks`: at most max_gen tokens, stopping at an end-of-generation
        token or when a stop string appears (the text is cut before it)."""
        gen: list[int] = []
        text = ""
        for _ in range(int(max_gen)):
            seq = list(toks) + gen
            if len(seq) >= self.n_ctx:
                break
            nxt = int(self._decode_seq0(seq, len(seq) - 1)[-1].argmax())
            if self._llama_cpp.llama_vocab_is_eog(self._vocab, nxt):
                break
            gen.append(nxt)
            text = self.detokenize(gen)
            if any(u in text for u in until):
                break
        for u in until:
            text = text.split(u)[0]
        return text

    # ------------------------------------------------------------------ low level
    def _run(self, n: int, n_out: int) -> np.ndarray | None:
        """llama_decode the first n entries of self._batch; return its n_out logits rows."""
        b = self._batch.batch
        b.n_tokens = n
        t0 = time.perf_counter()
        rc = self._llama_cpp.llama_decode(self._ctx, b)
        if rc != 0:
            self._kv = []
            self._llama_cpp.llama_memory_clear(self._mem, True)
            raise RuntimeError(f"llama_decode returned {rc}")
        out = None
        if n_out:
            ptr = self._llama_cpp.llama_get_logits(self._ctx)
            out = np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab)).copy()
        self._stats["decode_s"] += time.perf_counter() - t0
        self._stats["decode_calls"] += 1
        self._stats["tokens_decoded"] += n
        self._stats["logit_rows"] += n_out
        return out

    def _decode_seq0(self, tokens: list[int], want_from: int) -> np.ndarray:
        """Sequential path: make seq 0 hold exactly ``tokens`` (reusing the cached common prefix);
        return the logits rows of positions want_from .. len(tokens)-1."""
        n = len(tokens)
        assert 0 <= want_from < n <= self.n_ctx, (want_from, n, self.n_ctx)
        p, lim = 0, min(len(self._kv), want_from)
        while p < lim and self._kv[p] == tokens[p]:
            p += 1
        if not self._kv or not self._llama_cpp.llama_memory_seq_rm(self._mem, 0, p, -1):
            self._llama_cpp.llama_memory_clear(self._mem, True)
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
        """groups: list of (inps, want_froms, conts, keys). Packs groups into decode calls."""
        results = {}
        pack, pack_tok, pack_seq = [], 0, 0

        def flush():
            nonlocal pack, pack_tok, pack_seq
            if not pack:
                return
            self._llama_cpp.llama_memory_clear(self._mem, True)
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
