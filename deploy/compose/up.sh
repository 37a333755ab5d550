#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# `make up`: the whole stack in containers (deploy/compose/compose.yaml), with Grafana, Tempo,
# Loki, Prometheus and an OpenTelemetry Collector. Builds the services' image, starts
# everything in the background, waits until the admin API is ready, and prints where to go.
#
# Needs a container engine that answers (Docker, or Podman, with compose); without one it
# says so and exits 1. Arguments are passed to `compose up` (make up UP_ARGS=...).
#
# The admin API's token: PACELINE_ADMIN_TOKEN when set (yours: never printed); otherwise the
# one kept in STACK_ENV_FILE (.paceline/compose.env, generated on the first `make up`, mode
# 600), printed each time. Details: docs/observability.md.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
compose_file="$here/compose.yaml"
env_file="${STACK_ENV_FILE:-$root/.paceline/compose.env}"
project=paceline
port="${PACELINE_ADMIN_PORT:-8080}"
grafana_port="${GRAFANA_PORT:-3000}"
wait_s="${UP_TIMEOUT:-300}"

say() { echo "paceline: $*"; }

# shellcheck source=engine.sh
. "$here/engine.sh"
find_compose "make up" || exit 1

# The token, before anything starts: the admin API refuses one shorter than 16 characters.
token_from_file() {
    [ -f "$env_file" ] && sed -n 's/^PACELINE_ADMIN_TOKEN=//p' "$env_file" | tail -n 1
}
if [ -n "${PACELINE_ADMIN_TOKEN:-}" ]; then
    token_is=yours
    token="$PACELINE_ADMIN_TOKEN"
elif token=$(token_from_file) && [ -n "$token" ]; then
    token_is=kept
else
    token_is=generated
    token=$(head -c 24 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
fi
if [ "${#token}" -lt 16 ]; then
    echo "paceline: PACELINE_ADMIN_TOKEN: use at least 16 characters" >&2
    exit 2
fi
if [ "$token_is" = generated ]; then
    mkdir -p "$(dirname "$env_file")"
    (
        umask 077
        {
            echo "# Written by make up (deploy/compose/up.sh): the admin API's token for the compose stack."
            echo "# PACELINE_ADMIN_TOKEN in the environment wins over it. Delete this file for a new token."
            echo "PACELINE_ADMIN_TOKEN=$token"
        } >"$env_file"
    )
fi
export PACELINE_ADMIN_TOKEN="$token"

compose() { "${COMPOSE[@]}" -p "$project" -f "$compose_file" "$@"; }

say "building the services' image and starting the stack (${COMPOSE[*]}, project $project)"
compose up -d --build --remove-orphans ${1+"$@"}

say "waiting for the admin API (http://127.0.0.1:$port/readyz, up to ${wait_s}s)"
ready() {
    local url="http://127.0.0.1:$port/readyz"
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -o /dev/null --max-time 3 "$url" 2>/dev/null
    else
        python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)' \
            "$url" >/dev/null 2>&1
    fi
}
deadline=$((SECONDS + wait_s))
until ready; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "paceline: the admin API was not ready after ${wait_s}s; what runs, and the last lines of the services:" >&2
        compose ps >&2 || true
        compose logs --tail 20 migrate scheduler admin >&2 || true
        echo "paceline: the stack is left running: look with '${COMPOSE[*]} -p $project logs', stop it with 'make down'" >&2
        exit 1
    fi
    sleep 2
done

say "admin API: http://127.0.0.1:$port  (OpenAPI at /openapi.json)"
case "$token_is" in
    yours) say "API token: yours, PACELINE_ADMIN_TOKEN" ;;
    *) say "API token: $token  (kept in ${env_file#"$root"/})" ;;
esac
say "Grafana: http://127.0.0.1:$grafana_port/d/paceline-processes  (dashboard \"Paceline processes\"; Explore for traces and logs)"
say "Prometheus: http://127.0.0.1:${PROMETHEUS_PORT:-9090}   RabbitMQ management: http://127.0.0.1:${RABBITMQ_MANAGEMENT_PORT:-15672} (guest/guest)"
say "make down stops it and keeps the data; make down DOWN_ARGS=--volumes deletes the data too"
