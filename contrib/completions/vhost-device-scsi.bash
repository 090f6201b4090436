_vhost__device__scsi() {
    local i cur prev opts cmd
    COMPREPLY=()
    if [[ "${BASH_VERSINFO[0]}" -ge 4 ]]; then
        cur="$2"
    else
        cur="${COMP_WORDS[COMP_CWORD]}"
    fi
    prev="$3"
    cmd=""
    opts=""

    for i in "${COMP_WORDS[@]:0:COMP_CWORD}"
    do
        case "${cmd},${i}" in
            ",$1")
                cmd="vhost__device__scsi"
                ;;
            *)
                ;;
        esac
    done

    case "${cmd}" in
        vhost__device__scsi)
            opts="-s -r -h -V --socket-path --socket-fd --api-socket --api-socket-mode --api-socket-group --socket-mode --socket-group --read-only --solid-state --no-discard --direct --num-queues --threads --poll-us --io-engine --state-file --incoming --sandbox --sandbox-allow --sandbox-allow-network --initiator-name --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 1 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --socket-path)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                -s)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --socket-fd)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --api-socket)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --api-socket-mode)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --api-socket-group)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --socket-mode)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --socket-group)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --num-queues)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --threads)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --poll-us)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --io-engine)
                    COMPREPLY=($(compgen -W "auto sync io-uring" -- "${cur}"))
                    return 0
                    ;;
                --state-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --sandbox)
                    COMPREPLY=($(compgen -W "on off" -- "${cur}"))
                    return 0
                    ;;
                --sandbox-allow)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --initiator-name)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
    esac
}

if [[ "${BASH_VERSINFO[0]}" -eq 4 && "${BASH_VERSINFO[1]}" -ge 4 || "${BASH_VERSINFO[0]}" -gt 4 ]]; then
    complete -F _vhost__device__scsi -o nosort -o bashdefault -o default vhost-device-scsi
else
    complete -F _vhost__device__scsi -o bashdefault -o default vhost-device-scsi
fi
