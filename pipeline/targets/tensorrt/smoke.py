"""Load a TensorRT-LLM engine folder in the LLM API's TensorRT backend and greedily generate 8 tokens.

A child process (:func:`pipeline.core.proc.call`, request ``{"engine_dir": ...}``): a failing
engine load must fail one stage, not the build. The result is the generated text and token ids.
"""

from __future__ import annotations

import sys


def handle(request: dict) -> dict:
    from tensorrt_llm import SamplingParams
    from tensorrt_llm._tensorrt_engine import LLM

    engine = request["engine_dir"]
    llm = LLM(model=engine, tokenizer=engine)
    out = llm.generate(["The"], SamplingParams(max_tokens=8))
    return {"text": out[0].outputs[0].text, "token_ids": list(out[0].outputs[0].token_ids)}


if __name__ == "__main__":
    from pipeline.core.proc import serve

    sys.exit(serve(handle))
