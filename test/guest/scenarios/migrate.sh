# Scenario "migrate" (boot with -x fio; LUN 0 the disk, LUN 1 a mailbox the
# host writes): rounds of fio, each writing all of LUN 0 in random order
# (libaio, O_DIRECT, 32 requests in flight, 4 KiB blocks each with a
# CRC32C header and a seed of its own round, so a block left over from an
# earlier round fails too), then reading it all back and verifying it.
# Meanwhile the host live-migrates the VM (guest_migrate*): the lines after
# that come from the destination's serial console. Once the host has
# written "MIGRATED" at the start of LUN 1 (after the migration completed,
# or was cancelled) the guest runs one more round, and stops.
#   @@FIO-STARTED                         the first round is running
#   @@FIO-ROUND n=N rc=N                  a round's fio exit status
#   @@FIO rc=N rounds=N clat_max_us=N verified_kib=N
#                                         the last round's exit status; the
#                                         longest write completion of all
#                                         rounds; what their read-backs verified
#   @@ERRORS n=N                          kernel lines about SCSI timeouts, aborts, resets or I/O errors
#   command output block: fio (the last round's)
dev=$(lun_dev 0)
box=$(lun_dev 1)
size=$(blockdev --getsize64 "$dev")
told() { [ "$(dd if="$box" bs=512 count=1 iflag=direct 2>/dev/null | head -c 8)" = MIGRATED ]; }
round=0 rc=0 clat_max=0 verified=0 last=0
while :; do
    round=$((round + 1))
    told && last=1
    fio --name=migrate --filename="$dev" --ioengine=libaio --direct=1 --iodepth=32 \
        --rw=randwrite --bs=4k --size="$size" --randseed=$((1000 + round)) \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 \
        --output-format=json >/tmp/fio.json 2>/tmp/fio.err &
    fio_pid=$!
    if [ "$round" = 1 ]; then
        sleep 0.5
        report FIO-STARTED
    fi
    wait "$fio_pid"
    rc=$?
    report FIO-ROUND n="$round" rc="$rc"
    # fio's JSON puts one key a line: the write side's clat_ns max, the
    # read side's io_kbytes.
    c=$(awk '/"write" : \{/ {w = 1} w && /"clat_ns" : \{/ {c = 1}
        c && /"max" :/ {gsub(/[^0-9]/, ""); print int($0 / 1000); exit}' /tmp/fio.json)
    v=$(awk '/"read" : \{/ {r = 1} r && /"io_kbytes" :/ {gsub(/[^0-9]/, ""); print; exit}' /tmp/fio.json)
    [ "${c:-0}" -gt "$clat_max" ] && clat_max=$c
    verified=$((verified + ${v:-0}))
    [ "$rc" = 0 ] && [ "$last" = 0 ] && [ "$round" -lt "${MAX_ROUNDS:-60}" ] || break
done
printf '@@BEGIN name=fio\n'
cat /tmp/fio.err
grep -E '"error"|"io_kbytes"|"max"' /tmp/fio.json | head -20
echo "@@END name=fio rc=$rc"
report FIO rc="$rc" rounds="$round" clat_max_us="$clat_max" verified_kib="$verified"
errors=$(dmesg | grep -E 'sd |scsi|blk_|I/O error' | grep -iE 'timing out|abort|reset|error|critical')
printf '@@BEGIN name=errors\n%s\n@@END name=errors rc=0\n' "$errors"
report ERRORS n="$(printf '%s' "$errors" | grep -c .)"
