#!/usr/bin/env bash
# 20,000 send_request rows to one host, drained by `pgdispatch worker --drain` with the default
# settings (200 slots, --per-host-limit 64). Prints the exit code, the time, and the outcomes.
#   DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres bash bench/one-host-drain.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATABASE_URL:?set DATABASE_URL to a server where a scratch database may be created}"
py=.venv/bin/python
db="pgd_onehost_$RANDOM"
admin=$DATABASE_URL
url=$($py -c "import psycopg, sys; print(psycopg.conninfo.make_conninfo(sys.argv[1], dbname=sys.argv[2]))" "$admin" "$db")
psql -q "$admin" -c "CREATE DATABASE $db"
trap 'kill $sink 2>/dev/null || true; psql -q "$admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"' EXIT
DATABASE_URL=$url $py -m pgdispatch migrate >/dev/null
port=$($py -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
$py -m pgdispatch.bench.sink --port "$port" --status 200 >/dev/null &
sink=$!
sleep 0.5
psql -q "$url" -c "SELECT count(dispatch.send_request('POST', 'http://127.0.0.1:$port/hook', '{}')) FROM generate_series(1, 20000)" >/dev/null
start=$(date +%s.%N)
code=0
DATABASE_URL=$url PGDISPATCH_LOG=WARNING $py -m pgdispatch worker --drain --allow-private-networks 2>/dev/null || code=$?
end=$(date +%s.%N)
echo "exit $code, $(echo "$end - $start" | bc) s"
psql "$url" -At -c "SELECT outcome, count(*) FROM dispatch.job_history GROUP BY 1 ORDER BY 1" \
     -c "SELECT 'left queued', count(*) FROM dispatch.jobs"
