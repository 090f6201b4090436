# Scenario "killio" (boot with -x fio): QEMU is SIGKILLed while fio runs at
# queue depth 32; a new QEMU then checks the disk. LUN 0 is laid out as
#   [0, 8 MiB)    fio's region: random reads and writes, libaio, O_DIRECT
#   [8, 16 MiB)   written from /harness/files/synced and fsynced before fio
#   [16, 32 MiB)  never written
# PHASE=io:
#   @@SYNCED rc=N              dd + fsync of the synced region
#   @@IO-RUNNING inflight=N ios=M fio=running|ended   fio has run for 3 s (or until 16
#                              requests were seen in flight): N = most seen in
#                              flight on the disk (/sys/block/X/inflight, a
#                              sample that often finds none: the single
#                              emulated CPU runs this shell only between
#                              fio's batches), M = requests the disk completed
#                              meanwhile (/sys/block/X/stat) (block
#                              fio-output: fio's output if it ended)
#   then waits (the host kills QEMU meanwhile)
# PHASE=check:
#   @@REGION name=synced|untouched|fio rc=N md5=HEX   O_DIRECT reads
dev=$(lun_dev 0)
region() { # NAME SKIP_MIB COUNT_MIB
    _out=$(dd if="$dev" bs=1048576 skip="$2" count="$3" iflag=direct 2>/dev/null | md5sum)
    # The pipeline's status is md5sum's: read again for dd's.
    dd if="$dev" of=/dev/null bs=1048576 skip="$2" count="$3" iflag=direct 2>/dev/null
    report REGION name="$1" rc=$? md5="${_out%% *}"
}
case "$PHASE" in
    io)
        dd if=/harness/files/synced of="$dev" bs=1048576 seek=8 oflag=direct conv=fsync 2>/dev/null
        report SYNCED rc=$?
        fio --name=killio --filename="$dev" --ioengine=libaio --direct=1 --iodepth=32 \
            --rw=randrw --bs=4k --offset=0 --size=8M --time_based --runtime=600 \
            --randseed=7 >/tmp/fio.out 2>&1 &
        fio_pid=$!
        stat=/sys/block/${dev#/dev/}/stat
        read -r r0 _ _ _ w0 _ <"$stat"
        most=0
        i=0
        while [ "$i" -lt 300 ] && kill -0 "$fio_pid" 2>/dev/null; do
            # The shell's own read: no process per sample to take the
            # (emulated, single) CPU from fio.
            read -r reads writes <"/sys/block/${dev#/dev/}/inflight"
            n=$((reads + writes))
            [ "$n" -gt "$most" ] && most=$n
            [ "$most" -ge 16 ] && break
            [ "$i" -ge 30 ] && break
            sleep 0.1
            i=$((i + 1))
        done
        fio_state=running
        if ! kill -0 "$fio_pid" 2>/dev/null; then
            fio_state=ended
            run fio-output cat /tmp/fio.out
        fi
        read -r r1 _ _ _ w1 _ <"$stat"
        report IO-RUNNING inflight="$most" ios="$((r1 - r0 + w1 - w0))" fio="$fio_state"
        sleep 600 ;;
    check)
        region synced 8 8
        region untouched 16 16
        region fio 0 8 ;;
esac
