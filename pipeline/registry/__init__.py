"""MLflow: the only package that imports mlflow (inside functions, so the CLI starts fast).

    tracking.py   which tracking URI, is it reachable, MLflow's limits and how its races look
    register.py   the registration job (runs, metrics, verified uploads, versions) and its concurrency design
    parts.py      each registration's part of the report on the build run, and their merge
    promotion.py  which aliases move when (candidate, production, recommended-<device>)
    cards.py      what MLflow shows: the build run's table, each version's download/serve commands
    pull.py       the pull job: a registered build into the local store
"""
