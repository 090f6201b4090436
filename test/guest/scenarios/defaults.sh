# Scenario "defaults": QEMU's default device properties with two vCPUs.
#   @@CPUS n=N
#   @@FEATURES bits=0101...    virtio features the driver acked (bit 0 first)
#   @@QUEUES lun=L hw_queues=N      blk-mq hardware queues of the disk
#   @@IRQS request_queues=N,N,...   interrupts per request virtqueue
#   @@MD5 lun=L cpu=C md5=HEX  every disk read whole from every CPU at once
report CPUS n="$(nproc)"
for f in /sys/bus/virtio/devices/*; do
    [ "$(cat "$f/device")" = 0x0008 ] && report FEATURES bits="$(cat "$f/features")"
done
cpus=$(seq 0 $(( $(nproc) - 1 )))
for lun in $(disk_luns); do
    for cpu in $cpus; do
        taskset -c "$cpu" dd if="$(lun_dev "$lun")" bs=1048576 iflag=direct 2>/dev/null |
            md5sum | cut -d' ' -f1 > "/tmp/md5-$lun-$cpu" &
    done
done
wait
for lun in $(disk_luns); do
    for cpu in $cpus; do report MD5 lun="$lun" cpu="$cpu" md5="$(cat "/tmp/md5-$lun-$cpu")"; done
done
for lun in $(disk_luns); do
    report QUEUES lun="$lun" hw_queues="$(ls -d /sys/block/"$(basename "$(lun_dev "$lun")")"/mq/* | wc -l)"
done
# Interrupts per request virtqueue (MSI-X vector "virtioN-request", in
# queue order): each queue the daemon completed requests on has some.
report IRQS request_queues="$(awk -v n="$(nproc)" '/virtio[0-9]*-request/ {
    s = 0
    for (i = 2; i <= n + 1; i++) s += $i
    printf "%s%d", sep, s
    sep = ","
}' /proc/interrupts)"
