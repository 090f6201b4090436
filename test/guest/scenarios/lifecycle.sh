# Scenario "lifecycle": LUN 0 holds data, LUN 1 is a mailbox the host writes
# a phase word into; the guest reads it (O_DIRECT, so never from the cache).
#   @@ROUND phase=P md5=HEX boot_id=ID   LUN 0 read whole, every boot
# phase "reboot": wait until the host changes the phase, then reboot
# phase "io":     read LUN 0 in a loop from two readers, report @@IO-RUNNING
#                 and wait (the host kills QEMU meanwhile)
# phase "final":  nothing more
phase() { dd if="$(lun_dev 1)" bs=512 count=1 iflag=direct 2>/dev/null | tr -d '\000\n'; }
p=$(phase)
report ROUND phase="$p" md5="$(md5 "$(lun_dev 0)")" boot_id="$(cat /proc/sys/kernel/random/boot_id)"
case "$p" in
    reboot)
        i=0
        while [ "$(phase)" = reboot ] && [ "$i" -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
        report REBOOTING
        reboot -f ;;
    io)
        for _ in 1 2; do
            (while :; do dd if="$(lun_dev 0)" of=/dev/null bs=65536 iflag=direct 2>/dev/null; done) &
        done
        sleep 1
        report IO-RUNNING
        sleep 600 ;;
esac
