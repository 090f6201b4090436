# Scenario "tools": sg3_utils against LUN 0, each run framed by
# @@BEGIN name=X / @@END name=X rc=N (at most RUN_TIMEOUT seconds each), then
#   @@MD5 lun=0 md5=HEX     LUN 0 read whole after the resets
sg=$(lun_sg 0)
run inq sg_inq "$sg"
run vpd sg_vpd -a "$sg"
run readcap sg_readcap -l "$sg"
run luns sg_luns "$sg"
run modes sg_modes -a "$sg"
run opcodes sg_opcodes "$sg"
run tmfs sg_opcodes --tmf "$sg"
run rep_zones sg_rep_zones "$sg"
run turs sg_turs -n 3 "$sg"
run reset_device sg_reset -v -d "$sg"
run dmesg_reset sh -c "dmesg | grep reset"
run reset_bus sg_reset -b "$sg"
run turs_after_reset sg_turs -n 3 "$sg"
run turs_again sg_turs -n 3 "$sg"
# READ DEFECT DATA(10): a command the daemon does not implement.
run raw_unsupported sg_raw "$sg" 37 00 00 00 00 00 00 00 00 00
report MD5 lun=0 md5="$(md5 "$(lun_dev 0)")"
