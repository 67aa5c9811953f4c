#!/bin/sh
# casper-entrypoint: run casperd as the user casper.
#
# Started as root: become casper (uid 10001) at once, with exactly the capabilities casperd needs
# to run task code as casper-task (uid 10002) — SETUID, SETGID, CHOWN, KILL — as ambient
# capabilities and as the whole bounding set, so nothing can regain any other.  Task code itself
# gets none (casperd clears the ambient set and sets no_new_privs before it runs a command).
# Started as any other user: run casperd as that user (task code then runs as it too).
set -eu
if [ "$(id -u)" = 0 ]; then
    caps=-all,+setuid,+setgid,+chown,+kill
    exec setpriv --reuid=casper --regid=casper --init-groups \
        --inh-caps="$caps" --ambient-caps="$caps" --bounding-set="$caps" \
        -- casperd "$@"
fi
exec casperd "$@"
