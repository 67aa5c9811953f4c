#!/usr/bin/env bash
# build-local-images.sh -- build CASPER's base images from what this machine can
# reach, so containers/Dockerfile and the compose meshes work with NO container
# registry (only a Debian package mirror and PyPI).
#
# Approach
#   1. casper-local/debian:bookworm
#        `debootstrap --variant=minbase bookworm` into a temporary directory, from
#        the Debian mirror this host's own apt already uses (parsed from
#        /etc/apt/sources.list.d/*.sources `URIs:` or /etc/apt/sources.list; no
#        mirror is named in the repository; CASPER_DEBIAN_MIRROR and
#        CASPER_DEBIAN_SECURITY_MIRROR override).  The root filesystem gets the
#        docker-image touches of debian:bookworm-slim (deb822 sources incl.
#        -updates/-security, policy-rc.d, docs/man/locales excluded, pending
#        updates applied) and is loaded with `docker import`.
#   2. casper-local/python:3.11-slim, casper-local/postgres:16, casper-local/redis:7
#        `docker build` of containers/local/<name>/Dockerfile FROM that image,
#        with Debian's python3.11 / postgresql-15 / redis-server.  How apt inside
#        the build reaches the mirror is probed once (--apt-mode=auto):
#          bridge  apt works in an ordinary container: plain `docker build`;
#          host    only with the host's network: `docker build --network host`;
#          debs    not at all: the host downloads each image's package closure
#                  (computed against the base image's dpkg status) into
#                  containers/local/debs/<name>/ and the build installs those
#                  files with no network.
#        In host/debs mode git is added to the python image, because the app
#        image's own `apt-get install git` could not reach the mirror either.
#   3. containers/wheels/: `pip download` of the app's dependencies (read from
#        pyproject.toml, plus its build requirements) for linux x86_64 cp311, so
#        building containers/Dockerfile needs no network.
#   4. --app: build the app image itself (containers/Dockerfile) on top.
#
# Idempotent and cached: an existing casper-local/debian image is reused (no
# debootstrap), docker's build cache makes unchanged images a no-op, wheels are
# re-downloaded only when an offline resolution against containers/wheels fails.
# --force rebuilds everything (new debootstrap, --no-cache, fresh wheels).
#
# Needs: root (debootstrap, apt-get), docker, python3 with pip (for wheels).
# Build logs: ${CASPER_LOCAL_CACHE:-/var/tmp/casper-local}/logs/.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
SUITE=bookworm
NS="${CASPER_LOCAL_NAMESPACE:-casper-local}"
DEBIAN_IMAGE="$NS/debian:$SUITE"
PYTHON_IMAGE="$NS/python:3.11-slim"
POSTGRES_IMAGE="$NS/postgres:16"
REDIS_IMAGE="$NS/redis:7"
APP_REPO="$NS/casper"
CACHE_DIR="${CASPER_LOCAL_CACHE:-/var/tmp/casper-local}"
LOG_DIR="$CACHE_DIR/logs"
WHEELS_DIR="$HERE/wheels"
DEBS_DIR="$HERE/local/debs"
MODE_FILE="$DEBS_DIR/.apt-mode"

FORCE=0
APT_MODE=auto
BUILD_APP=0
WHEELS=1
ALIAS_PUBLIC=0

usage() {
    cat <<EOF
Usage: $0 [--force] [--apt-mode=auto|bridge|host|debs] [--no-wheels] [--app] [--alias-public]

Builds $DEBIAN_IMAGE, $PYTHON_IMAGE, $POSTGRES_IMAGE, $REDIS_IMAGE
and downloads the app's wheels into containers/wheels/.

  --force          rebuild everything: new debootstrap, docker build --no-cache, fresh wheels
  --apt-mode=M     how apt inside docker builds gets packages (default: probe once, remembered
                   in containers/local/debs/.apt-mode; --force probes again)
  --no-wheels      skip the wheel download
  --app            also build the app image $APP_REPO:<version> and :latest from containers/Dockerfile
  --alias-public   also tag the images as python:3.11-slim, postgres:16 and redis:7, for compose
                   files that name the public images (shadows them on this engine only)

Then: docker build -f containers/Dockerfile --build-arg PYTHON_IMAGE=$PYTHON_IMAGE -t casper .
EOF
}

for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        --apt-mode=*) APT_MODE="${arg#*=}" ;;
        --no-wheels) WHEELS=0 ;;
        --app) BUILD_APP=1 ;;
        --alias-public) ALIAS_PUBLIC=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; usage >&2; exit 2 ;;
    esac
