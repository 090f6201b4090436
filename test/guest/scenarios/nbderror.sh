# Scenario "nbderror": LUN 0 is an NBD export (read-only) whose server fails
# reads of one range with EIO; every read is O_DIRECT, 4 KiB at a time:
#   @@READ what=before|bad|after|bad_again|start rc=N md5=HEX
#       before: the 4 KiB just before $BAD_OFF; bad: the first 4 KiB at
#       $BAD_OFF; after: the 4 KiB just past $BAD_OFF + $BAD_LEN;
#       bad_again: the last 4 KiB of the bad range; start: the disk's first
#       64 KiB (read after the errors)
#   block errors: the kernel's lines about the failed reads
dev=$(lun_dev 0)
read_at() { # WHAT OFF LEN
    _out=$(dd if="$dev" bs="$3" count=1 skip="$2" iflag=skip_bytes,direct 2>/dev/null | md5sum)
    # The pipeline's status is md5sum's: read again for dd's.
    dd if="$dev" of=/dev/null bs="$3" count=1 skip="$2" iflag=skip_bytes,direct 2>/dev/null
    report READ what="$1" rc=$? md5="${_out%% *}"
}
read_at before $((BAD_OFF - 4096)) 4096
read_at bad "$BAD_OFF" 4096
read_at after $((BAD_OFF + BAD_LEN)) 4096
read_at bad_again $((BAD_OFF + BAD_LEN - 4096)) 4096
read_at start 0 65536
run errors sh -c "dmesg | grep -iE 'sense|error|sector'"
exit 0
