# Scenario "discovery": what the guest's SCSI stack found on each LUN.
#   @@DISK lun=L dev=sdX sg=sgN size=BYTES sectors=N lbs=N pbs=N ro=0|1
#          rotational=0|1 vendor=V model=M rev=R serial=S naa=HEX byid=NAME,...
# (strings squashed: blanks trimmed, inner blanks as "_")
for lun in $(disk_luns); do
    dev=$(lun_dev "$lun")
    sg=$(lun_sg "$lun")
    b=${dev#/dev/}
    q=/sys/block/$b/queue
    d=/sys/block/$b/device
    serial=$(sg_vpd -p sn "$sg" | sed -n 's/^ *Unit serial number: *//p')
    byid=$(for n in /dev/disk/by-id/*; do
        [ "$(readlink -f "$n")" = "$dev" ] && echo "${n##*/}"
    done | sort | tr '\n' , | sed 's/,$//')
    report DISK lun="$lun" dev="$b" sg="${sg#/dev/}" size="$(blockdev --getsize64 "$dev")" \
        sectors="$(cat "/sys/block/$b/size")" lbs="$(cat "$q/logical_block_size")" \
        pbs="$(cat "$q/physical_block_size")" ro="$(cat "/sys/block/$b/ro")" \
        rotational="$(cat "$q/rotational")" vendor="$(squash "$(cat "$d/vendor")")" \
        model="$(squash "$(cat "$d/model")")" rev="$(squash "$(cat "$d/rev")")" \
        serial="$(squash "$serial")" naa="$(lun_naa "$lun")" byid="$byid"
done