done
case "$APT_MODE" in auto|bridge|host|debs) ;; *) echo "bad --apt-mode: $APT_MODE" >&2; exit 2 ;; esac

# ---------------------------------------------------------------- helpers ----
T0=$SECONDS
TIMINGS=()
log()  { printf '[%s %4ds] %s\n' "$(date +%H:%M:%S)" "$((SECONDS - T0))" "$*"; }
warn() { log "WARNING: $*" >&2; }
die()  { log "ERROR: $*" >&2; exit 1; }
# timed LABEL CMD...: run CMD, remember how long it took for the summary.
timed() {
    local label="$1" start=$SECONDS; shift
    "$@"
    TIMINGS+=("$(printf '%-34s %5ds' "$label" "$((SECONDS - start))")")
}
image_exists() { docker image inspect "$1" >/dev/null 2>&1; }
image_id()     { docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true; }
# drop_replaced OLD_ID TAG: after a rebuild, remove the image TAG pointed to
# before, unless something still uses it (then docker refuses; that is fine).
drop_replaced() {
    if [ -n "$1" ] && [ "$1" != "$(image_id "$2")" ]; then
        docker rmi "$1" >/dev/null 2>&1 && log "  removed the replaced image ${1#sha256:}" || true
    fi
}
need_root()    { [ "$(id -u)" = 0 ] || die "$1 needs root (run with sudo)"; }

mkdir -p "$LOG_DIR" "$DEBS_DIR"
command -v docker >/dev/null || die "docker not found"
docker info >/dev/null 2>&1 || die "cannot talk to the docker engine"
[ "$(uname -m)" = x86_64 ] || warn "host is $(uname -m); images are native, wheels are for x86_64"

# ------------------------------------------------- Debian mirror detection ----
# Prints "URI SUITE..." for every deb source of this host's apt configuration.
host_apt_sources() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -e "$f" ] || continue
        # deb822: stanzas separated by blank lines; Types/URIs/Suites fields.
        awk '
            function flush() { if (types ~ /(^| )deb( |$)/ && enabled != "no")
                                   for (i = 1; i <= nu; i++) print u[i], suites
                               types = ""; suites = ""; nu = 0; enabled = "" }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            { key = tolower($1); sub(/:$/, "", key); $1 = ""; sub(/^ +/, "") }
            key == "types"   { types = $0 }
            key == "uris"    { nu = split($0, u, " ") }
            key == "suites"  { suites = $0 }
            key == "enabled" { enabled = tolower($0) }
            END { flush() }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -e "$f" ] || continue
        # one-line format: deb [options] URI SUITE COMPONENT...
        sed -E -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" | awk '$1 == "deb" { print $2, $3 }'
    done
}

detect_mirrors() {
    local sources
    sources="$(host_apt_sources)"
    MIRROR="${CASPER_DEBIAN_MIRROR:-}"
    SECURITY_MIRROR="${CASPER_DEBIAN_SECURITY_MIRROR:-}"
    if [ -z "$MIRROR" ]; then
        # first source carrying a plain release suite (not -security/-updates/-backports)
        MIRROR="$(awk '{ for (i = 2; i <= NF; i++) if ($i !~ /-(security|updates|backports|proposed-updates)$/ && $i !~ /\//) { print $1; exit } }' <<<"$sources")"
    fi
    if [ -z "$SECURITY_MIRROR" ]; then
        SECURITY_MIRROR="$(awk '{ for (i = 2; i <= NF; i++) if ($i ~ /-security$/) { print $1; exit } }' <<<"$sources")"
    fi
    [ -n "$MIRROR" ] || die "no Debian mirror found in /etc/apt; set CASPER_DEBIAN_MIRROR"
    MIRROR="${MIRROR%/}"; SECURITY_MIRROR="${SECURITY_MIRROR%/}"
    log "Debian mirror (from host apt config): $MIRROR${SECURITY_MIRROR:+  security: $SECURITY_MIRROR}"
}

# deb822 sources for the images: release + updates from MIRROR, security if known.
write_image_sources() {
    cat <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    if [ -n "$SECURITY_MIRROR" ]; then
        cat <<EOF

Types: deb
URIs: $SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    fi
}

# --------------------------------------------- 1. debootstrap + docker import ----
ROOTFS=""
cleanup_rootfs() {
    if [ -n "$ROOTFS" ] && [ -d "$ROOTFS" ]; then
        umount "$ROOTFS/proc" "$ROOTFS/sys" 2>/dev/null || true
        rm -rf --one-file-system "$ROOTFS"
    fi
}
trap cleanup_rootfs EXIT

