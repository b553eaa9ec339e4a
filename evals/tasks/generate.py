"""Generate the shipped offline lm-eval tasks from the held-out split of the bundled KJV corpus.

    python -m evals.tasks.generate [--check]

Deterministic (fixed seeds, no network): the files in this folder are its output, and
``--check`` (run by the tests) regenerates them in memory and fails if any differs. Items
come from the corpus's held-out chapters only (pipeline/data/corpus.py), the text no demo
model trains on and calibration never reads. Items are shuffled with the seed, so lm-eval's
``limit=N`` (the first N documents) is a seeded random sample, and the items for N are a
prefix of those for N' > N.

* ``kjv_cloze``: LAMBADA-style last-word cloze. The context is 20-40 words of whole clauses;
  the target ends a clause and already occurs in the context (LAMBADA's predictability filter).
  Metric: the target is the greedy continuation (acc), and its perplexity.
* ``kjv_word4``: pick the true next word among 4; the 3 distractors are common words of the same
  chapter with the same capitalisation, so only the local context decides. Chance 25 %.
* ``kjv_next4``: HellaSwag-like: pick the true next 6-word clause opening among 4 (distractors from
  other chapters). Chance 25 %. Costlier to score (multi-token choices).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

SEED = 1234

# cloze parameters
CLOZE_CTX_MIN_WORDS = 20   # context: whole clauses, at least this many words ...
CLOZE_CTX_MAX_WORDS = 40   # ... and at most this many
CLOZE_MIN_GAP = 10         # minimum distance (words) between two cloze targets
# next-clause MC parameters
MC_CTX_MIN_WORDS = 15
MC_CTX_MAX_WORDS = 35
MC_CHOICE_WORDS = 6        # every choice = the first 6 words of a clause (gold and distractors)
MC_N_CHOICES = 4
MC_MIN_GAP = 12
# next-word 4-way choice (single words, mostly single tokens -> one forward per item in HFLM)
W4_CTX_MIN_WORDS = 20
W4_CTX_MAX_WORDS = 40
W4_MIN_GAP = 8
W4_MIN_FREQ = 10           # gold and distractors: words seen >= 10 times in the whole corpus
                           # (frequent words are single tokens in common BPE vocabularies, so
                           # HFLM scores all 4 choices with ONE forward of the context)

STOP = set("""a an and are as at be but by for from had has have he her him his i if in into is it
its me my no nor not of on or our out shall she so that the thee their them then there these they
thou thy this those to unto up upon us was we were which who whom will with ye yea you your also all
any are did do even hath let lo may more now one said saith say than what when where why o
""".split())

PUNCT_END = re.compile(r"^([A-Za-z']+)([.,;:?!])$")
CLAUSE_END = re.compile(r"[.;:?!]$")


def word_freq(text: str) -> dict[str, int]:
    """Word counts over the whole corpus (counts only; used to pick common candidate words)."""
    freq: dict[str, int] = {}
    for w in text.split():
        b = re.sub(r"[^A-Za-z]", "", w)
        freq[b] = freq.get(b, 0) + 1
    return freq


def clause_starts(words: list[str]) -> list[int]:
    """Indices of words that begin a clause (word 0, and any word after . ; : ? !)."""
    return [0] + [i + 1 for i, w in enumerate(words[:-1]) if CLAUSE_END.search(w)]


def make_cloze(paras: list[str], rnd: random.Random) -> list[dict]:
    items = []
    for pi, p in enumerate(paras):
        words = p.split()
        starts = clause_starts(words)
        last_t = -10**9
        for t, w in enumerate(words):
            m = PUNCT_END.match(w)
            if not m:               # target must be followed by punctuation (clause / verse end)
                continue
            bare = m.group(1)
            if len(bare) < 3 or bare.lower() in STOP:
                continue
            if t - last_t < CLOZE_MIN_GAP:
                continue
            # context = longest run of whole clauses ending right before the target,
            # between CLOZE_CTX_MIN_WORDS and CLOZE_CTX_MAX_WORDS words
            ok = [s for s in starts if CLOZE_CTX_MIN_WORDS <= t - s <= CLOZE_CTX_MAX_WORDS]
            if not ok:
                continue
            s = ok[0]
            ctx_words = words[s:t]
            # LAMBADA-like predictability filter: the target word already occurs in the context
            ctx_bare = {re.sub(r"[^A-Za-z']", "", x) for x in ctx_words}
            if bare not in ctx_bare:
                continue
            items.append({"id": f"c{pi:02d}_{t:04d}", "context": " ".join(ctx_words),
                          "target": " " + bare})
            last_t = t
    rnd.shuffle(items)
    return items


def make_word4(paras: list[str], rnd: random.Random, freq: dict[str, int]) -> list[dict]:
    """Context (whole clauses) ending right before a content word; choose that word among 4:
    the gold and 3 distinct content words drawn from the SAME chapter with the same
    capitalisation (so topic/vocabulary is matched and only the local context decides)."""
    items = []
    for pi, p in enumerate(paras):
        words = p.split()
        bare_all = [re.sub(r"[^A-Za-z]", "", w) for w in words]
        pool = sorted({b for b, w in zip(bare_all, words) if len(b) >= 3 and b.lower() not in STOP
                       and re.fullmatch(r"[A-Za-z]+[.,;:?!]?", w) and freq.get(b, 0) >= W4_MIN_FREQ})
        starts = clause_starts(words)
        last = -10**9
        for t, w in enumerate(words):
            if t - last < W4_MIN_GAP or not re.fullmatch(r"[A-Za-z]+[.,;:?!]?", w):
                continue
            gold = bare_all[t]
            if len(gold) < 3 or gold.lower() in STOP or freq.get(gold, 0) < W4_MIN_FREQ:
                continue
            ok = [s for s in starts if W4_CTX_MIN_WORDS <= t - s <= W4_CTX_MAX_WORDS]
            if not ok:
                continue
            cands = [x for x in pool if x != gold and x[0].isupper() == gold[0].isupper()]
            if len(cands) < 3:
                continue
            distr = rnd.sample(cands, 3)
            label = rnd.randrange(4)
            choices = distr[:label] + [gold] + distr[label:]
            items.append({"id": f"w{pi:02d}_{t:04d}", "context": " ".join(words[ok[0]:t]),
                          "choices": choices, "label": label})
            last = t
    rnd.shuffle(items)
    return items


def make_next4(paras: list[str], rnd: random.Random) -> list[dict]:
    # pool of clause openings (first MC_CHOICE_WORDS words, trailing punctuation kept as in text)
    openings = []  # (para, start, text)
    for pi, p in enumerate(paras):
        words = p.split()
        for s in clause_starts(words):
            if s + MC_CHOICE_WORDS <= len(words):
                openings.append((pi, s, " ".join(words[s:s + MC_CHOICE_WORDS])))
    items = []
    for pi, p in enumerate(paras):
        words = p.split()
        starts = clause_starts(words)
        last = -10**9
        for t in starts:
            if t - last < MC_MIN_GAP or t + MC_CHOICE_WORDS > len(words):
                continue
            ok = [s for s in starts if MC_CTX_MIN_WORDS <= t - s <= MC_CTX_MAX_WORDS]
            if not ok:
                continue
            s = ok[0]
            gold = " ".join(words[t:t + MC_CHOICE_WORDS])
            # distractors: clause openings from OTHER held-out chapters, distinct texts
            # (same capitalisation of the first letter as the gold, so case is no cue)
            pool = [o[2] for o in openings if o[0] != pi and o[2] != gold
                    and o[2][0].isupper() == gold[0].isupper()]
            distr = []
            while len(distr) < MC_N_CHOICES - 1:
                c = rnd.choice(pool)
                if c not in distr:
                    distr.append(c)
            label = rnd.randrange(MC_N_CHOICES)
            choices = distr[:label] + [gold] + distr[label:]
            items.append({"id": f"n{pi:02d}_{t:04d}", "context": " ".join(words[s:t]),
                          "choices": choices, "label": label})
            last = t
    rnd.shuffle(items)
    return items


YAML_FN = """task: {task}
custom_dataset: !function kjv_data.{fn}
test_split: test
output_type: {output_type}
{body}"""

BODY = {
    "kjv_word4": None,
    "kjv_cloze": """doc_to_text: "{{context}}"
