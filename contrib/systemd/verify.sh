#!/usr/bin/env bash
# verify.sh [BINARY]
#
# Checks the unit templates here with `systemd-analyze verify`, instantiated
# as vhost-device-scsi@vm1.service and vhost-device-scsi@vm1.socket, and
# fails on any message it prints (it exits 0 on most of them: a misspelt
# value or an unknown directive is only "ignoring"). verify wants the
# ExecStart binary to exist: the copies checked run BINARY instead of
# /usr/bin/vhost-device-scsi (default: the debug build,
# ${CARGO_TARGET_DIR:-target}/debug/vhost-device-scsi; `cargo build` first).
# Documentation=man:vhost-device-scsi(1) is checked against the generated
# page in contrib/man. Run from anywhere; CI runs it from .ci/run.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
binary=${1:-${CARGO_TARGET_DIR:-$root/target}/debug/vhost-device-scsi}
binary=$(realpath "$binary")
[ -x "$binary" ] || { echo "verify.sh: $binary: no such executable (cargo build first)" >&2; exit 1; }
command -v systemd-analyze >/dev/null || { echo "verify.sh: systemd-analyze not found (apt-get install systemd)" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp "$here/vhost-device-scsi@.service" "$here/vhost-device-scsi@.socket" "$tmp/"
sed -i "s|^ExecStart=/usr/bin/vhost-device-scsi |ExecStart=$binary |" "$tmp/vhost-device-scsi@.service"
grep -q "^ExecStart=$binary " "$tmp/vhost-device-scsi@.service" \
    || { echo "verify.sh: no ExecStart=/usr/bin/vhost-device-scsi line to point at $binary" >&2; exit 1; }
mkdir -p "$tmp/man/man1"
cp "$root"/contrib/man/*.1 "$tmp/man/man1/"

status=0
output=$(cd "$tmp" && MANPATH="$tmp/man" SYSTEMD_LOG_LEVEL=notice \
    systemd-analyze verify "$tmp/vhost-device-scsi@vm1.service" "$tmp/vhost-device-scsi@vm1.socket" 2>&1) \
    || status=$?
if [ "$status" != 0 ] || [ -n "$output" ]; then
    printf '%s\n' "$output" >&2
    echo "verify.sh: systemd-analyze verify: exit status $status, messages above: the units need fixing" >&2
    exit 1
fi
echo "verify.sh: vhost-device-scsi@vm1.service and vhost-device-scsi@vm1.socket verified ($(systemd-analyze --version | head -n1))"