ensure_debootstrap() {
    command -v debootstrap >/dev/null && return
    log "installing debootstrap with apt-get"
    apt-get install -y -q debootstrap >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q debootstrap >/dev/null; } \
        || die "could not install debootstrap"
}

# Make the bare minbase tree look like debian:bookworm-slim.
configure_rootfs() {
    local r="$1"
    rm -f "$r/etc/apt/sources.list"
    write_image_sources > "$r/etc/apt/sources.list.d/debian.sources"
    # Never start services from maintainer scripts inside images.
    printf '#!/bin/sh\nexit 101\n' > "$r/usr/sbin/policy-rc.d"
    chmod 755 "$r/usr/sbin/policy-rc.d"
    cat > "$r/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
# as debian:*-slim: no docs (but copyright), man pages, info or translations
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
    cat > "$r/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    printf 'Acquire::Languages "none";\n' > "$r/etc/apt/apt.conf.d/docker-no-languages"
    printf 'APT::AutoRemove::SuggestsImportant "false";\n' > "$r/etc/apt/apt.conf.d/docker-autoremove-suggests"

    # Fold in bookworm-updates/-security, as the published images are.
    log "applying pending updates inside the root filesystem (chroot)"
    mount -t proc proc "$r/proc"
    if chroot "$r" apt-get update -q -o APT::Update::Error-Mode=any >"$LOG_DIR/upgrade.log" 2>&1 \
       && chroot "$r" env DEBIAN_FRONTEND=noninteractive apt-get -y -q upgrade >>"$LOG_DIR/upgrade.log" 2>&1; then
        log "  $(grep -c '^Setting up' "$LOG_DIR/upgrade.log" || true) package(s) upgraded"
    else
        warn "could not apply updates (see $LOG_DIR/upgrade.log); continuing with the release packages"
    fi
    umount "$r/proc"

    # Slim down and strip host traces (docker bind-mounts resolv.conf/hostname/hosts).
    find "$r/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
    find "$r/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
    rm -rf "$r"/usr/share/{man,groff,info,lintian,linda,locale}/*
    rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/*.bin "$r"/var/cache/apt/archives/*.deb \
           "$r"/var/cache/debconf/*-old "$r"/var/lib/dpkg/*-old "$r"/tmp/* "$r"/var/tmp/*
    find "$r/var/log" -type f -delete
    : > "$r/etc/resolv.conf"
    echo localhost > "$r/etc/hostname"
    rm -f "$r/etc/machine-id"
}

build_debian_image() {
    if image_exists "$DEBIAN_IMAGE" && [ "$FORCE" = 0 ]; then
        log "$DEBIAN_IMAGE exists: reusing it (no debootstrap; --force to rebuild)"
        return
    fi
    local old_id
    old_id="$(image_id "$DEBIAN_IMAGE")"
    need_root "debootstrap"
    ensure_debootstrap
    ROOTFS="$(mktemp -d "${TMPDIR:-/var/tmp}/casper-rootfs.XXXXXX")"
    chmod 755 "$ROOTFS"
    log "debootstrap --variant=minbase $SUITE -> $ROOTFS (log: $LOG_DIR/debootstrap.log)"
    : > "$LOG_DIR/debootstrap.log"
    debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" >>"$LOG_DIR/debootstrap.log" 2>&1 \
        || { tail -20 "$LOG_DIR/debootstrap.log" >&2; die "debootstrap failed"; }
    configure_rootfs "$ROOTFS"
    log "docker import -> $DEBIAN_IMAGE ($(du -sh --one-file-system "$ROOTFS" | cut -f1))"
    tar --numeric-owner --xattrs -C "$ROOTFS" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' \
        --change "LABEL org.opencontainers.image.title=casper-local-debian org.opencontainers.image.description=\"debootstrap --variant=minbase $SUITE\"" \
        --message "debootstrap --variant=minbase $SUITE" \
        - "$DEBIAN_IMAGE" >/dev/null
    cleanup_rootfs
    ROOTFS=""
    drop_replaced "$old_id" "$DEBIAN_IMAGE"
}

# --------------------------------------------------- 2. apt inside builds ----
# probe_apt [docker run options...]: can a container of the base image use apt?
probe_apt() {
    docker run --rm "$@" "$DEBIAN_IMAGE" sh -c \
        'timeout 120 apt-get update -qq -o APT::Update::Error-Mode=any && apt-cache show --no-all-versions python3 >/dev/null' \
        >>"$LOG_DIR/apt-probe.log" 2>&1
}

choose_apt_mode() {
    if [ "$APT_MODE" != auto ]; then
        log "apt mode: $APT_MODE (from --apt-mode)"
    elif [ "$FORCE" = 0 ] && [ -s "$MODE_FILE" ]; then
        APT_MODE="$(cat "$MODE_FILE")"
        log "apt mode: $APT_MODE (probed earlier, remembered in ${MODE_FILE#"$REPO"/})"
    else
        log "probing how apt inside containers reaches the mirror (log: $LOG_DIR/apt-probe.log)"
        : > "$LOG_DIR/apt-probe.log"
        if probe_apt; then APT_MODE=bridge
        elif probe_apt --network host; then APT_MODE=host
        else APT_MODE=debs
        fi
        echo "$APT_MODE" > "$MODE_FILE"
        log "apt mode: $APT_MODE"
    fi
    case "$APT_MODE" in
        bridge) log "  -> apt-get runs inside docker build on the default network" ;;
        host)   log "  -> apt-get runs inside docker build with --network host" ;;
        debs)   log "  -> .deb files are downloaded on the host and copied into the builds" ;;
    esac
}

# package_list NAME: the packages of containers/local/NAME/packages (+ git for python
# when app builds cannot use apt themselves).
package_list() {
    grep -v -e '^#' -e '^[[:space:]]*$' "$HERE/local/$1/packages"
    if [ "$1" = python ] && [ "$APT_MODE" != bridge ]; then echo git; fi
}

# fetch_debs NAME: download the closure of NAME's packages that the base image lacks.
fetch_debs() {
    local name="$1" dir="$DEBS_DIR/$1" state="$CACHE_DIR/apt" pkgs stamp
    pkgs="$(package_list "$name" | tr '\n' ' ')"
    stamp="$(docker image inspect -f '{{.Id}}' "$DEBIAN_IMAGE") $pkgs"
    if [ "$FORCE" = 0 ] && [ -f "$dir/.stamp" ] && [ "$(cat "$dir/.stamp")" = "$stamp" ]; then
        log "  debs for $name up to date ($(ls "$dir"/*.deb 2>/dev/null | wc -l) files)"
        return
    fi
    need_root "downloading .debs with apt-get"
    rm -rf "$dir"; mkdir -p "$dir/partial" "$state/lists/partial" "$state/cache" "$state/sources.list.d"
    write_image_sources > "$state/sources.list.d/debian.sources"
    docker run --rm --network none "$DEBIAN_IMAGE" cat /var/lib/dpkg/status > "$state/status"
    # The host's apt, but with the image's sources, lists and dpkg status.
    local opts=(-q -o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$state/sources.list.d"
                -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null
                -o "Dir::State::Lists=$state/lists" -o "Dir::Cache=$state/cache"
                -o "Dir::State::status=$state/status" -o "Dir::Cache::archives=$dir"
                -o Debug::NoLocking=1 -o APT::Install-Recommends=false)
    log "  apt-get download (host) for $name: $pkgs"
    apt-get "${opts[@]}" update -o APT::Update::Error-Mode=any >>"$LOG_DIR/debs-$name.log" 2>&1 \
        || die "apt-get update with the image's sources failed (see $LOG_DIR/debs-$name.log)"
    # shellcheck disable=SC2086
    apt-get "${opts[@]}" install -y --download-only $pkgs >>"$LOG_DIR/debs-$name.log" 2>&1 \
        || die "downloading .debs failed (see $LOG_DIR/debs-$name.log)"
    rm -rf "$dir/partial" "$dir/lock"
    echo "$stamp" > "$dir/.stamp"
    log "  $(ls "$dir"/*.deb | wc -l) .deb files, $(du -sh "$dir" | cut -f1) in ${dir#"$REPO"/}"
}

# build_local NAME TAG
build_local() {
    local name="$1" tag="$2" args=() log_file="$LOG_DIR/build-$1.log" extra old_id
    old_id="$(image_id "$tag")"
    mkdir -p "$DEBS_DIR/$name"
    if [ "$APT_MODE" = debs ]; then
        fetch_debs "$name"
    else
        rm -rf "${DEBS_DIR:?}/$name"; mkdir -p "$DEBS_DIR/$name"     # network mode: empty
    fi
    args=(-f "$HERE/local/$name/Dockerfile" -t "$tag" --build-arg "BASE_IMAGE=$DEBIAN_IMAGE")
    case "$APT_MODE" in
        host) args+=(--network host) ;;
        debs) args+=(--network none) ;;   # proves the build needs no network
    esac
    [ "$FORCE" = 1 ] && args+=(--no-cache)
    if [ "$name" = python ]; then
        extra="$([ "$APT_MODE" = bridge ] || echo git)"
        args+=(--build-arg "EXTRA_PACKAGES=$extra")
    fi
    log "docker build $tag (log: $log_file)"
    if ! DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}" docker build "${args[@]}" "$HERE/local" >"$log_file" 2>&1; then
        tail -30 "$log_file" >&2
        die "docker build of $tag failed"
    fi
    log "  $(grep -c '^Step ' "$log_file") steps, $(grep -c 'Using cache' "$log_file") from cache -> $(image_id "$tag" | cut -c8-19)"
    drop_replaced "$old_id" "$tag"
}

# ------------------------------------------------------------- 3. wheels ----
# Requirements: pyproject's build-system.requires + project.dependencies
# (fallback list if there is no pyproject.toml or no tomllib).
requirements() {
    local fallback=('setuptools>=68' wheel pyzmq anthropic 'psycopg[binary]' psycopg-pool redis
                    msgpack psutil pydantic pydantic-settings prometheus-client rich docker)
    if [ -f "$REPO/pyproject.toml" ] && python3 -c 'import tomllib' 2>/dev/null; then
        python3 -c '
import sys, tomllib
data = tomllib.load(open(sys.argv[1], "rb"))
print("\n".join(data.get("build-system", {}).get("requires", []) + data["project"]["dependencies"]))
' "$REPO/pyproject.toml"
    else
        warn "no pyproject.toml (or no tomllib): using the built-in requirement list"
        printf '%s\n' "${fallback[@]}"
    fi
}

PIP_TARGET_ARGS=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311)
# pip does not widen an explicit --platform to older manylinux tags: list them all
# (manylinux_2_36 is bookworm's glibc).
for i in $(seq 36 -1 17); do PIP_TARGET_ARGS+=(--platform "manylinux_2_${i}_x86_64"); done
PIP_TARGET_ARGS+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)

# check_wheels REQFILE: resolve REQFILE offline from containers/wheels with the
# interpreter of $PYTHON_IMAGE itself.  pip download on the host evaluates
# environment markers with the *host's* Python (e.g. redis needs async-timeout
# only below 3.11.3, and Debian's python3 is 3.11.2), so only this proves the set
# complete.  Prints the requirements pip could not find.
check_wheels() {
    local out
    if out="$(docker run --rm --network none -e PIP_DISABLE_PIP_VERSION_CHECK=1 \
                -v "$WHEELS_DIR:/wheels:ro" -v "$1:/tmp/requirements.txt:ro" "$PYTHON_IMAGE" \
                python3 -m pip download -q --no-index --find-links /wheels -d /tmp/check \
                -r /tmp/requirements.txt 2>&1)"; then
        return 0
    fi
    echo "$out" >>"$LOG_DIR/wheels.log"
    sed -n 's/.*No matching distribution found for \([^;]*\).*/\1/p' <<<"$out" | sed 's/[[:space:]]*$//'
    return 1
}

