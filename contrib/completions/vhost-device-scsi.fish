complete -c vhost-device-scsi -s s -l socket-path -d 'Unix socket to listen on for the VMM (QEMU\'s vhost-user-scsi-pci chardev); a stale socket file there is replaced' -r -F
complete -c vhost-device-scsi -l socket-fd -d 'Serve the listening Unix socket open at descriptor N instead of binding --socket-path (which then names it: the state file\'s default path and the log use it). For supervisors other than systemd; under systemd socket activation (LISTEN_FDS) the socket is taken without it. The socket is never unlinked' -r
complete -c vhost-device-scsi -l api-socket -d 'Unix socket for the management API (JSON-RPC 2.0, one request a line: add, remove and resize LUNs, list them, statistics; the client is vhost-device-scsi-ctl). Whoever may connect to it may open any file the daemon can as a LUN: it has its own --api-socket-mode and --api-socket-group' -r -F
complete -c vhost-device-scsi -l api-socket-mode -d 'Permissions of the API socket, in octal (default 0600: only the daemon\'s user); not widened by --socket-mode' -r
complete -c vhost-device-scsi -l api-socket-group -d 'Group of the API socket: a group name or a numeric gid (default: the daemon\'s group)' -r
complete -c vhost-device-scsi -l socket-mode -d 'Permissions of the socket, in octal (default 0600): whoever may connect to it gets every image, so only the daemon\'s user may unless this (with --socket-group) lets a group or everyone in. The umask does not widen it' -r
complete -c vhost-device-scsi -l socket-group -d 'Group of the socket: a group name or a numeric gid (default: the daemon\'s group). With --socket-mode 0660 its members may connect' -r
complete -c vhost-device-scsi -l num-queues -d 'Request queues to offer the VMM (1-62; QEMU asks for one per vCPU by default, and must not ask for more than are offered)' -r
complete -c vhost-device-scsi -l threads -d 'Worker threads serving the request queues (1 to --num-queues); request queue i is served by thread i modulo THREADS' -r
complete -c vhost-device-scsi -l poll-us -d 'Busy-poll a queue for up to this many microseconds after it runs dry before sleeping until the next kick (0-1000; 0, the default, never polls): lower latency for a core\'s worth of CPU' -r
complete -c vhost-device-scsi -l io-engine -d 'How READ and WRITE transfers and SYNCHRONIZE CACHE\'s flush are carried out: `io-uring` keeps up to 128 in flight per request queue; `sync` does one synchronous call at a time per worker thread; `auto` (the default) uses io_uring where the kernel supports it, else sync' -r -f -a "auto\t''
sync\t''
io-uring\t''"
complete -c vhost-device-scsi -l state-file -d 'Where SIGTERM (or SIGINT) leaves the guest\'s state (the write cache and sense format it set, its pending unit attentions, a flush failure, the LUNs added through the API) for the next daemon, which takes it over at start and removes the file (default: the socket path with ".state" appended)' -r -F
complete -c vhost-device-scsi -l sandbox -d 'Confine the daemon once its images and sockets are open: Landlock (files only beneath the images\', the sockets\', the state file\'s and --sandbox-allow directories) where the kernel has it, and a seccomp allowlist of system calls (any other ends the daemon with a line on stderr). `off` applies neither' -r -f -a "on\t'Landlock (where the kernel has it) and the seccomp allowlist'
off\t'Nothing is applied'"
complete -c vhost-device-scsi -l sandbox-allow -d 'With the sandbox on, a directory beneath which the management API\'s lun_add may open images (repeatable); without it lun_add can only add images in the directories of the startup images' -r -F
complete -c vhost-device-scsi -l initiator-name -d 'The iSCSI initiator name the daemon logs in to iscsi:// LUNs with (an iqn., eui. or naa. name, as the target\'s ACLs know it; default: iqn.2008-11.org.linux-kvm:vhost-device-scsi.HOSTNAME)' -r
complete -c vhost-device-scsi -s r -l read-only -d 'Serve every image read-only (as ",ro" on each): images are opened O_RDONLY and guest writes fail with DATA PROTECT'
complete -c vhost-device-scsi -l solid-state -d 'Report the disks as solid state (non-rotating) to the guest'
complete -c vhost-device-scsi -l no-discard -d 'Do not offer UNMAP or WRITE SAME with UNMAP: thin provisioning off, guest discards never punch holes in the images'
complete -c vhost-device-scsi -l direct -d 'Open the images with O_DIRECT, bypassing the host page cache (as QEMU\'s cache=none); the block size must meet the image\'s direct I/O alignment'
complete -c vhost-device-scsi -l incoming -d 'Start for an incoming live migration (the VMM started with -incoming): open and check every image, but take no image lock until the VMM starts the device, so the daemon of the VM\'s source may still hold them'
complete -c vhost-device-scsi -l sandbox-allow-network -d 'With the sandbox on, let the management API\'s lun_add attach network LUNs over TCP (nbd://, iscsi://) though none is given at start-up (with one at start-up, TCP sockets are allowed anyway)'
complete -c vhost-device-scsi -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vhost-device-scsi -s V -l version -d 'Print version'
