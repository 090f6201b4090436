# Scenario "discard": thin provisioning through the block layer. LUN 0 is a
# raw disk, LUN 1 (when there is one) holds a file system; both start as
# sparse images. Offsets and lengths are in bytes.
#   @@QUEUE lun=L lbs=N discard_max_bytes=N discard_granularity=N
#           provisioning_mode=MODE           every boot, every disk
# PHASE=write: /harness/files/data written to LUN 0 at $DATA_OFF (O_DIRECT,
#   then a cache flush); on LUN 1 a file system with that file in it
#   (mke2fs, mount, cp, sync, umount). Output blocks: write, mkfs, mount,
#   copy, sync, umount
# PHASE=discard: blkdiscard of $DISCARD_LEN bytes of LUN 0 at $DISCARD_OFF;
#   on LUN 1 the file is removed and fstrim discards the free space.
#   Output blocks: blkdiscard, mount, remove, fstrim, umount, and
#   @@READ lun=0 off=N len=N md5=HEX     the discarded range read back
#   @@FILE md5=HEX                       the file, before it is removed
# PHASE=nodiscard: the same blkdiscard, which must fail (--no-discard)
#   Output block: blkdiscard
for lun in $(disk_luns); do
    q=/sys/block/$(basename "$(lun_dev "$lun")")/queue
    report QUEUE lun="$lun" lbs="$(cat "$q/logical_block_size")" \
        discard_max_bytes="$(cat "$q/discard_max_bytes")" \
        discard_granularity="$(cat "$q/discard_granularity")" \
        provisioning_mode="$(cat /sys/class/scsi_disk/*:"$lun"/provisioning_mode)"
done
dev=$(lun_dev 0)
fs=$(lun_dev 1)
mkdir -p /mnt
case "$PHASE" in
    write)
        run write dd if=/harness/files/data of="$dev" bs=1048576 seek="$DATA_OFF" \
            oflag=direct,seek_bytes conv=fsync
        run mkfs mke2fs -F -b 4096 "$fs"
        run mount mount -t ext4 "$fs" /mnt
        run copy cp /harness/files/data /mnt/data
        run sync sync
        run umount umount /mnt ;;
    discard)
        run blkdiscard blkdiscard -o "$DISCARD_OFF" -l "$DISCARD_LEN" "$dev"
        report READ lun=0 off="$DISCARD_OFF" len="$DISCARD_LEN" md5="$(md5 "$dev" \
            bs=65536 skip="$DISCARD_OFF" count="$DISCARD_LEN" iflag=skip_bytes,count_bytes)"
        run mount mount -t ext4 "$fs" /mnt
        report FILE md5="$(md5sum /mnt/data | cut -d' ' -f1)"
        run remove sh -c 'rm /mnt/data && sync'
        run fstrim fstrim -v /mnt
        run umount umount /mnt ;;
    nodiscard)
        run blkdiscard blkdiscard -o "$DISCARD_OFF" -l "$DISCARD_LEN" "$dev" ;;
    *)
        echo "unknown PHASE=$PHASE"
        exit 2 ;;
esac
# The commands' exit statuses are in their output blocks, for the host to judge.
exit 0
