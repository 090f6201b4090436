complete -c vhost-device-scsi-ctl -s s -l api-socket -d 'The daemon\'s API socket (its --api-socket)' -r -F
complete -c vhost-device-scsi-ctl -l params -d 'The parameters as one JSON object, instead of KEY=VALUE arguments' -r
complete -c vhost-device-scsi-ctl -s h -l help -d 'Print help'
complete -c vhost-device-scsi-ctl -s V -l version -d 'Print version'
