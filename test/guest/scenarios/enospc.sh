# Scenario "enospc": LUN 0's image lives on a host file system far smaller
# than the disk; LUN 1 is an ordinary disk. The guest writes LUN 0 whole
# until the host file system is full, then reads both disks.
#   @@FILL rc=N               dd of the whole of LUN 0 (O_DIRECT): must fail
#   @@READ lun=L rc=N md5=HEX  after that: LUN 0's first $READ_MIB MiB, LUN 1
#                              whole (O_DIRECT)
#   command output block: errors   the kernel's messages about the failure
dev0=$(lun_dev 0)
dd if=/dev/urandom of="$dev0" bs=1048576 oflag=direct 2>/dev/null
report FILL rc=$?
read_md5() { # LUN [dd options]
    _lun=$1
    _dev=$(lun_dev "$1")
    shift
    dd if="$_dev" of=/dev/null bs=1048576 iflag=direct "$@" 2>/dev/null
    _rc=$?
    report READ lun="$_lun" rc=$_rc md5="$(md5 "$_dev" "$@")"
}
read_md5 0 count="$READ_MIB"
read_md5 1
run errors sh -c 'dmesg | grep -i -e "space allocation" -e "data protect" -e "I/O error" | head -n 5'
exit 0
