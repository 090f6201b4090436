#!/usr/bin/env bash
# build-guest.sh [OUTDIR]
#
# Builds the small Linux guest the end-to-end tests (tests/guest.rs) boot:
#   OUTDIR/kernel          Debian's kernel: the uncompressed vmlinux (QEMU boots
#                          it through the PVH entry, much faster under TCG) when
#                          it can be extracted, else the bzImage
#   OUTDIR/initramfs.cpio  busybox, the virtio_pci/virtio_scsi/sd_mod/sg and ext4
#                          (which mounts ext2, what busybox mke2fs makes)
#                          modules and their dependencies, sg3_utils
#                          (uncompressed: the kernel unpacks it faster under TCG)
#   OUTDIR/fio.cpio        fio and the libraries it adds (about 80 MB, so
#                          run-guest.sh appends it only when asked: -x fio)
#   OUTDIR/stamp           what the guest was built from
# The guest's /init (init.sh) and the scenario are not in these files:
# run-guest.sh adds them at every boot, so editing them needs no rebuild.
#
# OUTDIR defaults to $VHOST_SCSI_GUEST_DIR, else test/out/guest in the
# repository. A build is reused while the kernel, busybox, sg3-utils, fio and
# libc package versions and this script are unchanged (compare OUTDIR/stamp);
# --force rebuilds anyway. Missing host packages are installed with apt-get
# (as root); the kernel .deb is fetched with apt-get download and kept in
# OUTDIR/deb. Environment: KERNEL_PKG overrides the kernel package (default:
# what linux-image-amd64 depends on).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
log() { echo "build-guest: $*" >&2; }
die() { echo "build-guest: error: $*" >&2; exit 1; }

OUT="" FORCE=0
for arg; do
    case "$arg" in
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $arg" ;;
        *) [ -z "$OUT" ] || die "one OUTDIR only"; OUT=$arg ;;
    esac
