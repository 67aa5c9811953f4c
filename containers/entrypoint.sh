#!/bin/sh
# casper-entrypoint: run casperd as the user casper.
#
# Started as root: become casper (uid 10001) at once, with exactly the capabilities casperd needs
# to run task code as casper-task (uid 10002) — SETUID, SETGID, CHOWN, KILL — as ambient
# capabilities and as the whole bounding set, so nothing can regain any other.  Task code itself
# gets none (casperd clears the ambient set and sets no_new_privs before it runs a command).
# compose.yaml, compose.swarm.yaml and the docker spawner start containers this way (as root,
# cap_drop ALL, cap_add exactly those four; no-new-privileges keeps ambient capabilities).
# Started as any other user: run casperd as that user (task code then runs as it too).
#
#   casper-entrypoint caspectl ARGS...   run caspectl as casper with no capabilities (the
#                                        healthcheck: it runs as the container's user, root,
#                                        which cannot reach casper's 0600 control socket)
set -eu
if [ "${1:-}" = caspectl ]; then
    if [ "$(id -u)" = 0 ]; then
        exec setpriv --reuid=casper --regid=casper --init-groups --inh-caps=-all -- "$@"
    fi
    exec "$@"
fi
if [ "$(id -u)" = 0 ]; then
    caps=-all,+setuid,+setgid,+chown,+kill
    exec setpriv --reuid=casper --regid=casper --init-groups \
        --inh-caps="$caps" --ambient-caps="$caps" --bounding-set="$caps" \
        -- casperd "$@"
fi
exec casperd "$@"
