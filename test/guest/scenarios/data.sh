# Scenario "data": what the guest reads back.
#   @@MD5 lun=L md5=HEX                 whole disk, for each LUN in $MD5_LUNS
#   @@READ lun=L off=BYTES len=BYTES md5=HEX
#                                       each "LUN OFFSET LENGTH" line of
#                                       /harness/files/reads
# All reads are O_DIRECT: whole disks 4 MiB at a time (the kernel splits
# them into requests of up to max_sectors_kb with many segments each).
for lun in $MD5_LUNS; do
    report MD5 lun="$lun" md5="$(md5 "$(lun_dev "$lun")" bs=4194304)"
done
while read -r lun off len; do
    sum=$(dd if="$(lun_dev "$lun")" bs="$len" count=1 skip="$off" iflag=skip_bytes,direct 2>/dev/null |
        md5sum | cut -d' ' -f1)
    report READ lun="$lun" off="$off" len="$len" md5="$sum"
done < /harness/files/reads
