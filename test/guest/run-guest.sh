#!/usr/bin/env bash
# run-guest.sh [options] SCENARIO.sh
#
# Boots the test guest (build-guest.sh) in QEMU with a vhost-user-scsi-pci
# device on a running daemon's socket; the guest runs SCENARIO.sh and powers
# off. The serial console goes to a log file; the script ends by exec-ing
# QEMU, so its process id is QEMU's (a caller can kill it) and its exit
# status is QEMU's. Run it under `timeout` when you use it by hand.
#
#   -S, --socket PATH     the daemon's unix socket (required)
#   -o, --log FILE        serial log (default ./SCENARIO.log); this boot's
#                         initramfs is written next to it as FILE.initrd
#   -g, --guest DIR       build-guest.sh output (default $VHOST_SCSI_GUEST_DIR,
#                         else test/out/guest in the repository)
#   -e KEY=VALUE          environment of the scenario; repeatable
#   -f FILE               copied into the guest as /harness/files/NAME; repeatable
#   -x NAME               also load DIR/NAME.cpio (e.g. -x fio); repeatable
#       --initrd FILE     boot FILE (another boot's LOG.initrd) instead of
#                         building an initramfs from the scenario, -e, -f and -x:
#                         a migration's destination boots what its source did
#       --smp N           vCPUs (default 1)
#   -m, --mem SIZE        guest RAM (default 512M), a shared memfd as vhost-user needs
#       --device-opts S   appended to "-device vhost-user-scsi-pci,chardev=vus"
#                         (default: nothing, i.e. QEMU's default properties)
#       --chardev-opts S  appended to the vhost-user socket chardev
#                         "-chardev socket,id=vus,path=SOCKET", e.g.
#                         ",reconnect-ms=500" (QEMU 8.2 or later reconnects to
#                         a restarted daemon)
#       --qemu-arg ARG    one more QEMU argument (e.g. -qmp unix:PATH,server=on,wait=off
#                         as two --qemu-arg, or -incoming URI); repeatable
#       --reboot          let a guest reboot restart the VM (default: QEMU exits)
#       --accel MODE      auto | kvm | tcg (default $VHOST_SCSI_GUEST_ACCEL, else
#                         auto: KVM when it boots the guest kernel, else TCG;
#                         the probe's answer is cached in DIR/accel)
#       --qemu PATH       QEMU binary (default $QEMU, else qemu-system-x86_64)
#   -n, --dry-run         print the QEMU command line instead of running it
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { echo "run-guest: $*" >&2; }
die() { echo "run-guest: error: $*" >&2; exit 2; }
usage() { sed -n '2,37p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

SOCK="" LOG="" SCENARIO="" SMP=1 MEM=512M DEV_OPTS="" CHARDEV_OPTS="" REBOOT=0 DRY=0
GUEST=${VHOST_SCSI_GUEST_DIR:-$HERE/../out/guest}
ACCEL=${VHOST_SCSI_GUEST_ACCEL:-auto} QEMU=${QEMU:-qemu-system-x86_64}
ENVS=() FILES=() EXTRAS=() QEMU_EXTRA=() REUSE_INITRD=""
while (($#)); do
    case "$1" in
        -S|--socket) SOCK=${2?}; shift ;;
        -o|--log) LOG=${2?}; shift ;;
        -g|--guest) GUEST=${2?}; shift ;;
        -e) ENVS+=("${2?}"); shift ;;
        -f) FILES+=("${2?}"); shift ;;
        -x) EXTRAS+=("${2?}"); shift ;;
        --initrd) REUSE_INITRD=${2?}; shift ;;
        --smp) SMP=${2?}; shift ;;
        -m|--mem) MEM=${2?}; shift ;;
        --device-opts) DEV_OPTS=${2?}; shift ;;
        --chardev-opts) CHARDEV_OPTS=${2?}; shift ;;
        --qemu-arg) QEMU_EXTRA+=("${2?}"); shift ;;
        --reboot) REBOOT=1 ;;
        --accel) ACCEL=${2?}; shift ;;
        --qemu) QEMU=${2?}; shift ;;
        -n|--dry-run) DRY=1 ;;
        -h|--help) usage ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [ -z "$SCENARIO" ] || die "one scenario only"; SCENARIO=$1 ;;
    esac
    shift
done
[ -n "$SCENARIO" ] || usage
[ -f "$SCENARIO" ] || die "no such scenario: $SCENARIO"
[ -n "$SOCK" ] || die "--socket is required"
for f in kernel initramfs.cpio stamp; do
    [ -s "$GUEST/$f" ] || die "$GUEST/$f missing: run $HERE/build-guest.sh"
