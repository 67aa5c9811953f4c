#!/usr/bin/env bash
# Entrypoint of casper-local/postgres:16: the part of the official postgres
# image's docker-entrypoint.sh that compose files rely on.
#
# First start (no $PGDATA/PG_VERSION): initdb as POSTGRES_USER (default postgres)
# with POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE, local socket trusted, every
# other host via POSTGRES_HOST_AUTH_METHOD (default scram-sha-256); create
# POSTGRES_DB (default: the user's name); run /docker-entrypoint-initdb.d/*
# against a socket-only temporary server.  Every start: exec postgres as user
# postgres, listening on '*' (set in postgresql.conf.sample at image build).
set -Eeuo pipefail

# file_env VAR [DEFAULT]: VAR from $VAR or from the file named by $VAR_FILE.
file_env() {
    local var="$1" fileVar="${1}_FILE" def="${2:-}" val
    if [ "${!var:-}" ] && [ "${!fileVar:-}" ]; then
        echo >&2 "error: both $var and $fileVar are set (but are exclusive)"
        exit 1
    fi
    val="$def"
    if [ "${!var:-}" ]; then
        val="${!var}"
    elif [ "${!fileVar:-}" ]; then
        val="$(< "${!fileVar}")"
    fi
    export "$var"="$val"
    unset "$fileVar"
}

# `docker run IMAGE -c shared_buffers=256MB` means postgres with those options.
if [ "${1:0:1}" = '-' ]; then
    set -- postgres "$@"
fi

if [ "$1" != 'postgres' ]; then
    exec "$@"
fi

if [ "$(id -u)" = '0' ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA" || :
    chmod 3777 /var/run/postgresql
    find "$PGDATA" \! -user postgres -exec chown postgres:postgres '{}' +
    find /var/run/postgresql \! -user postgres -exec chown postgres:postgres '{}' +
    exec setpriv --reuid=postgres --regid=postgres --init-groups "${BASH_SOURCE[0]}" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    file_env POSTGRES_PASSWORD
    file_env POSTGRES_USER postgres
    file_env POSTGRES_DB "$POSTGRES_USER"
    file_env POSTGRES_INITDB_ARGS
    : "${POSTGRES_HOST_AUTH_METHOD:=scram-sha-256}"

    if [ -z "$POSTGRES_PASSWORD" ] && [ "$POSTGRES_HOST_AUTH_METHOD" != trust ]; then
        cat >&2 <<'MSG'
Error: Database is uninitialized and superuser password is not specified.
       Set POSTGRES_PASSWORD (or POSTGRES_PASSWORD_FILE) to a non-empty value,
       or POSTGRES_HOST_AUTH_METHOD=trust to allow every connection without one.
MSG
        exit 1
    fi

    echo "entrypoint: initialising $PGDATA (user $POSTGRES_USER, database $POSTGRES_DB)"
    initdb_args=(--username="$POSTGRES_USER" --encoding=UTF8 --locale=C.UTF-8)
    # shellcheck disable=SC2086  # POSTGRES_INITDB_ARGS is word-split on purpose
    if [ -n "$POSTGRES_PASSWORD" ]; then
        initdb "${initdb_args[@]}" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") $POSTGRES_INITDB_ARGS
    else
        initdb "${initdb_args[@]}" $POSTGRES_INITDB_ARGS
    fi

    # initdb trusts the local socket and loopback; everything else authenticates.
    printf '\n# added by docker-entrypoint.sh\nhost all all all %s\n' \
        "$POSTGRES_HOST_AUTH_METHOD" >> "$PGDATA/pg_hba.conf"

    # Temporary server for database creation and init scripts: no TCP, and its
    # socket in a private directory, so that a healthcheck's pg_isready does not
    # report "ready" before initialisation has finished.  Init scripts get PGHOST.
    init_socket_dir="$(mktemp -d)"
    pg_ctl -D "$PGDATA" -w start \
        -o "-c listen_addresses='' -c unix_socket_directories=$init_socket_dir -p ${PGPORT:-5432}"
    export PGHOST="$init_socket_dir"
    psql_base=(psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --no-password --no-psqlrc)
    if [ "$POSTGRES_DB" != postgres ]; then
        "${psql_base[@]}" --dbname postgres --set db="$POSTGRES_DB" <<<'CREATE DATABASE :"db";'
    fi
    for f in /docker-entrypoint-initdb.d/*; do
        [ -e "$f" ] || continue
        case "$f" in
            *.sh)
                # shellcheck disable=SC1090
                if [ -x "$f" ]; then echo "entrypoint: running $f"; "$f"
                else echo "entrypoint: sourcing $f"; . "$f"; fi ;;
            *.sql)    echo "entrypoint: running $f"; "${psql_base[@]}" --dbname "$POSTGRES_DB" -f "$f" ;;
            *.sql.gz) echo "entrypoint: running $f"; gunzip -c "$f" | "${psql_base[@]}" --dbname "$POSTGRES_DB" ;;
            *)        echo "entrypoint: ignoring $f" ;;
        esac
    done
    pg_ctl -D "$PGDATA" -m fast -w stop
    unset PGHOST
    rmdir "$init_socket_dir"
    echo "entrypoint: init complete; ready for start up"
fi

exec "$@"
