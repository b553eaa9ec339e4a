"""MLflow: the only package that imports mlflow (inside functions, so the CLI starts fast)."""