doc_to_target: "{{target}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
metadata:
  version: 1.0
""",
    "kjv_next4": """doc_to_text: "{{context}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
}

BODY["kjv_word4"] = BODY["kjv_next4"]


def generate() -> dict[str, bytes]:
    """File name -> content of every generated file (JSONL, YAML, manifest)."""
    from pipeline.data.corpus import corpus_paragraphs, corpus_path, corpus_sha256

    paras = corpus_paragraphs("heldout")
    sets = {
        "kjv_cloze": (make_cloze(paras, random.Random(SEED)), "loglikelihood"),
        "kjv_next4": (make_next4(paras, random.Random(SEED + 1)), "multiple_choice"),
        "kjv_word4": (make_word4(paras, random.Random(SEED + 2), word_freq(corpus_path().read_text(encoding="utf-8"))), "multiple_choice"),
    }
    files: dict[str, bytes] = {}
    manifest = {"corpus_sha256": corpus_sha256(), "heldout_paragraphs": len(paras), "seed": SEED,
                "params": {k: v for k, v in globals().items() if k.startswith(("CLOZE_", "MC_", "W4_"))}, "tasks": {}}
    for task, (items, otype) in sets.items():
        data = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items).encode("utf-8")
        files[f"{task}.jsonl"] = data
        files[f"{task}.yaml"] = YAML_FN.format(task=task, fn=task, output_type=otype, body=BODY[task]).encode("utf-8")
        manifest["tasks"][task] = {"n": len(items), "output_type": otype, "sha256": hashlib.sha256(data).hexdigest()}
    files["manifest.json"] = (json.dumps(manifest, indent=1) + "\n").encode("utf-8")
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="fail if the shipped files differ from a fresh generation")
    a = ap.parse_args(argv)
    files = generate()
    stale = [name for name, data in files.items() if not (HERE / name).is_file() or (HERE / name).read_bytes() != data]
    if a.check:
        if stale:
            print(f"out of date: {', '.join(stale)} (run: python -m evals.tasks.generate)", file=sys.stderr)
            return 1
        print(f"{len(files)} files match")
        return 0
    for name, data in files.items():
        (HERE / name).write_bytes(data)
    print(f"wrote {', '.join(files)} to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
