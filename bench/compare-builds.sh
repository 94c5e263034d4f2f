#!/usr/bin/env bash
# Deliver throughput of this checkout against another build (a commit), alternately, 3 rounds:
#   DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres bash bench/compare-builds.sh 0f285cb
# The other build runs from a git worktree through PYTHONPATH, with this checkout's venv.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATABASE_URL:?set DATABASE_URL to a server where scratch databases may be created}"
rev=${1:?give the commit to compare with}
here=$(pwd)
other=$(mktemp -d)
trap 'git -C "$here" worktree remove --force "$other"' EXIT
git worktree add -q --detach "$other" "$rev"
cd /tmp  # neither checkout on the path but the one PYTHONPATH names
for round in 1 2 3; do
  for build in "$rev" this; do
    if [ "$build" = this ]; then path=$here; else path=$other; fi
    PYTHONPATH=$path "$here/.venv/bin/python" -m pgdispatch bench --scenario deliver --vs none --rounds 1 --json \
      2>/dev/null | "$here/.venv/bin/python" -c "
import json, sys
rows = {r['system']: r['value'] for r in json.load(sys.stdin)['results']}
print(f'round $round, build $build: pgdispatch {rows[\"pgdispatch\"]} deliveries/s, bare client {rows[\"bare client\"]}')"
  done
done