done
OUT=${OUT:-${VHOST_SCSI_GUEST_DIR:-$REPO/test/out/guest}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# ------------------------------------------------------------ host packages
# QEMU is not needed to build, but to boot the guest: the tests need it (8.2
# or later, from bookworm-backports on bookworm), so install-qemu.sh installs
# it along with the rest; it does nothing when all is there.
PKGS=(busybox-static sg3-utils fio cpio kmod xz-utils zstd)
bash "$REPO/test/install-qemu.sh" "${PKGS[@]}" || die "cannot install QEMU and ${PKGS[*]}"

version() { dpkg-query -W -f='${Version}' "$1"; }
KERNEL_PKG=${KERNEL_PKG:-$(apt-cache depends linux-image-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')}
[ -n "$KERNEL_PKG" ] || die "cannot resolve linux-image-amd64 (run apt-get update, or set KERNEL_PKG)"
KERNEL_VERSION=$(apt-cache show --no-all-versions "$KERNEL_PKG" 2>/dev/null |
    awk '$1 == "Version:" {print $2; exit}')
[ -n "$KERNEL_VERSION" ] || die "no version known for $KERNEL_PKG (run apt-get update)"

stamp="kernel=$KERNEL_PKG/$KERNEL_VERSION busybox=$(version busybox-static)"
stamp+=" sg3-utils=$(version sg3-utils) fio=$(version fio) libc6=$(version libc6)"
stamp+=" script=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"
if [ "$FORCE" = 0 ] && [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$stamp" ] &&
   [ -s "$OUT/kernel" ] && [ -s "$OUT/initramfs.cpio" ] && [ -s "$OUT/fio.cpio" ]; then
    log "up to date: $OUT ($stamp)"
    exit 0
fi
log "building $OUT: $stamp"
rm -f "$OUT/stamp"

# ------------------------------------------------------------ kernel package
mkdir -p "$OUT/deb"
deb=$OUT/deb/${KERNEL_PKG}_${KERNEL_VERSION//:/%3a}_amd64.deb
if [ ! -s "$deb" ]; then
    rm -f "$OUT"/deb/*.deb
    log "downloading $KERNEL_PKG $KERNEL_VERSION"
    (cd "$OUT/deb" && apt-get download -q -o APT::Sandbox::User=root "$KERNEL_PKG=$KERNEL_VERSION" >&2) ||
        die "apt-get download $KERNEL_PKG failed"
    deb=$(ls "$OUT"/deb/"${KERNEL_PKG}"_*.deb | head -n1)
fi

WORK=$(mktemp -d "$OUT/work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
dpkg -x "$deb" "$WORK/pkg"
bzimage=$(ls "$WORK"/pkg/boot/vmlinuz-* | head -n1)
KVER=${bzimage##*/vmlinuz-}
MODROOT=$WORK/pkg
[ -d "$MODROOT/lib/modules/$KVER" ] || MODROOT=$WORK/pkg/usr
[ -d "$MODROOT/lib/modules/$KVER" ] || die "no modules for $KVER in $deb"
depmod -b "$MODROOT" "$KVER"

# The uncompressed kernel: the first xz (or zstd, gzip) stream in the bzImage
# that decompresses to an ELF file. QEMU boots an ELF vmlinux with a PVH note.
extract_vmlinux() {
    local magic tool off
    for pair in '\xfd7zXZ\x00:xz -dcq' '\x28\xb5\x2f\xfd:zstd -dcq' '\x1f\x8b\x08:gzip -dcq'; do
        magic=${pair%%:*} tool=${pair#*:}
        for off in $(LC_ALL=C grep -obUaP "$magic" "$bzimage" | cut -d: -f1 | head -n 4); do
            tail -c +$((off + 1)) "$bzimage" | $tool > "$1" 2>/dev/null || true
            [ "$(head -c 4 "$1" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] && return 0
        done
    done
    return 1
}
if grep -q '^CONFIG_PVH=y' "$WORK/pkg/boot/config-$KVER" && extract_vmlinux "$WORK/kernel"; then
    kernel_kind=vmlinux
else
    log "note: no PVH-bootable vmlinux in $KERNEL_PKG, using the bzImage (slower boots)"
    cp "$bzimage" "$WORK/kernel"
    kernel_kind=bzImage
fi

# ------------------------------------------------------------ initramfs tree
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,etc/guest}

# Modules in load order, dependencies first, as `modprobe --show-depends`
# lists them (soft dependencies included); installed uncompressed.
MODULES="virtio_pci virtio_scsi sd_mod sg ext4"
: > "$ROOT/etc/guest/modules"
for m in $MODULES; do
    modprobe -C /dev/null -d "$MODROOT" -S "$KVER" --show-depends "$m" |
    while read -r kind path _; do
        [ "$kind" = insmod ] || continue
        rel=${path#"$MODROOT"/lib/modules/"$KVER"/}
        ko=${rel%.ko*}.ko
        grep -qxF "$ko" "$ROOT/etc/guest/modules" && continue
        mkdir -p "$(dirname "$ROOT/lib/modules/$KVER/$ko")"
        case "$path" in
            *.ko.xz) xz -dc "$path" ;;
            *.ko.zst) zstd -qdc "$path" ;;
            *.ko.gz) gzip -dc "$path" ;;
            *) cat "$path" ;;
        esac > "$ROOT/lib/modules/$KVER/$ko"
        echo "$ko" >> "$ROOT/etc/guest/modules"
    done
done

# An ELF binary and the shared libraries it loads (per ldd), into tree $1.
add_elf() {
    local root=$1 bin=$2 lib
    mkdir -p "$root$(dirname "$bin")"
    cp -L "$bin" "$root$bin"
    for lib in $(ldd "$bin" | awk '/=> \// {print $3} /^\t\// {print $1}'); do
        [ -e "$ROOT$lib" ] || [ -e "$root$lib" ] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
}
is_elf() { [ "$(head -c 4 "$1" | od -An -tx1 | tr -d ' ')" = 7f454c46 ]; }

for bin in $(dpkg -L sg3-utils | grep -E '^/usr/s?bin/[^/]+$'); do
    is_elf "$bin" && add_elf "$ROOT" "$bin"
done
cp /bin/busybox "$ROOT/bin/busybox"
for applet in $("$ROOT/bin/busybox" --list-full); do
    [ -e "$ROOT/$applet" ] || ln -s /bin/busybox "$ROOT/$applet"
done
[ -e "$ROOT/bin/sh" ] || ln -s busybox "$ROOT/bin/sh"
echo "root:x:0:0:root:/:/bin/sh" > "$ROOT/etc/passwd"
# The kernel opens /dev/console for /init before anything is mounted.
[ "$(id -u)" != 0 ] || mknod -m 600 "$ROOT/dev/console" c 5 1
echo "$stamp kver=$KVER kernel=$kernel_kind" > "$ROOT/etc/guest/build"

# fio in a separate archive: only the libraries the base tree lacks.
FIO=$WORK/fio
mkdir -p "$FIO"
add_elf "$FIO" /usr/bin/fio

cpio_of() { (cd "$1" && find . -mindepth 1 | LC_ALL=C sort |
    cpio -o -H newc -R 0:0 --reproducible --quiet); }
cpio_of "$ROOT" > "$WORK/initramfs.cpio"
cpio_of "$FIO" > "$WORK/fio.cpio"

# ------------------------------------------------------------ install
mv "$WORK/kernel" "$OUT/kernel"
mv "$WORK/initramfs.cpio" "$OUT/initramfs.cpio"
mv "$WORK/fio.cpio" "$OUT/fio.cpio"
echo "$KVER $kernel_kind" > "$OUT/kernel.info"
rm -f "$OUT/accel"                 # the KVM probe is per kernel
echo "$stamp" > "$OUT/stamp"       # last: marks a complete build
log "done: $(cd "$OUT" && du -h kernel initramfs.cpio fio.cpio | awk '{printf "%s %s  ", $2, $1}')"
log "modules: $(xargs -n1 basename < "$ROOT/etc/guest/modules" | tr '\n' ' ')"
