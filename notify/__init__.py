"""LISTEN/NOTIFY: the listener, wake-ups, and the caches it keeps fresh."""

JOBS_CHANNEL = "dispatch_jobs"
CONFIG_CHANNEL = "dispatch_config"
