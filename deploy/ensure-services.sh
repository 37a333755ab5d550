#!/usr/bin/env bash
# ensure-services.sh -- make sure RabbitMQ and PostgreSQL are available for Paceline.
#
# Called by `make run` / `make test` before anything else.  For each service:
#   reachable                      -> use it (one line of output)
#   unreachable, remote host       -> fail with the URL; never installs anything
#   local, installed but stopped   -> start it and wait (bounded) until it accepts connections
#                                     (a RabbitMQ node whose app was stopped: start_app)
#   local, absent, root + apt-get  -> apt-get install, then start (and, for a fresh
#                                     PostgreSQL, trust local TCP logins in pg_hba.conf)
#   anything else                  -> exit 1 saying what is missing and how to fix it
#
# Environment:
#   PACELINE_AMQP_URL       default amqp://guest:guest@127.0.0.1:5672/
#   PACELINE_DATABASE_URL   default postgresql://postgres@127.0.0.1:5432/paceline
#   PACELINE_RABBITMQ_NODE  the broker's node name for rabbitmqctl -n (default: rabbitmqctl's
#                           own, the machine's node); a node so named (a private one, see
#                           deploy/private_services.py) is only ever given start_app
#   ENSURE_SERVICES_TIMEOUT seconds to wait for a started service (default 60)
#
# Idempotent, non-interactive (no stdin needed), safe with CI=true.
set -euo pipefail

AMQP_URL="${PACELINE_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/}"
DATABASE_URL="${PACELINE_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/paceline}"
START_TIMEOUT="${ENSURE_SERVICES_TIMEOUT:-60}"
MIN_RABBITMQ="3.10"
RABBITMQ_NODE="${PACELINE_RABBITMQ_NODE:-}"
RABBITMQCTL=(rabbitmqctl)
[ -z "$RABBITMQ_NODE" ] || RABBITMQCTL+=(-n "$RABBITMQ_NODE")

# Service binaries (rabbitmq-server, rabbitmqctl, ...) live in sbin, which is not
# always on a non-root PATH.
export PATH="${PATH}:/usr/local/sbin:/usr/sbin:/sbin"
export DEBIAN_FRONTEND=noninteractive
exec </dev/null

log() { printf 'ensure-services: %s\n' "$*"; }
warn() { printf 'ensure-services: WARNING: %s\n' "$*" >&2; }
die() {
    printf 'ensure-services: ERROR: %s\n' "$*" >&2
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }
is_root() { [ "$(id -u)" -eq 0 ]; }

have python3 || die "python3 is required to parse the service URLs"

# parse_url URL DEFAULT_PORT
#   -> prints "host<TAB>port<TAB>url-with-password-masked<TAB>host:port-for-messages"
parse_url() {
    python3 - "$1" "$2" <<'PY'
import sys
from urllib.parse import urlsplit

url, default_port = sys.argv[1], int(sys.argv[2])
try:
    u = urlsplit(url)
    host = u.hostname or "localhost"
    port = u.port or default_port
except ValueError as exc:
    sys.exit(f"invalid URL: {exc}")
shown = url
if u.password:
    userinfo, _, hostpart = u.netloc.rpartition("@")
    shown = u._replace(netloc=f"{u.username}:***@{hostpart}").geturl()
hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
print(f"{host}\t{port}\t{shown}\t{hostport}")
PY
}

# can_connect HOST PORT [TIMEOUT] -> success if a TCP connection can be made.
can_connect() {
    python3 - "$1" "$2" "${3:-2}" <<'PY' 2>/dev/null
import socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    socket.create_connection((host, port), timeout=timeout).close()
except OSError:
    sys.exit(1)
PY
}

is_local_host() {
    case "$1" in
        127.0.0.1 | localhost | localhost.localdomain | ::1 | "[::1]") return 0 ;;
        *) return 1 ;;
    esac
}

# wait_for_port HOST PORT SECONDS
wait_for_port() {
    local host="$1" port="$2" deadline=$((SECONDS + $3))
    while [ "$SECONDS" -lt "$deadline" ]; do
        can_connect "$host" "$port" 1 && return 0
        sleep 1
    done
    can_connect "$host" "$port" 1
}

APT_UPDATED=0
apt_install() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "running apt-get update"
        apt-get -q -o DPkg::Lock::Timeout=120 update >/dev/null ||
            return 1
        APT_UPDATED=1
    fi
    log "running apt-get install -y $*"
    apt-get -q -y -o DPkg::Lock::Timeout=120 \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        install "$@" >/dev/null
}

