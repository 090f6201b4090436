# Scenario "upgrade" (boot with -x fio; the device's chardev reconnects):
# fio writes LUN 0 in random order, libaio, O_DIRECT, 32 requests in flight,
# 4 KiB blocks each with a CRC32C header, then reads it all back and
# verifies it; meanwhile the host stops the daemon with SIGTERM and starts a
# new one, several times.
#   @@FIO-STARTED                         fio is running
#   @@FIO rc=N clat_max_us=N               fio's exit status; its longest write completion
#   @@ERRORS n=N                          kernel lines about SCSI timeouts, aborts, resets or I/O errors
#   command output block: fio
dev=$(lun_dev 0)
fio --name=upgrade --filename="$dev" --ioengine=libaio --direct=1 --iodepth=32 \
    --rw=randwrite --bs=4k --size="$(blockdev --getsize64 "$dev")" --randseed=11 \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 \
    --output-format=json >/tmp/fio.json 2>/tmp/fio.err &
fio_pid=$!
sleep 0.5
report FIO-STARTED
wait "$fio_pid"
rc=$?
# fio's JSON puts one key a line: the write side's clat_ns max.
clat_max=$(awk '/"write" : \{/ {w = 1} w && /"clat_ns" : \{/ {c = 1}
    c && /"max" :/ {gsub(/[^0-9]/, ""); print int($0 / 1000); exit}' /tmp/fio.json)
printf '@@BEGIN name=fio\n'
cat /tmp/fio.err
grep -E '"error"|"io_kbytes"|"max"' /tmp/fio.json | head -20
echo "@@END name=fio rc=$rc"
report FIO rc="$rc" clat_max_us="${clat_max:-none}"
errors=$(dmesg | grep -E 'sd |scsi|blk_|I/O error' | grep -iE 'timing out|abort|reset|error|critical')
printf '@@BEGIN name=errors\n%s\n@@END name=errors rc=0\n' "$errors"
report ERRORS n="$(printf '%s' "$errors" | grep -c .)"
