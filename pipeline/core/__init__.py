"""The machinery every stage shares: the stage contract and its key, the store, plans, the runner, reports, child processes."""