download_wheels() {
    local reqs=() reqfile="$CACHE_DIR/requirements.txt" missing
    mapfile -t reqs < <(requirements)
    printf '%s\n' "${reqs[@]}" > "$reqfile"
    python3 -m pip --version >/dev/null 2>&1 || die "python3 -m pip is needed for the wheel download"
    [ "$FORCE" = 1 ] && rm -rf "$WHEELS_DIR"
    mkdir -p "$WHEELS_DIR"
    : > "$LOG_DIR/wheels.log"
    log "wheels: ${#reqs[@]} requirements -> ${WHEELS_DIR#"$REPO"/}"
    if [ -n "$(ls "$WHEELS_DIR"/*.whl 2>/dev/null)" ] && check_wheels "$reqfile" >/dev/null; then
        log "  up to date: everything resolves offline in $PYTHON_IMAGE from $(ls "$WHEELS_DIR"/*.whl | wc -l) wheels"
        return
    fi
    python3 -m pip download -q -d "$WHEELS_DIR" "${PIP_TARGET_ARGS[@]}" "${reqs[@]}" \
        >>"$LOG_DIR/wheels.log" 2>&1 || { tail -20 "$LOG_DIR/wheels.log" >&2; die "pip download failed"; }
    for _ in 1 2 3 4 5; do
        if missing="$(check_wheels "$reqfile")"; then
            log "  $(ls "$WHEELS_DIR"/*.whl | wc -l) wheels, $(du -sh "$WHEELS_DIR" | cut -f1); resolve offline in $PYTHON_IMAGE"
            return
        fi
        [ -n "$missing" ] || { tail -20 "$LOG_DIR/wheels.log" >&2; die "wheel set incomplete (see $LOG_DIR/wheels.log)"; }
        log "  marker-dependent requirement(s) for the image's Python: ${missing//$'\n'/ }"
        mapfile -t reqs < <(printf '%s\n' "$missing")
        python3 -m pip download -q -d "$WHEELS_DIR" "${PIP_TARGET_ARGS[@]}" "${reqs[@]}" \
            >>"$LOG_DIR/wheels.log" 2>&1 || { tail -20 "$LOG_DIR/wheels.log" >&2; die "pip download failed"; }
    done
    die "wheel set still incomplete after 5 rounds (see $LOG_DIR/wheels.log)"
}

