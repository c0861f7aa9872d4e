#!/usr/bin/env bash
# Build the tiny test image wingslite-test:latest (busybox rootfs, Pterodactyl-style entrypoint).
# Idempotent: skips the build when an image with the same recipe hash already exists.
# Needs: a running Docker engine, /bin/busybox (Debian package busybox-static).
# Usage: bash .ci/test-env.sh [--force]   (env IMAGE overrides the tag)
set -euo pipefail

IMAGE="${IMAGE:-wingslite-test:latest}"
BUSYBOX="${BUSYBOX:-/bin/busybox}"
RECIPE_VERSION=2   # bump when the rootfs layout or entrypoint below changes

ENTRYPOINT_SH='#!/bin/sh
# Like Pterodactyl yolks images: run the STARTUP command from /home/container.
# With arguments (docker run IMAGE cmd...), run those instead.
cd /home/container || exit 1
if [ "$#" -gt 0 ]; then
    exec "$@"
fi
exec /bin/sh -c "$STARTUP"
'

log() { echo "[test-env] $*" >&2; }

if ! docker info >/dev/null 2>&1; then
    log "Docker engine not answering (docker info failed); start dockerd first"
    exit 1
fi
if [ ! -x "$BUSYBOX" ]; then
    log "$BUSYBOX missing: apt-get install -y busybox-static"
    exit 1
fi

hash="$( { echo "$RECIPE_VERSION"; printf '%s' "$ENTRYPOINT_SH"; sha256sum "$BUSYBOX"; } | sha256sum | cut -c1-16)"
have="$(docker image inspect -f '{{index .Config.Labels "wingslite.testenv"}}' "$IMAGE" 2>/dev/null || true)"
if [ "${1:-}" != "--force" ] && [ "$have" = "$hash" ]; then
    log "$IMAGE up to date ($hash), skipping build"
    exit 0
fi

t0=$(date +%s.%N)
work="$(mktemp -d /tmp/wingslite-rootfs.XXXXXX)"
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root"/{bin,usr/bin,etc,tmp,proc,sys,dev,home/container,root}
chmod 1777 "$root/tmp"
cp "$BUSYBOX" "$root/bin/busybox"
chmod 755 "$root/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    case "$applet" in busybox|*/*) continue ;; esac
    ln -sf busybox "$root/bin/$applet"
done
ln -sf /bin/env "$root/usr/bin/env"
printf 'root:x:0:0:root:/root:/bin/sh\ncontainer:x:988:988:container:/home/container:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\ncontainer:x:988:\n' >"$root/etc/group"
: >"$root/etc/hosts"; : >"$root/etc/resolv.conf"; : >"$root/etc/hostname"
printf '%s' "$ENTRYPOINT_SH" >"$root/entrypoint.sh"
chmod 755 "$root/entrypoint.sh"

tar -C "$root" --numeric-owner --owner=0 --group=0 -cf "$work/rootfs.tar" .
docker import \
    --change 'ENTRYPOINT ["/entrypoint.sh"]' \
    --change 'WORKDIR /home/container' \
    --change 'ENV PATH=/bin' \
    --change "LABEL wingslite.testenv=$hash" \
    "$work/rootfs.tar" "$IMAGE" >/dev/null

# Smoke test: STARTUP runs, stdin reaches it, hardened flags accepted, bind mount is the workdir.
vol="$work/vol"; mkdir -p "$vol"
out="$(echo world | docker run --rm -i \
    --read-only --tmpfs /tmp --security-opt no-new-privileges \
    --cap-drop setpcap --cap-drop mknod --cap-drop audit_write --cap-drop net_raw \
    --cap-drop dac_override --cap-drop fowner --cap-drop fsetid --cap-drop net_bind_service \
    --cap-drop sys_chroot --cap-drop setfcap \
    -v "$vol:/home/container" \
    -e STARTUP='echo hello; read x; echo got $x; pwd > where; id -u >> where' \
    "$IMAGE")"
if [ "$out" != "$(printf 'hello\ngot world')" ] || [ "$(cat "$vol/where")" != "$(printf '/home/container\n0')" ]; then
    log "smoke test of $IMAGE failed: output [$out], where [$(cat "$vol/where" 2>/dev/null)]"
    exit 1
fi
t1=$(date +%s.%N)
log "built $IMAGE ($hash) and smoke-tested in $(awk "BEGIN{printf \"%.1f\", $t1-$t0}") s"
