"""Load a TensorRT-LLM engine folder in the LLM API's TensorRT backend and greedily generate 8 tokens.

Run as ``python -m pipeline.targets.tensorrt.smoke ENGINE_DIR`` (a child process: a
failing engine load must fail one stage, not the build); prints one JSON line.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    from pipeline.core.proc import die_with_parent

    die_with_parent()
    from tensorrt_llm import SamplingParams
    from tensorrt_llm._tensorrt_engine import LLM

    llm = LLM(model=argv[0], tokenizer=argv[0])
    out = llm.generate(["The"], SamplingParams(max_tokens=8))
    print(json.dumps({"text": out[0].outputs[0].text, "token_ids": list(out[0].outputs[0].token_ids)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
