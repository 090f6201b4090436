# Scenario "writetools": sg3_utils' write, provisioning and cache commands
# against LUN 0 (read-write, thin provisioned, 512-byte blocks). LBAs and
# block counts come from the environment; each command's output is framed by
# @@BEGIN name=X / @@END name=X rc=N:
#   status_before, status_after  sg_get_lba_status --brief of the whole disk
#   unmap           sg_unmap of $UNMAP_LBAS / $UNMAP_NUMS (one UNMAP, a
#                   descriptor per LBA,NUM pair)
#   ws_unmap        sg_write_same --unmap at $WS_LBA, $WS_NUM blocks
#   ws_ndob         sg_write_same --ndob --unmap at $NDOB_LBA, $NDOB_NUM
#   ws_pattern      sg_write_same of /harness/files/pattern at $PAT_LBA, $PAT_NUM
#   status_X        sg_get_lba_status --brief at the first LBA of X
#   caw_match, caw_miscompare   sg_compare_and_write at $CAW_LBA, $CAW_NUM
#                   with /harness/files/caw_match and caw_miscompare
#   sync            sg_sync
#   modes_default, modes_through, modes_back   sg_modes -p 8 (caching page)
#                   by default, after cache_type "write through", then
#                   "write back"
#   set_through, set_back                      the cache_type writes
# and results:
#   @@READ what=X lba=N blocks=N md5=HEX   the range of X read back (O_DIRECT)
#   @@CACHE when=default|through|back cache_type=TYPE   the kernel's view
sg=$(lun_sg 0)
dev=$(lun_dev 0)
cache=$(ls -d /sys/class/scsi_disk/*:0)/cache_type
read_back() { # WHAT LBA BLOCKS
    report READ what="$1" lba="$2" blocks="$3" md5="$(md5 "$dev" bs=65536 skip=$(($2 * 512)) \
        count=$(($3 * 512)) iflag=skip_bytes,count_bytes)"
}
run status_before sg_get_lba_status --brief --maxlen=4096 "$sg"

run unmap sg_unmap --force --lba="$UNMAP_LBAS" --num="$UNMAP_NUMS" "$sg"
first_lba=${UNMAP_LBAS%%,*}
run status_unmap sg_get_lba_status --brief --lba="$first_lba" "$sg"
lbas=$UNMAP_LBAS,
nums=$UNMAP_NUMS,
while [ -n "$lbas" ]; do
    read_back unmap "${lbas%%,*}" "${nums%%,*}"
    lbas=${lbas#*,}
    nums=${nums#*,}
done

run ws_unmap sg_write_same --unmap --lba="$WS_LBA" --num="$WS_NUM" "$sg"
run status_ws_unmap sg_get_lba_status --brief --lba="$WS_LBA" "$sg"
read_back ws_unmap "$WS_LBA" "$WS_NUM"

run ws_ndob sg_write_same --16 --ndob --unmap --lba="$NDOB_LBA" --num="$NDOB_NUM" "$sg"
run status_ws_ndob sg_get_lba_status --brief --lba="$NDOB_LBA" "$sg"
read_back ws_ndob "$NDOB_LBA" "$NDOB_NUM"

run ws_pattern sg_write_same --in=/harness/files/pattern --lba="$PAT_LBA" --num="$PAT_NUM" "$sg"
run status_ws_pattern sg_get_lba_status --brief --lba="$PAT_LBA" "$sg"
read_back ws_pattern "$PAT_LBA" "$PAT_NUM"

run caw_match sg_compare_and_write --in=/harness/files/caw_match --lba="$CAW_LBA" \
    --num="$CAW_NUM" "$sg"
run caw_miscompare sg_compare_and_write --in=/harness/files/caw_miscompare --lba="$CAW_LBA" \
    --num="$CAW_NUM" "$sg"
read_back caw "$CAW_LBA" "$CAW_NUM"

run sync sg_sync -v "$sg"

run modes_default sg_modes -p 8 "$sg"
report CACHE when=default cache_type="$(squash "$(cat "$cache")")"
run set_through sh -c "echo 'write through' > $cache"
run modes_through sg_modes -p 8 "$sg"
report CACHE when=through cache_type="$(squash "$(cat "$cache")")"
run set_back sh -c "echo 'write back' > $cache"
run modes_back sg_modes -p 8 "$sg"
report CACHE when=back cache_type="$(squash "$(cat "$cache")")"

run status_after sg_get_lba_status --brief --maxlen=4096 "$sg"
# The commands' exit statuses are in their output blocks, for the host to judge.
exit 0