# Can this machine install packages for us?  Prints the reason on failure.
can_apt_install() {
    if ! have apt-get; then
        echo "apt-get is not available"
        return 1
    fi
    if ! is_root; then
        echo "not running as root"
        return 1
    fi
}

# ---------------------------------------------------------------- PostgreSQL

pg_installed() {
    have pg_ctlcluster || compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null
}

# Clusters as "version cluster" lines, preferring the one(s) on the target port.
pg_clusters() {
    local port="$1" conf ver name cport matching="" all=""
    for conf in /etc/postgresql/*/*/postgresql.conf; do
        [ -e "$conf" ] || continue
        name="$(basename "$(dirname "$conf")")"
        ver="$(basename "$(dirname "$(dirname "$conf")")")"
        cport="$(sed -n 's/^[[:space:]]*port[[:space:]]*=[[:space:]]*\([0-9]*\).*/\1/p' "$conf" | tail -n1)"
        all+="${ver} ${name}"$'\n'
        [ "${cport:-5432}" = "$port" ] && matching+="${ver} ${name}"$'\n'
    done
    printf '%s' "${matching:-$all}"
}

pg_start() {
    local port="$1" ver name started=1 rc
    if have pg_ctlcluster; then
        while read -r ver name; do
            [ -n "$ver" ] || continue
            rc=0
            pg_ctlcluster "$ver" "$name" status </dev/null >/dev/null 2>&1 || rc=$?
            if [ "$rc" -eq 0 ]; then
                started=0 # already running (maybe on another address); keep going
                continue
            fi
            log "starting PostgreSQL cluster ${ver}/${name}"
            if pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start </dev/null >/dev/null 2>&1; then
                started=0
            fi
        done < <(pg_clusters "$port")
        [ "$started" -eq 0 ] && return 0
    fi
    if have service && service postgresql start >/dev/null 2>&1; then
        return 0
    fi
    if have systemctl && timeout 30 systemctl start postgresql >/dev/null 2>&1; then
        return 0
    fi
    return 1
}

# Fresh installs only: let Paceline's passwordless postgres@127.0.0.1 URL log in.
pg_trust_local_tcp() {
    local hba line ver name
    for hba in /etc/postgresql/*/*/pg_hba.conf; do
        [ -e "$hba" ] || continue
        local lines=()
        for line in "host all all 127.0.0.1/32 trust" "host all all ::1/128 trust"; do
            # Already present (any whitespace between fields)?
            if ! awk -v want="$line" '{ $1 = $1 } $0 == want { found = 1 } END { exit !found }' "$hba"; then
                lines+=("$line")
            fi
        done
        [ "${#lines[@]}" -gt 0 ] || continue
        {
            echo "# Added by Paceline deploy/ensure-services.sh: trust local TCP logins."
            printf '%s\n' "${lines[@]}"
            cat "$hba"
        } >"${hba}.paceline.tmp"
        chown --reference="$hba" "${hba}.paceline.tmp"
        chmod --reference="$hba" "${hba}.paceline.tmp"
        mv "${hba}.paceline.tmp" "$hba"
        log "freshly installed PostgreSQL: made 127.0.0.1/::1 TCP connections 'trust' in $hba"
        name="$(basename "$(dirname "$hba")")"
        ver="$(basename "$(dirname "$(dirname "$hba")")")"
        pg_ctlcluster "$ver" "$name" reload >/dev/null 2>&1 || true
    done
}