done
command -v "$QEMU" >/dev/null || die "$QEMU not found (apt-get install qemu-system-x86)"
LOG=${LOG:-$PWD/$(basename "$SCENARIO" .sh).log}
for v in "$SOCK" "$LOG"; do [[ "$v" != *,* ]] || die "QEMU options cannot hold ',': $v"; done

# ---------------------------------------------------------------- accelerator
# /dev/kvm may exist yet not boot a stock kernel (nested virtualization off,
# or a paravirtual-only KVM that hangs): boot the kernel with KVM and wait for
# its banner; cache the answer per host boot, QEMU and kernel.
kvm_boots() {
    [ -w /dev/kvm ] || return 1
    local key out pid i ok=no
    key="$(cat /proc/sys/kernel/random/boot_id) $("$QEMU" --version | head -n1) $(cat "$GUEST/stamp")"
    if [ -f "$GUEST/accel" ] && [ "$(head -n1 "$GUEST/accel")" = "$key" ]; then
        [ "$(sed -n 2p "$GUEST/accel")" = kvm ]
        return
    fi
    out=$(mktemp)
    "$QEMU" -machine q35 -accel kvm -cpu host -m 256M -nodefaults -no-user-config -display none \
        -no-reboot -serial "file:$out" -kernel "$GUEST/kernel" \
        -append "console=ttyS0 earlyprintk=ttyS0 panic=-1" </dev/null >/dev/null 2>&1 &
    pid=$!
    for ((i = 0; i < 50; i++)); do
        if grep -aq 'Linux version' "$out"; then ok=yes; break; fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -f "$out"
    printf '%s\n%s\n' "$key" "$([ "$ok" = yes ] && echo kvm || echo tcg)" > "$GUEST/accel"
    [ "$ok" = yes ]
}
case "$ACCEL" in
    auto) if kvm_boots 2>/dev/null; then ACCEL=kvm; else ACCEL=tcg; fi ;;
    kvm|tcg) ;;
    *) die "bad --accel $ACCEL" ;;
esac
CPU=max
[ "$ACCEL" = tcg ] || CPU=host

# ---------------------------------------------------------------- initramfs
# The base archive, extras, then this boot's files in a last archive (the
# kernel unpacks concatenated archives; later files win).
if [ -n "$REUSE_INITRD" ]; then
    [ -s "$REUSE_INITRD" ] || die "no such initramfs: $REUSE_INITRD"
    [[ "$REUSE_INITRD" != *,* ]] || die "QEMU options cannot hold ',': $REUSE_INITRD"
fi
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/harness/files"
install -m 755 "$HERE/init.sh" "$STAGE/init"
cp "$SCENARIO" "$STAGE/harness/scenario.sh"
for kv in "${ENVS[@]}"; do
    key=${kv%%=*} val=${kv#*=}
    [[ "$kv" == *=* && "$key" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "bad -e $kv (KEY=VALUE)"
    printf "%s='%s'\n" "$key" "${val//\'/\'\\\'\'}"
done > "$STAGE/harness/env"
for f in "${FILES[@]}"; do cp -L "$f" "$STAGE/harness/files/"; done
archives=("$GUEST/initramfs.cpio")
for x in "${EXTRAS[@]}"; do
    [ -s "$GUEST/$x.cpio" ] || die "$GUEST/$x.cpio missing"
    archives+=("$GUEST/$x.cpio")
done
if [ -n "$REUSE_INITRD" ]; then
    INITRD=$REUSE_INITRD
else
    INITRD=$LOG.initrd
    {
        cat "${archives[@]}"
        (cd "$STAGE" && find . -mindepth 1 | cpio -o -H newc -R 0:0 --quiet)
    } > "$INITRD"
fi

# ---------------------------------------------------------------- QEMU
# shellcheck disable=SC2054 # the commas belong to QEMU's option syntax
cmd=("$QEMU" -machine q35 -accel "$ACCEL" -cpu "$CPU" -smp "$SMP" -m "$MEM"
     -object "memory-backend-memfd,id=mem,size=$MEM,share=on" -numa node,memdev=mem
     -nodefaults -no-user-config -display none
     -chardev "file,id=serial,path=$LOG" -serial chardev:serial
     -kernel "$GUEST/kernel" -initrd "$INITRD" -append "console=ttyS0 quiet panic=-1"
     -chardev "socket,id=vus,path=$SOCK$CHARDEV_OPTS" -device "vhost-user-scsi-pci,chardev=vus$DEV_OPTS")
[ "$REBOOT" = 1 ] || cmd+=(-no-reboot)
cmd+=("${QEMU_EXTRA[@]}")
if [ "$DRY" = 1 ]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
log "accel=$ACCEL log=$LOG"
rm -rf "$STAGE"
trap - EXIT
exec "${cmd[@]}" </dev/null
