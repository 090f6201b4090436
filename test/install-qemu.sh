#!/usr/bin/env bash
# install-qemu.sh [PACKAGE]...
#
# Installs QEMU (qemu-system-x86, qemu-utils) at version 8.2 or later, which
# the tests need (reconnect-ms= on the vhost-user chardev), plus any PACKAGEs
# named, as root with apt-get. Idempotent: a machine that already has a QEMU
# new enough and every PACKAGE is left alone, with no apt-get call at all.
#
# On Debian bookworm, whose own QEMU is 7.2, QEMU comes from
# bookworm-backports (10.x). The backports suite is added in a sources file
# of this script's own, /etc/apt/sources.list.d/vhost-device-scsi-backports.sources,
# unless some sources file already names it; the machine's own sources are
# never edited. Backports packages have priority 100, so nothing else on the
# machine moves to backports: only the QEMU packages are asked for with
# -t bookworm-backports. This works the same on a machine with no QEMU, with
# bookworm's 7.2 installed (it is upgraded), and with a backports
# qemu-utils but no qemu-system-x86 (the image this project's CI runs on).
# On other releases QEMU comes from the release's own suite and must be new
# enough there.
set -euo pipefail

log() { echo "install-qemu: $*" >&2; }
die() { echo "install-qemu: error: $*" >&2; exit 1; }

MIN_MAJOR=8 MIN_MINOR=2
QEMU_PKGS=(qemu-system-x86 qemu-utils)
EXTRA_PKGS=("$@")
SOURCES=/etc/apt/sources.list.d/vhost-device-scsi-backports.sources

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed'; }
# "1:10.0.2+ds-2+deb13u1~bpo12+1" -> 0 when at least MIN_MAJOR.MIN_MINOR.
new_enough() {
    local v=${1#*:} major minor
    major=${v%%.*} v=${v#*.} minor=${v%%[!0-9]*}
    [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]] || return 1
    ((major > MIN_MAJOR || (major == MIN_MAJOR && minor >= MIN_MINOR)))
}
qemu_ok() {
    local p
    for p in "${QEMU_PKGS[@]}"; do
        installed "$p" && new_enough "$(dpkg-query -W -f='${Version}' "$p")" || return 1
    done
}

missing=()
for p in "${EXTRA_PKGS[@]}"; do installed "$p" || missing+=("$p"); done
if qemu_ok && ((${#missing[@]} == 0)); then
    log "up to date: $(qemu-system-x86_64 --version | head -n1)"
    exit 0
fi
[ "$(id -u)" = 0 ] || die "QEMU >= $MIN_MAJOR.$MIN_MINOR (${QEMU_PKGS[*]}) or ${missing[*]:-nothing else} missing: run as root, or install them"

export DEBIAN_FRONTEND=noninteractive
APT=(apt-get -y -q --no-install-recommends -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
target=()
if [ "$codename" = bookworm ]; then
    if ! grep -rqsE '(^|[[:space:]])bookworm-backports([[:space:]]|$)' \
            /etc/apt/sources.list /etc/apt/sources.list.d/; then
        log "adding bookworm-backports in $SOURCES"
        cat > "$SOURCES" <<'EOF'
# Added by vhost-device-scsi's test/install-qemu.sh: QEMU 10 for the tests.
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    fi
    target=(-t bookworm-backports)
fi

log "apt-get update"
apt-get update -q >&2
if ! qemu_ok; then
    log "installing ${QEMU_PKGS[*]} ${target[*]}"
    "${APT[@]}" "${target[@]}" install "${QEMU_PKGS[@]}" >&2
fi
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    "${APT[@]}" install "${missing[@]}" >&2
fi
qemu_ok || die "QEMU is older than $MIN_MAJOR.$MIN_MINOR after installing: $(dpkg-query -W -f='${Package} ${Version}\n' "${QEMU_PKGS[@]}" 2>&1 | tr '\n' ' ')"
log "done: $(qemu-system-x86_64 --version | head -n1)"
