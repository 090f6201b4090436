# Scenario "fio" (boot with -x fio): on every disk, fio writes the whole
# disk in random order, libaio, O_DIRECT, 32 requests in flight, blocks of
# one logical block up to 64 KiB, each with a CRC32C verify header, then
# reads everything back and verifies it.
#   @@QUEUE lun=L lbs=N                  the disk's logical block size
#   command output blocks: fio-L (one per disk)
for lun in $(disk_luns); do
    dev=$(lun_dev "$lun")
    lbs=$(cat "/sys/block/${dev#/dev/}/queue/logical_block_size")
    report QUEUE lun="$lun" lbs="$lbs"
    run "fio-$lun" fio --name="lun$lun" --filename="$dev" --ioengine=libaio --direct=1 \
        --iodepth=32 --rw=randwrite --bsrange="$lbs-64k" --size="$(blockdev --getsize64 "$dev")" \
        --randseed="$((lun + 1))" --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --verify_state_save=0
done
# The commands' exit statuses are in their output blocks, for the host to judge.
exit 0
