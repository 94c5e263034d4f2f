#!/bin/sh
# The entrypoint of the CI's PostgreSQL image built from Debian packages (.ci/postgres-image): it
# honours what testcontainers sets, as the official image does: POSTGRES_USER (the superuser),
# POSTGRES_PASSWORD, POSTGRES_DB.
set -eu
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_PASSWORD:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
BIN=$(ls -d /usr/lib/postgresql/*/bin | tail -1)
PGDATA=/var/lib/postgresql/data
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    printf '%s\n' "$POSTGRES_PASSWORD" > /tmp/pwfile
    chown postgres /tmp/pwfile
    runuser -u postgres -- "$BIN/initdb" -D "$PGDATA" -U "$POSTGRES_USER" --pwfile=/tmp/pwfile -E UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f /tmp/pwfile
    echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
    printf 'host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n' >> "$PGDATA/pg_hba.conf"
    if [ "$POSTGRES_DB" != "postgres" ]; then
        echo "CREATE DATABASE \"$POSTGRES_DB\"" | runuser -u postgres -- "$BIN/postgres" --single -D "$PGDATA" postgres >/dev/null
    fi
fi
exec runuser -u postgres -- "$BIN/postgres" -D "$PGDATA"