ensure_postgres() {
    local host port shown hp fresh=0 why
    IFS=$'\t' read -r host port shown hp < <(parse_url "$DATABASE_URL" 5432) ||
        die "cannot parse PACELINE_DATABASE_URL"
    [ -n "$port" ] || die "cannot parse PACELINE_DATABASE_URL"

    if can_connect "$host" "$port" 3; then
        log "PostgreSQL reachable at ${hp}"
        return 0
    fi
    if ! is_local_host "$host"; then
        die "PostgreSQL is not reachable at ${shown} (${hp}); it is not on this machine, so nothing was installed or started. Start it there or set PACELINE_DATABASE_URL."
    fi

    if ! pg_installed; then
        if ! why="$(can_apt_install)"; then
            if have apt-get; then
                die "PostgreSQL is not reachable at ${hp} and is not installed (${why}); as root on Debian: apt-get install postgresql"
            fi
            die "PostgreSQL is not reachable at ${hp} and is not installed (${why}); install PostgreSQL with your system's package manager, or set PACELINE_DATABASE_URL"
        fi
        log "PostgreSQL not installed; installing it with apt-get"
        apt_install postgresql ||
            die "apt-get install postgresql failed; fix the error above and run as root: apt-get install postgresql"
        pg_installed || die "apt-get install postgresql finished but no PostgreSQL binaries were found"
        fresh=1
        pg_trust_local_tcp
    fi

    if ! pg_start "$port"; then
        local fix="pg_ctlcluster <version> main start (or: service postgresql start)"
        local first
        first="$(pg_clusters "$port" | head -n1)"
        [ -n "$first" ] && fix="pg_ctlcluster ${first} start (or: service postgresql start)"
        if is_root; then
            die "PostgreSQL is installed but could not be started; check /var/log/postgresql/ and run: ${fix}"
        fi
        die "PostgreSQL is installed but stopped and could not be started as $(id -un); as root run: ${fix}"
    fi
    if ! wait_for_port "$host" "$port" "$START_TIMEOUT"; then
        die "PostgreSQL was started but is still not accepting connections on ${hp} after ${START_TIMEOUT}s; check /var/log/postgresql/ and the cluster's port (pg_lsclusters)"
    fi
    if [ "$fresh" -eq 1 ]; then
        log "PostgreSQL installed and started; reachable at ${hp}"
    else
        log "PostgreSQL started; reachable at ${hp}"
    fi
}

# ---------------------------------------------------------------- RabbitMQ

rabbitmq_installed() { have rabbitmq-server; }

rabbitmq_start() {
    # A node can be up with its app stopped (rabbitmqctl stop_app, e.g. by a restart test that
    # was itself killed): the port is closed, and starting another node would fail.
    if have rabbitmqctl && timeout 20 "${RABBITMQCTL[@]}" ping >/dev/null 2>&1; then
        log "RabbitMQ node ${RABBITMQ_NODE:+$RABBITMQ_NODE }is running with its app stopped; rabbitmqctl start_app"
        timeout 60 "${RABBITMQCTL[@]}" start_app >/dev/null 2>&1 && return 0
    fi
    # A node named by PACELINE_RABBITMQ_NODE is not the machine's service to start.
    [ -z "$RABBITMQ_NODE" ] || return 1
    if rabbitmq-server -detached >/dev/null 2>&1; then
        return 0
    fi
    if have service && service rabbitmq-server start >/dev/null 2>&1; then
        return 0
    fi
    if have systemctl && timeout 60 systemctl start rabbitmq-server >/dev/null 2>&1; then
        return 0
    fi
    return 1
}

rabbitmq_check_version() {
    have rabbitmqctl || return 0
    local ver=""
    ver="$(timeout 20 "${RABBITMQCTL[@]}" version 2>/dev/null | grep -Eo '^[0-9]+\.[0-9]+(\.[0-9]+)?' | head -n1)" || true
    if [ -z "$ver" ] && have dpkg-query; then
        ver="$(dpkg-query -W -f='${Version}' rabbitmq-server 2>/dev/null | grep -Eo '^[0-9]+\.[0-9]+(\.[0-9]+)?' || true)"
    fi
    [ -n "$ver" ] || return 0
    local major minor want_major want_minor
    IFS=. read -r major minor _ <<<"$ver"
    IFS=. read -r want_major want_minor <<<"$MIN_RABBITMQ"
    if [ "$major" -lt "$want_major" ] || { [ "$major" -eq "$want_major" ] && [ "$minor" -lt "$want_minor" ]; }; then
        warn "RabbitMQ ${ver} is older than ${MIN_RABBITMQ}; quorum-queue dead-lettering needs ${MIN_RABBITMQ}+"
    fi
}

