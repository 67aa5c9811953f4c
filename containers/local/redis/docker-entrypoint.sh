#!/bin/sh
# Entrypoint of casper-local/redis:7, modelled on the official redis image's.
#  * `docker run IMAGE --appendonly yes` or `IMAGE my.conf` run redis-server;
#  * as root, /data is handed to user redis and the server drops privileges;
#  * the official image compiles protected mode off; Debian's binary has it on,
#    so `--protected-mode no` is inserted *before* the caller's options (after the
#    config file, if any): a caller's own `--protected-mode yes` still wins.
set -eu

if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
    set -- redis-server "$@"
fi

if [ "$1" = redis-server ] && [ "$(id -u)" = 0 ]; then
    find . \! -user redis -exec chown redis '{}' +
    exec setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"
fi

if [ "$1" = redis-server ]; then
    shift
    case "${1:-}" in
        -v|--version|-h|--help|--test-memory|--check-system)
            set -- redis-server "$@" ;;          # informational: leave untouched
        -|*.conf)
            conf=$1; shift
            set -- redis-server "$conf" --protected-mode no "$@" ;;
        *)
            set -- redis-server --protected-mode no "$@" ;;
    esac
    um="$(umask)"
    if [ "$um" = 0022 ]; then umask 0077; fi
fi

exec "$@"
