"""Machinery shared by sources, targets and evals, below all of them.

* :mod:`pipeline.backends.llamacpp`: quantforge's llama.cpp build (tools, the Python binding,
  its version and backend) and the process that runs it;
* :mod:`pipeline.backends.gguf_header`: a fast GGUF header scan (tensor types and sizes, metadata);
* :mod:`pipeline.backends.devices`: the one accelerator probe (which devices are here, which GPU,
  how much memory) and the device fingerprint results are keyed by;
* :mod:`pipeline.backends.modelopt`: ModelOpt checkpoints read back and dequantized by their layout;
* :mod:`pipeline.backends.pipe`: calls into an object living in another process (llama.cpp's).

Nothing here imports sources, targets, evals or the CLI (core's launcher and stage helpers only).
"""