# Paceline holds an activity's message unacked until the activity ends: that is how a dead
# worker's work comes back to a survivor. RabbitMQ closes a channel whose delivery stays unacked
# past consumer_timeout (30 minutes by default), which would cut every longer activity short;
# on 3.10 it is a server setting only (no per-queue argument before 3.12). Paceline watches
# liveness itself (AMQP heartbeats, step timeouts, claims), so on a broker of this machine the
# timeout is raised to a week: at once, and in rabbitmq.conf for the next start.
CONSUMER_TIMEOUT_MS="${PACELINE_RABBITMQ_CONSUMER_TIMEOUT_MS:-604800000}"
rabbitmq_consumer_timeout() {
    have rabbitmqctl || return 0
    local current conf=/etc/rabbitmq/rabbitmq.conf
    current="$(timeout 20 "${RABBITMQCTL[@]}" eval 'application:get_env(rabbit, consumer_timeout).' 2>/dev/null | tr -d ' \n')" || current=""
    if [ "$current" != "{ok,${CONSUMER_TIMEOUT_MS}}" ]; then
        if timeout 20 "${RABBITMQCTL[@]}" eval "application:set_env(rabbit, consumer_timeout, ${CONSUMER_TIMEOUT_MS})." >/dev/null 2>&1; then
            log "RabbitMQ consumer_timeout raised to ${CONSUMER_TIMEOUT_MS} ms (was ${current:-unknown}), so long activities keep their message"
        else
            warn "could not raise RabbitMQ's consumer_timeout: activities longer than it (30 min by default) would be redelivered; set consumer_timeout in ${conf}"
            return 0
        fi
    fi
    # The machine's rabbitmq.conf is not a named (private) node's configuration.
    [ -z "$RABBITMQ_NODE" ] || return 0
    if [ -w "$(dirname "$conf")" ] && ! grep -qs '^[[:space:]]*consumer_timeout' "$conf"; then
        printf '\n# Paceline: an activity holds its message unacked until it ends\nconsumer_timeout = %s\n' \
            "$CONSUMER_TIMEOUT_MS" >> "$conf"
        log "consumer_timeout = ${CONSUMER_TIMEOUT_MS} written to ${conf}"
    fi
}

ensure_rabbitmq() {
    local host port shown hp fresh=0 why
    IFS=$'\t' read -r host port shown hp < <(
        case "$AMQP_URL" in
            amqps:*) parse_url "$AMQP_URL" 5671 ;;
            *) parse_url "$AMQP_URL" 5672 ;;
        esac
    ) || die "cannot parse PACELINE_AMQP_URL"
    [ -n "$port" ] || die "cannot parse PACELINE_AMQP_URL"

    if can_connect "$host" "$port" 3; then
        log "RabbitMQ reachable at ${hp}"
        if is_local_host "$host"; then
            rabbitmq_check_version
            rabbitmq_consumer_timeout
        fi
        return 0
    fi
    if ! is_local_host "$host"; then
        die "RabbitMQ is not reachable at ${shown} (${hp}); it is not on this machine, so nothing was installed or started. Start it there or set PACELINE_AMQP_URL."
    fi

    if ! rabbitmq_installed; then
        if ! why="$(can_apt_install)"; then
            if have apt-get; then
                die "RabbitMQ is not reachable at ${hp} and is not installed (${why}); as root on Debian: apt-get install rabbitmq-server"
            fi
            die "RabbitMQ is not reachable at ${hp} and is not installed (${why}); install RabbitMQ 3.10+ with your system's package manager, or set PACELINE_AMQP_URL"
        fi
        log "RabbitMQ not installed; installing it with apt-get"
        apt_install rabbitmq-server ||
            die "apt-get install rabbitmq-server failed; fix the error above and run as root: apt-get install rabbitmq-server"
        rabbitmq_installed || die "apt-get install rabbitmq-server finished but rabbitmq-server was not found"
        fresh=1
        # apt may already have started it (where init scripts are allowed to run).
    fi

    if ! can_connect "$host" "$port" 1; then
        log "starting RabbitMQ"
        if ! rabbitmq_start; then
            if is_root; then
                die "RabbitMQ is installed but could not be started; check /var/log/rabbitmq/ and run: rabbitmq-server -detached (or: service rabbitmq-server start)"
            fi
            die "RabbitMQ is installed but stopped and could not be started as $(id -un); as root run: rabbitmq-server -detached (or: service rabbitmq-server start)"
        fi
    fi

    local deadline=$((SECONDS + START_TIMEOUT))
    if have rabbitmqctl; then
        timeout "$START_TIMEOUT" "${RABBITMQCTL[@]}" await_startup --timeout "$START_TIMEOUT" >/dev/null 2>&1 || true
    fi
    local left=$((deadline - SECONDS))
    [ "$left" -ge 1 ] || left=1
    if ! wait_for_port "$host" "$port" "$left"; then
        die "RabbitMQ was started but is still not accepting connections on ${hp} after ${START_TIMEOUT}s; check /var/log/rabbitmq/ (and: rabbitmqctl status)"
    fi
    if [ "$fresh" -eq 1 ]; then
        log "RabbitMQ installed and started; reachable at ${hp}"
    else
        log "RabbitMQ started; reachable at ${hp}"
    fi
    rabbitmq_check_version
    rabbitmq_consumer_timeout
}

ensure_rabbitmq
ensure_postgres
