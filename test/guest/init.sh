#!/bin/sh
# /init of the test guest (busybox sh, POSIX only). run-guest.sh puts it into
# the initramfs at every boot, with the scenario (/harness/scenario.sh), its
# environment (/harness/env, KEY='value' lines) and files (/harness/files/).
#
# It mounts /proc, /sys, /dev and /tmp, loads the modules, waits for
# $WAIT_DISKS SCSI disks, names them, runs the scenario in a subshell (which
# sees the helpers below) and powers the VM off. Everything meant for the
# host is a line on the serial console starting with "@@":
#   @@BOOT uptime=S kernel=VERSION build=...
#   @@DISKS n=N want=M map=LUN:sdX:sgN,... uptime=S
#   @@BEGIN name=X ... @@END name=X rc=N    a command's output (helper `run`)
#   @@<TAG> key=value ...                   the scenario's own results
#   @@BEGIN name=dmesg ... @@END name=dmesg  the kernel log
#   @@EXIT rc=N                             last line: the scenario's status
# Kernel messages are kept off the console (console log level 1) so they
# never cut a result line; the kernel log comes at the end instead.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
echo 1 > /proc/sys/kernel/printk

uptime_s() { cut -d' ' -f1 /proc/uptime; }
echo "@@BOOT uptime=$(uptime_s) kernel=$(uname -r) build=$(tr ' ' ',' < /etc/guest/build)"

if [ -f /harness/env ]; then
    set -a
    . /harness/env
    set +a
fi

# ---------------------------------------------------------------- helpers
# report TAG key=value...: one result line.
report() { echo "@@$*"; }
# squash STRING: trimmed, inner blanks as "_" (values must not hold spaces).
squash() { echo "$*" | sed 's/^[[:space:]]*//; s/[[:space:]]*$//; s/[[:space:]][[:space:]]*/_/g'; }
# run NAME CMD...: runs CMD (at most $RUN_TIMEOUT s), its output framed by
# @@BEGIN/@@END lines with the exit status; returns that status.
run() {
    _name=$1
    shift
    echo "@@BEGIN name=$_name"
    timeout "${RUN_TIMEOUT:-60}" "$@" 2>&1
    _rc=$?
    echo "@@END name=$_name rc=$_rc"
    return $_rc
}
# lun_dev LUN / lun_sg LUN: the disk's block and SCSI generic device nodes.
lun_dev() { echo "/dev/$(ls "/sys/bus/scsi/devices/$(lun_hctl "$1")/block" 2>/dev/null)"; }
lun_sg() { echo "/dev/$(ls "/sys/bus/scsi/devices/$(lun_hctl "$1")/scsi_generic" 2>/dev/null)"; }
lun_hctl() { (cd /sys/bus/scsi/devices && ls -d *:0:0:"$1" 2>/dev/null | head -n1); }
# lun_naa LUN: the NAA designator (hex) of the logical unit, from VPD page
# 83h as the kernel read it (first designator of type 3, LU association).
lun_naa() {
    od -An -v -tx1 "/sys/bus/scsi/devices/$(lun_hctl "$1")/vpd_pg83" 2>/dev/null | awk '
        function hex(s,  v, i) {
            for (i = 1; i <= length(s); i++) v = v * 16 + index("0123456789abcdef", substr(s, i, 1)) - 1
            return v
        }
        { for (i = 1; i <= NF; i++) b[n++] = $i }
        END {
            for (i = 4; i + 4 <= n; i += 4 + hex(b[i + 3])) {
                t = hex(b[i + 1])
                if (t % 16 == 3 && int(t / 16) % 4 == 0) {
                    s = ""
                    for (j = 0; j < hex(b[i + 3]); j++) s = s b[i + 4 + j]
                    print s
                    exit
                }
            }
        }'
}
# disk_luns: the LUNs of all disks, ascending.
disk_luns() {
    for d in /sys/class/scsi_disk/*; do [ -e "$d" ] && echo "${d##*:}"; done | sort -n
}
# md5 FILE [dd options]: md5 of FILE (O_DIRECT reads, 1 MiB at a time unless
# the options say otherwise).
md5() {
    _f=$1
    shift
    dd if="$_f" bs=1048576 iflag=direct "$@" 2>/dev/null | md5sum | cut -d' ' -f1
}

# ---------------------------------------------------------------- modules
# Load order and dependencies were resolved when the guest was built. CPU
# specific helpers refuse to load where the CPU lacks the feature: harmless.
while read -r ko; do
    insmod "/lib/modules/$(uname -r)/$ko" 2>/dev/null ||
        echo "@@INFO insmod-failed module=$ko"
done < /etc/guest/modules

# ---------------------------------------------------------------- disks
# SCSI scanning and sd probing are asynchronous: wait for $WAIT_DISKS disks
# and their device nodes.
want=${WAIT_DISKS:-1}
ready() {
    n=0
    for d in /sys/class/scsi_disk/*; do
        [ -e "$d" ] || continue
        h=${d##*/}
        b=$(ls "/sys/bus/scsi/devices/$h/block" 2>/dev/null)
        g=$(ls "/sys/bus/scsi/devices/$h/scsi_generic" 2>/dev/null)
        [ -n "$b" ] && [ -b "/dev/$b" ] && [ -n "$g" ] && [ -c "/dev/$g" ] && n=$((n + 1))
    done
    [ "$n" -ge "$want" ]
}
i=0
while ! ready && [ "$i" -lt "$(( ${WAIT_DISKS_TIMEOUT:-30} * 10 ))" ]; do
    sleep 0.1
    i=$((i + 1))
done
# /dev/disk/by-id names as udev's scsi_id makes them: it prefers the NAA
# designator of VPD page 83h (the kernel's own sysfs "wwid" prefers the
# longer T10 vendor designator when the NAA one is locally assigned).
mkdir -p /dev/disk/by-id
map=""
for lun in $(disk_luns); do
    dev=$(lun_dev "$lun")
    map="$map,$lun:${dev#/dev/}:$(basename "$(lun_sg "$lun")")"
    naa=$(lun_naa "$lun")
    if [ -n "$naa" ]; then
        ln -sf "../../${dev#/dev/}" "/dev/disk/by-id/wwn-0x$naa"
        ln -sf "../../${dev#/dev/}" "/dev/disk/by-id/scsi-3$naa"
    fi
done
n=$(disk_luns | wc -l)
echo "@@DISKS n=$n want=$want map=${map#,} uptime=$(uptime_s)"

# ---------------------------------------------------------------- scenario
cd /tmp || true
if [ -f /harness/scenario.sh ]; then
    (. /harness/scenario.sh)
    rc=$?
else
    echo "@@INFO no-scenario"
    rc=0
fi
# (newline first: the scenario's last line may lack one)
printf '\n@@BEGIN name=dmesg\n'
dmesg
echo "@@END name=dmesg rc=0"
echo "@@EXIT rc=$rc uptime=$(uptime_s)"
sync
poweroff -f
sleep 5
echo o > /proc/sysrq-trigger
