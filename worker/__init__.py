"""The engine (claim, lease, outcomes, rescue), the worker pool, and the executors."""
