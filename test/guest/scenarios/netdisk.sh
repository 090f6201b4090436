# Scenario "netdisk" (boot with -x fio): LUN 0 is a network LUN (an iSCSI
# passthrough unit or an NBD export), served read-write; the host stops its
# server during the fio phase and starts it again. Offsets in bytes.
#   blocks: inq (sg_inq), vpd_sn (sg_vpd -p sn), vpd_di (sg_vpd -p di),
#           luns (sg_luns)                       LUN 0's identity
#   @@MD5 lun=L when=before md5=HEX              every disk read whole
#   block write: /harness/files/data written at $DATA_OFF (O_DIRECT, fsync)
#   @@READ what=data md5=HEX                     that range read back
#   block sync: sg_sync -v (SYNCHRONIZE CACHE(10))
#   block fua: sg_dd of /harness/files/fua at $FUA_OFF with fua=1 (WRITE(10)
#           with FUA), then @@READ what=fua md5=HEX
#   blocks reset: sg_reset -d -v (LOGICAL UNIT RESET), turs_after_reset
#           (sg_turs -n 3: the first may report the unit attention), then
#           @@READ what=after_reset md5=HEX      the data range again
#   (with RESET=0 the reset steps are left out)
#   @@FIO-STARTED                                fio runs (randwrite of
#           [$FIO_OFF, +$FIO_SIZE), QD16, CRC32C headers, then verified)
#   @@FIO-WRITING writes=N                       the disk completed N >= 256
#           writes since (the host stops the server now)
#   @@FIO rc=N write_clat_max_us=N read_clat_max_us=N   block fio
#   block sync_after: sg_sync -v after fio (after the server's restart)
#   @@SLOW n=N max_ms=N       the dd probe (4 KiB O_DIRECT reads of the data
#           range, one every 50 ms while fio ran): how many took over 500 ms,
#           the longest
#   @@ERRORS n=N + block errors                  kernel lines about SCSI
#           timeouts, aborts, resets or I/O errors (for the record)
#   @@MD5 lun=0 when=after md5=HEX               LUN 0 read whole at the end
dev=$(lun_dev 0)
sg=$(lun_sg 0)
ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }
range_md5() { # OFF LEN
    md5 "$dev" bs=65536 skip="$1" count="$2" iflag=skip_bytes,count_bytes
}

run inq sg_inq "$sg"
run vpd_sn sg_vpd -p sn "$sg"
run vpd_di sg_vpd -p di "$sg"
run luns sg_luns "$sg"
for lun in $(disk_luns); do
    report MD5 lun="$lun" when=before md5="$(md5 "$(lun_dev "$lun")" bs=4194304)"
done

data_len=$(wc -c < /harness/files/data)
run write dd if=/harness/files/data of="$dev" bs=1048576 seek="$DATA_OFF" \
    oflag=direct,seek_bytes conv=fsync
report READ what=data md5="$(range_md5 "$DATA_OFF" "$data_len")"
run sync sg_sync -v "$sg"
fua_len=$(wc -c < /harness/files/fua)
run fua sg_dd if=/harness/files/fua of="$sg" bs=512 seek=$((FUA_OFF / 512)) \
    count=$((fua_len / 512)) fua=1 verbose=1
report READ what=fua md5="$(range_md5 "$FUA_OFF" "$fua_len")"

if [ "${RESET:-1}" = 1 ]; then
    run reset sg_reset -d -v "$sg"
    run turs_after_reset sg_turs -n 3 "$sg"
    report READ what=after_reset md5="$(range_md5 "$DATA_OFF" "$data_len")"
fi

fio --name=netdisk --filename="$dev" --ioengine=libaio --direct=1 --iodepth=16 \
    --rw=randwrite --bs=4k --offset="$FIO_OFF" --size="$FIO_SIZE" --randseed=19 \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 \
    --output-format=json >/tmp/fio.json 2>/tmp/fio.err &
fio_pid=$!
report FIO-STARTED
# A probe beside fio: small reads of the data range, timed, so that the
# stall the server's restart causes shows from the guest's side; and
# @@FIO-WRITING once the disk has completed 256 writes since fio started
# (the host kills the server then: writes acknowledged and not flushed).
stat=/sys/block/${dev#/dev/}/stat
read -r _ _ _ _ w0 _ <"$stat"
writing=0
slow=0
longest=0
while kill -0 "$fio_pid" 2>/dev/null; do
    if [ "$writing" = 0 ]; then
        read -r _ _ _ _ w _ <"$stat"
        if [ $((w - w0)) -ge 256 ]; then
            report FIO-WRITING writes=$((w - w0))
            writing=1
        fi
    fi
    t0=$(ms)
    dd if="$dev" of=/dev/null bs=4096 count=1 skip=$((DATA_OFF / 4096)) iflag=direct 2>/dev/null
    t=$(($(ms) - t0))
    [ "$t" -gt "$longest" ] && longest=$t
    [ "$t" -gt 500 ] && slow=$((slow + 1))
    sleep 0.05
done
wait "$fio_pid"
rc=$?
clat_max() { # SECTION: fio's JSON puts one key a line; clat_ns max of "read" or "write"
    awk -v s="\"$1\" : {" 'index($0, s) {w = 1} w && /"clat_ns" : \{/ {c = 1}
        c && /"max" :/ {gsub(/[^0-9]/, ""); print int($0 / 1000); exit}' /tmp/fio.json
}
printf '@@BEGIN name=fio\n'
cat /tmp/fio.err
grep -E '"error"|"io_kbytes"|"max"' /tmp/fio.json | head -20
echo "@@END name=fio rc=$rc"
report FIO rc="$rc" write_clat_max_us="$(clat_max write)" read_clat_max_us="$(clat_max read)"
report SLOW n="$slow" max_ms="$longest"
# SYNCHRONIZE CACHE after the server's restart (a unit attention of a new
# session reported first and cleared by the TEST UNIT READYs).
sg_turs -n 2 "$sg" >/dev/null 2>&1
run sync_after sg_sync -v "$sg"
errors=$(dmesg | grep -E 'sd |scsi|blk_|I/O error' | grep -iE 'timing out|abort|reset|error|critical')
printf '@@BEGIN name=errors\n%s\n@@END name=errors rc=0\n' "$errors"
report ERRORS n="$(printf '%s' "$errors" | grep -c .)"
sync
echo 3 > /proc/sys/vm/drop_caches
report MD5 lun=0 when=after md5="$(md5 "$dev" bs=4194304)"
exit 0
