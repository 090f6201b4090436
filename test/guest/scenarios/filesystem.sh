# Scenario "filesystem": an ext2 file system (busybox mke2fs, mounted by the
# ext4 driver) on LUN 0, across two boots.
# PHASE=create: make the file system, mount it, copy /harness/files/* into
#   /files, sync, unmount; command output blocks: mkfs, mount, copy, sync,
#   umount
# PHASE=check: mount it again and read every file back; output blocks mount,
#   umount, and
#   @@FILE name=NAME size=BYTES md5=HEX      each file in /files
dev=$(lun_dev 0)
mkdir -p /mnt
case "$PHASE" in
    create)
        run mkfs mke2fs -F -b 4096 -L vhost-scsi "$dev"
        run mount mount -t ext4 "$dev" /mnt
        run copy sh -c 'mkdir -p /mnt/files && cp /harness/files/* /mnt/files/'
        run sync sync
        run umount umount /mnt ;;
    check)
        run mount mount -t ext4 "$dev" /mnt
        for f in /mnt/files/*; do
            [ -f "$f" ] || continue
            report FILE name="${f##*/}" size="$(stat -c %s "$f")" \
                md5="$(md5sum "$f" | cut -d' ' -f1)"
        done
        run umount umount /mnt ;;
    *)
        echo "unknown PHASE=$PHASE"
        exit 2 ;;
esac
# The commands' exit statuses are in their output blocks, for the host to judge.
exit 0
