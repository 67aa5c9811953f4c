#!/usr/bin/env bash
# make-secrets.sh -- the secret files compose.yaml mounts under /run/secrets.
#
#   containers/make-secrets.sh [DIR] [EXTRA_NODE...]
#
# DIR defaults to containers/secrets (git-ignored).  compose.yaml reads them from
# ${CASPER_SECRETS_DIR:-./containers/secrets}, so a DIR elsewhere needs
# CASPER_SECRETS_DIR=DIR when running docker-compose.
#
# What it makes (idempotent: an existing file is kept, only its owner and mode are
# set again, so a re-run never rotates a key or a password):
#
#   postgres_password       the Postgres password, for the postgres service
#                           (POSTGRES_PASSWORD_FILE); owned by the image's postgres user
#   database_password       the same password, for the policeman
#                           (CASPER_DATABASE_PASSWORD_FILE); owned by uid 10001
#   NODE.key / NODE.pub     a CurveZMQ key pair for each of policeman, developer-1,
#                           developer-2, tester and every EXTRA_NODE (z85 text files);
#                           every node also gets policeman.pub (the broker's key)
#   developer-pool.key/.pub the developer pool's key pair, shared by the developers nobody names
#                           in advance: the docker spawner's containers (compose.spawner.yaml)
#                           and the Swarm stack's developer replicas (compose.swarm.yaml)
#   anthropic_api_key       the Claude API key: $ANTHROPIC_API_KEY if set when the file is
#                           first made, else empty (nothing in the mesh needs it yet)
#   redis_password          Redis' requirepass (read by the redis service at start and by
#                           every casperd: CASPER_REDIS_PASSWORD_FILE)
#   cache_key               the mesh key that signs result-cache entries (CASPER_CACHE_KEY_FILE)
#   authorized_keys         the enrollment: every NAME.pub in DIR with its node id (or pattern)
#                           and role: policeman -> policeman; developer-N, tester-N -> their own
#                           id; the pool key developer-pool -> 'developer-pool-*'; the Swarm
#                           tester service's key tester -> 'tester*' (and an older stack's
#                           shared developer key, developer -> 'developer-*').  An id enrolled
#                           exactly is reserved to its key: no pattern admits it (casperd's
#                           rule), so the pool can never claim developer-1.  A node's line is replaced when its key changes (delete
#                           NAME.key/NAME.pub and run again to rotate); lines added by hand
#                           (caspectl keys add --file DIR/authorized_keys) are kept.  Rewritten in
#                           place, so running containers that mount it see the change.
#
# Ownership and mode.  docker-compose v1 has no Swarm secret store: it bind-mounts each
# secret file read-only, with the host file's owner and mode.  So every file is mode 0400
# and owned by the user that reads it in its container: uid/gid 10001 (user casper of
# containers/Dockerfile) for the casper services, and the postgres user of
# $POSTGRES_IMAGE for postgres_password (the postgres entrypoint drops to that user
# before it reads POSTGRES_PASSWORD_FILE).  That uid is read from the image when it is
# present locally (`docker run --rm --entrypoint id IMAGE postgres`); otherwise
# POSTGRES_UID/POSTGRES_GID, defaulting to 70:70, the user of the public
# postgres:16-alpine.  Setting owners needs root: run the script as root (or with sudo).
# Run as another user it asks Docker to chown (anyone who may use Docker is root-equivalent
# anyway); if that is impossible too it warns and leaves the files as they are.  Note
# that after the chown the invoking (non-root) user can no longer read or delete the
# files without sudo or Docker.
#
# Key generation: `caspectl keygen DIR NAME`, from $CASPECTL, the repository's .venv,
# or PATH; without one, `docker run --rm --entrypoint caspectl $CASPER_IMAGE:$VERSION
# keygen` (defaults casper:latest; set CASPER_IMAGE=casper-local/casper on a machine
# with no registry).
#
# Environment: CASPER_IMAGE, VERSION, POSTGRES_IMAGE (default postgres:16-alpine),
# POSTGRES_UID, POSTGRES_GID, CASPECTL, ANTHROPIC_API_KEY.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
DIR="${1:-$HERE/secrets}"
[ $# -gt 0 ] && shift
NODES=(policeman developer-1 developer-2 tester developer-pool "$@")
CASPER_UID=10001
CASPER_GID=10001
APP_IMAGE="${CASPER_IMAGE:-casper}:${VERSION:-latest}"
PG_IMAGE="${POSTGRES_IMAGE:-postgres:16-alpine}"

log() { printf 'make-secrets: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

for n in "${NODES[@]}"; do
    [[ "$n" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || die "bad node name '$n' (letters, digits, . _ -)"
done

have_docker() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; }

umask 077
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
chmod 0700 "$DIR" 2>/dev/null || true

# --- the Postgres password (one value, two files) -----------------------------------------
random_password() {
    # 48 hex digits (192 bits): no quoting trouble in URLs, shells or pg_hba
    od -An -tx1 -N24 /dev/urandom | tr -d ' \n'
}
if [ -s "$DIR/postgres_password" ]; then
    password="$(cat "$DIR/postgres_password")"
elif [ -s "$DIR/database_password" ]; then
    password="$(cat "$DIR/database_password")"
else
    password="$(random_password)"
    log "new Postgres password"
fi
for f in postgres_password database_password; do
    if [ ! -s "$DIR/$f" ]; then
        printf '%s\n' "$password" >"$DIR/$f.tmp"
        mv -f "$DIR/$f.tmp" "$DIR/$f"
    fi
done
unset password

# --- anthropic_api_key (may be empty) -------------------------------------------------------
if [ ! -e "$DIR/anthropic_api_key" ]; then
    printf '%s' "${ANTHROPIC_API_KEY:-}" >"$DIR/anthropic_api_key"
    log "anthropic_api_key: $([ -n "${ANTHROPIC_API_KEY:-}" ] && echo 'from $ANTHROPIC_API_KEY' || echo empty)"
fi

# --- Redis password and the cache signing key ----------------------------------------------
for f in redis_password cache_key; do
    if [ ! -s "$DIR/$f" ]; then
        random_password >"$DIR/$f.tmp"
        printf '\n' >>"$DIR/$f.tmp"
        mv -f "$DIR/$f.tmp" "$DIR/$f"
        log "new $f"
    fi
done

# --- Curve key pairs --------------------------------------------------------------------------
find_caspectl() {
    local c
    for c in "${CASPECTL:-}" "$REPO/.venv/bin/caspectl" "$(command -v caspectl 2>/dev/null || true)"; do
        if [ -n "$c" ] && [ -x "$c" ] && "$c" --version >/dev/null 2>&1; then
            echo "$c"
            return 0
        fi
    done
    return 1
}
KEYGEN_TMP=""
trap '[ -z "$KEYGEN_TMP" ] || rm -rf "$KEYGEN_TMP"' EXIT
keygen() {  # keygen NAME: writes NAME.key and NAME.pub into $DIR
    local name="$1" tmp
    tmp="$(mktemp -d "$DIR/.keygen.XXXXXX")"
    KEYGEN_TMP="$tmp"
    if [ -n "${CTL:-}" ]; then
        "$CTL" keygen "$tmp" "$name" >/dev/null
    else
        have_docker || die "no caspectl (venv or PATH) and no Docker to run $APP_IMAGE: cannot make Curve keys"
        chmod 0777 "$tmp"  # whoever the container runs as may write there
        docker run --rm --network none --user "$(id -u):$(id -g)" -v "$tmp:/keys" \
            --entrypoint caspectl "$APP_IMAGE" keygen /keys "$name" >/dev/null
    fi
    [ -s "$tmp/$name.key" ] && [ -s "$tmp/$name.pub" ] || die "keygen wrote no key pair for $name"
    mv -f "$tmp/$name.pub" "$DIR/$name.pub"
    mv -f "$tmp/$name.key" "$DIR/$name.key"
    rmdir "$tmp"
    KEYGEN_TMP=""
}
CTL="$(find_caspectl || true)"
for n in "${NODES[@]}"; do
    if [ -s "$DIR/$n.key" ] && [ -s "$DIR/$n.pub" ]; then
        continue
    fi
    keygen "$n"
    log "new Curve key pair for $n${CTL:+ ($CTL)}"
done

# --- enrollment: authorized_keys ------------------------------------------------------------
enrollment_of() {  # NAME -> "PATTERN ROLE"
    case "$1" in
        policeman) echo "policeman policeman" ;;
        developer-pool) echo "developer-pool-* developer" ;;
        developer) echo "developer-* developer" ;;
        tester) echo "tester* tester" ;;
        developer*) echo "$1 developer" ;;
        tester*) echo "$1 tester" ;;
        *) return 1 ;;
    esac
}
ak="$DIR/authorized_keys"
[ -e "$ak" ] || : >"$ak"
new_ak="$(mktemp "$DIR/.authorized_keys.XXXXXX")"
cp "$ak" "$new_ak"
for pub in "$DIR"/*.pub; do
    [ -e "$pub" ] || continue
    name="$(basename "$pub" .pub)"
    if ! spec="$(enrollment_of "$name")"; then
        log "not enrolling $name.pub: cannot tell its role (policeman, developer*, tester*)"
        continue
    fi
    key="$(tr -d ' \n' <"$pub")"
    pattern="${spec% *}"
    role="${spec#* }"
    if grep -qxF -- "$key $pattern $role" "$new_ak"; then
        continue
    fi
    # the node's earlier key (if any) goes: this key replaces it
    awk -v p="$pattern" -v r="$role" '!($2 == p && $3 == r)' "$new_ak" >"$new_ak.2" && mv -f "$new_ak.2" "$new_ak"
    printf '%s %s %s\n' "$key" "$pattern" "$role" >>"$new_ak"
    log "enrolled $name as $pattern ($role)"
done
cat "$new_ak" >"$ak"  # in place: a bind-mounted file keeps its inode
rm -f "$new_ak"

# --- owners and modes -----------------------------------------------------------------------
pg_ids() {  # "UID:GID" of the postgres user of $PG_IMAGE
    if [ -n "${POSTGRES_UID:-}" ]; then
        echo "$POSTGRES_UID:${POSTGRES_GID:-$POSTGRES_UID}"
        return
    fi
    if have_docker && docker image inspect "$PG_IMAGE" >/dev/null 2>&1; then
        local u g
        u="$(docker run --rm --network none --entrypoint id "$PG_IMAGE" -u postgres 2>/dev/null || true)"
        g="$(docker run --rm --network none --entrypoint id "$PG_IMAGE" -g postgres 2>/dev/null || true)"
        if [[ "$u" =~ ^[0-9]+$ && "$g" =~ ^[0-9]+$ ]]; then
            echo "$u:$g"
            return
        fi
    fi
    log "$PG_IMAGE not present locally: assuming its postgres user is 70:70 (postgres:16-alpine);" \
        "set POSTGRES_UID/POSTGRES_GID otherwise"
    echo "70:${POSTGRES_GID:-70}"
}
PG_IDS="$(pg_ids)"

casper_files=(database_password anthropic_api_key redis_password cache_key authorized_keys)
for n in "${NODES[@]}"; do casper_files+=("$n.key" "$n.pub"); done
# every key pair already in DIR (e.g. from an earlier run with EXTRA_NODEs) stays readable
for f in "$DIR"/*.key "$DIR"/*.pub; do
    [ -e "$f" ] && casper_files+=("$(basename "$f")")
done

if [ "$(id -u)" = 0 ]; then
    (cd "$DIR" && chown "$CASPER_UID:$CASPER_GID" "${casper_files[@]}" && chown "$PG_IDS" postgres_password \
        && chmod 0400 "${casper_files[@]}" postgres_password)
elif have_docker; then
    log "not root: setting owners through Docker ($APP_IMAGE)"
    docker run --rm --network none --user 0 -v "$DIR:/s" -w /s --entrypoint sh "$APP_IMAGE" -c \
        'chown "$1" postgres_password && chmod 0400 postgres_password && shift &&
         u="$1" && shift && chown "$u" "$@" && chmod 0400 "$@"' \
        sh "$PG_IDS" "$CASPER_UID:$CASPER_GID" "${casper_files[@]}"
else
    log "WARNING: not root and no Docker: owners left as they are; the containers may not be able" \
        "to read the secrets (run as root, or chown to $CASPER_UID and $PG_IDS yourself)"
    (cd "$DIR" && chmod 0400 "${casper_files[@]}" postgres_password)
fi
log "secrets in $DIR (casper files: uid $CASPER_UID, postgres_password: $PG_IDS, all 0400)"