# ----------------------------------------------------------- 4. app image ----
build_app() {
    local version source_url log_file="$LOG_DIR/build-app.log" args=() old_id
    old_id="$(image_id "$APP_REPO:latest")"
    [ -f "$REPO/pyproject.toml" ] || die "--app: no pyproject.toml in $REPO"
    version="$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$REPO/pyproject.toml")"
    args=(-f "$HERE/Dockerfile" --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" --build-arg "VERSION=$version"
          -t "$APP_REPO:$version" -t "$APP_REPO:latest")
    if source_url="$(git -C "$REPO" remote get-url origin 2>/dev/null)"; then
        args+=(--build-arg "SOURCE_URL=$source_url")
    fi
    [ "$APT_MODE" = host ] && args+=(--network host)
    [ "$FORCE" = 1 ] && args+=(--no-cache)
    log "docker build $APP_REPO:$version (containers/Dockerfile, log: $log_file)"
    if ! DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}" docker build "${args[@]}" "$REPO" >"$log_file" 2>&1; then
        tail -30 "$log_file" >&2
        die "docker build of the app image failed"
    fi
    log "  $(grep -c '^Step ' "$log_file") steps, $(grep -c 'Using cache' "$log_file") from cache -> $(image_id "$APP_REPO:latest" | cut -c8-19)"
    drop_replaced "$old_id" "$APP_REPO:latest"
    # The classic builder leaves every builder stage as an untagged image; the
    # newest one carries the dependency layer cache, older ones are garbage.
    local stale
    stale="$(docker images -q --filter dangling=true --filter label=org.casper.stage=builder | tail -n +2)"
    if [ -n "$stale" ]; then
        # shellcheck disable=SC2086
        docker rmi $stale >/dev/null 2>&1 || true
        log "  removed $(wc -w <<<"$stale") stale builder-stage image(s)"
    fi
}

