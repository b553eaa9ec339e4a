"""How artifacts are judged: accuracy and speed per device, gates, presentation.

Entry point for the CLI: :func:`evals.run.evaluate`. Nothing heavy is imported
here, so ``import evals`` stays cheap.
"""
