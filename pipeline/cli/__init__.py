"""The `quantforge` command line: one module per command, each owning its typer app."""
