#!/usr/bin/env bash
# Build the Switchboard image from the Dockerfile and run it for real.
#
#   scripts/container_check.sh          # from anywhere; uses $PYTHON (default: python3)
#
# 1. A Docker engine: `docker info`, or else start one (root only) as
#      dockerd --iptables=false --ip6tables=false --bridge=none --storage-driver overlay2
#    and leave it running for the next run (its log: ${TMPDIR:-/tmp}/switchboard-dockerd.log).
# 2. The base image $SWITCHBOARD_BASE_IMAGE (default local/python:3.11), built once and
#    then reused by tag: Docker Hub may be unreachable, so it is Debian bookworm (Python
#    3.11) from debootstrap and the host's Debian mirror. The host's local certificate
#    authorities (/usr/local/share/ca-certificates) and pip index are copied into that
#    base image when it is built, so pip inside the build reaches PyPI the way the host
#    does; nothing from the host goes into the repository.
# 3. `docker build --network host --build-arg PYTHON=<base>` of the repository.
# 4. scripts/container_check.py runs the image and checks it (see that file).
#
# Exit status: 0 all checks passed; 1 a check failed; 77 no engine can be used here
# (the reason is printed on the last line, prefixed "container check: SKIP").
# The project's virtualenv python must be $PYTHON (or first on PATH): the checks use the
# installed switchboard.v1 stubs and grpcio as a real gRPC client.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=${SWITCHBOARD_BASE_IMAGE:-local/python:3.11}
IMAGE=${SWITCHBOARD_IMAGE:-switchboard:check}
PY=${PYTHON:-python3}
ENGINE_LOG=${TMPDIR:-/tmp}/switchboard-dockerd.log

skip() { echo "container check: SKIP: $*" >&2; exit 77; }
step() { printf '[%5ss] %s\n' "$SECONDS" "$*"; }

ensure_engine() {
    command -v docker >/dev/null || skip "no docker client (Debian: apt-get install docker.io)"
    if docker info >/dev/null 2>&1; then step "engine: running"; return; fi
    command -v dockerd >/dev/null || skip "no engine running and no dockerd (Debian: apt-get install docker.io)"
    [ "$(id -u)" = 0 ] || skip "no engine running and starting dockerd needs root"
    step "engine: starting dockerd (log: $ENGINE_LOG)"
    nohup dockerd --iptables=false --ip6tables=false --bridge=none --storage-driver overlay2 \
        >"$ENGINE_LOG" 2>&1 &
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && { step "engine: started (pid $!)"; return; }
        kill -0 $! 2>/dev/null || break
        sleep 1
    done
    skip "dockerd did not start: $(tail -n 3 "$ENGINE_LOG" | tr '\n' ' ')"
}

debian_mirror() {
    # The host's own Debian mirror (deb822 sources or a one-line sources.list).
    local uri
    uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '$2 ~ /\/debian\/?$/ {print $2; exit}')
    [ -n "$uri" ] || uri=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        | awk '$2 ~ /\/debian\/?$/ {print $2; exit}')
    echo "${uri:-http://deb.debian.org/debian}"
}

host_pip_index() {
    # A network index the host's pip uses (file:// indexes mean nothing in a container).
    local url
    url=${PIP_INDEX_URL:-$("$PY" -m pip config get global.index-url 2>/dev/null || true)}
    case "$url" in http://*|https://*) echo "$url" ;; esac
}

ensure_base_image() {
    if docker image inspect "$BASE" >/dev/null 2>&1; then step "base image $BASE: cached"; return; fi
    command -v debootstrap >/dev/null || skip "base image $BASE missing and no debootstrap (apt-get install debootstrap)"
    [ "$(id -u)" = 0 ] || skip "base image $BASE missing and debootstrap needs root"
    local rootfs mirror index
    rootfs=$(mktemp -d "${TMPDIR:-/tmp}/switchboard-rootfs.XXXXXX")
    mirror=$(debian_mirror)
    step "base image $BASE: debootstrap bookworm from $mirror"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
        || { tail -n 20 "$rootfs.log" >&2; rm -rf "$rootfs"; echo "debootstrap failed" >&2; exit 1; }
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
        step "base image: trusts the host's local CAs: $(cd /usr/local/share/ca-certificates && echo *.crt)"
    fi
    # Debian's pip (23.x) trusts its own certifi bundle, not the system store: point it there.
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
    index=$(host_pip_index)
    [ -z "$index" ] || printf 'index-url = %s\n' "$index" >>"$rootfs/etc/pip.conf"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import --change 'CMD ["python3"]' - "$BASE" >/dev/null
    rm -rf "$rootfs" "$rootfs.log"
    step "base image $BASE: built"
}

ensure_engine
ensure_base_image
step "build: $IMAGE from Dockerfile (PYTHON=$BASE)"
build_log=$(mktemp "${TMPDIR:-/tmp}/switchboard-build.XXXXXX")
previous=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
if ! docker build --network host --build-arg PYTHON="$BASE" -t "$IMAGE" . >"$build_log" 2>&1; then
    tail -n 40 "$build_log" >&2
    rm -f "$build_log"
    echo "container check: FAIL: docker build" >&2
    exit 1
fi
rm -f "$build_log"
# The image this tag named before, now untagged: remove it (its layers stay as build cache).
if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$IMAGE")" ]; then
    docker rmi "$previous" >/dev/null 2>&1 || true
fi
step "build: done"
"$PY" scripts/container_check.py "$IMAGE"
step "container check: OK"