# ------------------------------------------------------------------ main ----
log "CASPER local images (force=$FORCE, apt-mode=$APT_MODE)"
detect_mirrors
timed "debian (debootstrap + import)" build_debian_image
choose_apt_mode
timed "python image" build_local python "$PYTHON_IMAGE"
timed "postgres image" build_local postgres "$POSTGRES_IMAGE"
timed "redis image" build_local redis "$REDIS_IMAGE"
if [ "$WHEELS" = 1 ]; then timed "wheels (pip download)" download_wheels; fi
if [ "$BUILD_APP" = 1 ]; then timed "app image" build_app; fi
if [ "$ALIAS_PUBLIC" = 1 ]; then
    docker tag "$PYTHON_IMAGE" python:3.11-slim
    docker tag "$POSTGRES_IMAGE" postgres:16
    docker tag "$REDIS_IMAGE" redis:7
    log "tagged python:3.11-slim, postgres:16, redis:7 as aliases of the local images"
fi

log "done in $((SECONDS - T0))s"
printf '  %s\n' "${TIMINGS[@]}"
docker images --format '{{.Repository}}:{{.Tag}}\t{{.Size}}\t{{.ID}}' | awk -v ns="$NS/" 'index($0, ns) == 1 { print "  " $0 }' | sort
cat <<EOF
Build the app image offline with:
  docker build -f containers/Dockerfile --build-arg PYTHON_IMAGE=$PYTHON_IMAGE -t casper $REPO
EOF
