# Scenario "readonly": writes to LUN 0 must fail, the data stay.
#   @@RO lun=0 ro=0|1 md5_before=HEX md5_after=HEX
#   command output blocks: dd_write, dd_write_last (through the block layer),
#   write6, write10, write16, write_verify10 (sent with sg_raw), mode_sense
dev=$(lun_dev 0)
sg=$(lun_sg 0)
b=${dev#/dev/}
before=$(md5 "$dev")
last=$(( $(blockdev --getsize64 "$dev") / 4096 - 1 ))
run dd_write dd if=/dev/urandom of="$dev" bs=4096 count=1 oflag=direct conv=fsync
run dd_write_last dd if=/dev/urandom of="$dev" bs=4096 count=1 seek="$last" oflag=direct conv=fsync
dd if=/dev/urandom of=/tmp/data bs=4096 count=1 2>/dev/null
run write6 sg_raw -s 512 -i /tmp/data "$sg" 0a 00 00 00 01 00
run write10 sg_raw -s 4096 -i /tmp/data "$sg" 2a 00 00 00 00 00 00 00 08 00
run write16 sg_raw -s 512 -i /tmp/data "$sg" 8a 00 00 00 00 00 00 00 00 00 00 00 00 01 00 00
run write_verify10 sg_raw -s 512 -i /tmp/data "$sg" 2e 00 00 00 00 00 00 00 01 00
run mode_sense sg_modes -p 0x08 "$sg"
echo 3 > /proc/sys/vm/drop_caches
report RO lun=0 ro="$(cat "/sys/block/$b/ro")" md5_before="$before" md5_after="$(md5 "$dev")"
