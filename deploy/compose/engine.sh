# shellcheck shell=bash
# Sourced by up.sh and down.sh: finds a container engine that answers, and its compose.
#
# find_compose sets COMPOSE (the command, as an array: `docker compose`, `docker-compose`,
# `podman compose` or `podman-compose`) and ENGINE (docker or podman), or prints why none
# answers and returns 1. An engine "answers" when `docker info` / `podman info` succeeds.

# The last line a failed command wrote on stderr (docker info prints its client part on
# stdout, and why the server part failed on stderr), for the message.
_why() {
    local line last=""
    while IFS= read -r line; do
        [ -n "$line" ] && last="$line"
    done <<<"$1"
    printf '%s' "${last:-it failed without saying why}"
}

# `timeout` where it exists: a daemon that hangs must not hang `make up`.
_bounded() {
    if command -v timeout >/dev/null 2>&1; then
        timeout 30 "$@"
    else
        "$@"
    fi
}

find_compose() {
    local problems=() out
    COMPOSE=()
    ENGINE=""
    if command -v docker >/dev/null 2>&1; then
        if out=$(_bounded docker info 2>&1 >/dev/null); then
            if _bounded docker compose version >/dev/null 2>&1; then
                COMPOSE=(docker compose)
            elif command -v docker-compose >/dev/null 2>&1 \
                && _bounded docker-compose version >/dev/null 2>&1; then
                COMPOSE=(docker-compose)
            else
                problems+=("docker answers, but has no compose (install the Docker Compose plugin)")
            fi
            [ ${#COMPOSE[@]} -gt 0 ] && ENGINE=docker
        else
            problems+=("docker: $(_why "$out")")
        fi
    else
        problems+=("docker: not installed")
    fi
    if [ -z "$ENGINE" ]; then
        if command -v podman >/dev/null 2>&1; then
            if out=$(_bounded podman info 2>&1 >/dev/null); then
                if _bounded podman compose version >/dev/null 2>&1; then
                    COMPOSE=(podman compose)
                elif command -v podman-compose >/dev/null 2>&1; then
                    COMPOSE=(podman-compose)
                else
                    problems+=("podman answers, but has no compose (install podman-compose)")
                fi
                [ ${#COMPOSE[@]} -gt 0 ] && ENGINE=podman
            else
                problems+=("podman: $(_why "$out")")
            fi
        else
            problems+=("podman: not installed")
        fi
    fi
    if [ -z "$ENGINE" ]; then
        local joined
        joined=$(printf '%s; ' "${problems[@]}")
        echo "paceline: $1 needs a running container engine (Docker or Podman, with compose); none answers here: ${joined%; }." >&2
        echo "paceline: \`make run\` runs the same stack without containers (RabbitMQ and PostgreSQL on this machine)." >&2
        return 1
    fi
    # Podman's API socket, for Alloy (which reads the containers' logs through it).
    if [ "$ENGINE" = podman ] && [ -z "${DOCKER_SOCKET:-}" ]; then
        local socket
        socket=$(podman info --format '{{.Host.RemoteSocket.Path}}' 2>/dev/null || true)
        socket="${socket#unix://}"
        if [ -n "$socket" ]; then
            export DOCKER_SOCKET="$socket"
        fi
    fi
    return 0
}
