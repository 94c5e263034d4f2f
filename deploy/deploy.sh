#!/usr/bin/env bash
# A deploy, in the order that keeps every job safe (run from the project checkout on each host).
set -euo pipefail
cd /srv/myproject
git pull --ff-only
.venv/bin/pip install -q -e .
.venv/bin/pgdispatch migrate                    # idempotent; one migrator at a time (advisory lock)
.venv/bin/pgdispatch build stamp                # var/build/version = {git-sha}-{UTC timestamp}
# Workers on the old build exit with 10 as soon as a job of the new build waits (--exit-on-newer)
# and come back on the new code; a restart now makes every pool pick it up at once.
sudo systemctl restart 'pgdispatch@*'          # graceful: SIGTERM, --grace for running jobs
