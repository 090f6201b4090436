# Scenario "hotplug": LUNs come, grow and go while the guest runs. The host
# drives each step through the daemon's management API once it sees the
# guest's @@STEP line; the guest waits (at most 120 s) for the change.
#   MODE=events  the device reports changes on the event queue (QEMU's
#                default hotplug=on,param_change=on): the guest only looks
#   MODE=rescan  hotplug=off,param_change=off: the guest rescans (the host
#                adapter's scan, the disk's rescan) until it sees the change
#   @@STEP n=N                             waiting for the host's step N
#   @@ADDED lun=1 size=SECTORS md5=HEX     the disk that appeared
#   @@RESIZED lun=1 size=SECTORS           its size after the host grew it
#   @@REMOVED lun=1 gone=yes|no read_rc=RC lun0_md5=HEX
#   @@BURST n=DISKS                        disks present after 20 lun_adds
#   @@KERNEL lun_change=N capacity_change=N  unit attentions the kernel logged
MODE=${MODE:-events}
rescan_all() {
    for scan in /sys/class/scsi_host/host*/scan; do echo "- - -" > "$scan" 2>/dev/null; done
}
# disks: how many SCSI disks (target 0) the guest has.
disks() { ls -d /sys/bus/scsi/devices/*:0:0:*/block 2>/dev/null | wc -l; }
sectors() { cat "/sys/block/$(basename "$(lun_dev "$1")")/size" 2>/dev/null || echo 0; }
# wait_for CMD...: until CMD succeeds, for 120 s at most (rescanning first
# in MODE=rescan with RESCAN set to the command that does it).
wait_for() {
    i=0
    while [ "$i" -lt 600 ]; do
        if [ "$MODE" = rescan ] && [ -n "$RESCAN" ]; then $RESCAN; fi
        if "$@"; then return 0; fi
        sleep 0.2
        i=$((i + 1))
    done
    return 1
}
has_lun() { [ -n "$(lun_hctl "$1")" ] && [ -b "$(lun_dev "$1")" ]; }
no_lun() { [ -z "$(lun_hctl "$1")" ]; }
grown() { [ "$(sectors 1)" != "$1" ]; }
at_least() { [ "$(disks)" -ge "$1" ]; }
rescan_lun1() { echo 1 > "/sys/bus/scsi/devices/$(lun_hctl 1)/rescan" 2>/dev/null; }

report STEP n=1
RESCAN=rescan_all wait_for has_lun 1 || { report ADDED lun=1 size=0 md5=none; exit 1; }
report ADDED lun=1 size="$(sectors 1)" md5="$(md5 "$(lun_dev 1)")"

before=$(sectors 1)
report STEP n=2
RESCAN=rescan_lun1 wait_for grown "$before"
report RESIZED lun=1 size="$(sectors 1)"

lun1=$(lun_dev 1)
report STEP n=3
if [ "$MODE" = events ]; then
    RESCAN= wait_for no_lun 1 && gone=yes || gone=no
    read_rc=none
else
    # Nothing removes the disk without the event: it fails its reads (LUN
    # NOT SUPPORTED) once the host removed the LUN.
    i=0
    while dd if="$lun1" of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null && [ "$i" -lt 600 ]; do
        sleep 0.2
        i=$((i + 1))
    done
    dd if="$lun1" of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null
    read_rc=$?
    gone=no
    [ "$read_rc" -ne 0 ] && gone=yes
fi
report REMOVED lun=1 gone="$gone" read_rc="$read_rc" lun0_md5="$(md5 "$(lun_dev 0)")"

report STEP n=4
RESCAN=rescan_all wait_for at_least 21
report BURST n="$(disks)"
report KERNEL lun_change="$(dmesg | grep -c 'LUN assignments on this target have changed')" \
    capacity_change="$(dmesg | grep -ci 'capacity data has changed')"
