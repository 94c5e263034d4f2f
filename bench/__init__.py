"""Benchmarks: pgdispatch side by side with its peers (`pgdispatch bench`).

Only the scenario names live here: the CLI lists them without importing the harness."""

SCENARIOS = ("drain", "deliver", "latency", "latency-backlog", "cost", "sweep", "backlog", "poll", "review",
             "memory", "enqueue", "limits", "limits-pools", "processes", "leads", "calls", "dashboard")
