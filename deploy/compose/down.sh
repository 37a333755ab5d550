#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# `make down`: stops and removes the containers and the network of the compose stack that
# `make up` started. The data (the volumes: PostgreSQL, RabbitMQ, Tempo, Loki, Prometheus,
# Grafana) is kept for the next `make up`; `make down DOWN_ARGS=--volumes` deletes it too.
# Arguments are passed to `compose down`. The token file (.paceline/compose.env) is kept.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
project=paceline

# shellcheck source=engine.sh
. "$here/engine.sh"
find_compose "make down" || exit 1

# compose.yaml requires the token to be set, even to stop the stack; down does not use it.
export PACELINE_ADMIN_TOKEN="${PACELINE_ADMIN_TOKEN:-not-used-by-compose-down}"

echo "paceline: stopping the compose stack (${COMPOSE[*]}, project $project)"
"${COMPOSE[@]}" -p "$project" -f "$here/compose.yaml" down --remove-orphans ${1+"$@"}
case " $* " in
    *" --volumes "* | *" -v "*) echo "paceline: stopped; its data (the volumes) is deleted" ;;
    *) echo "paceline: stopped; its data is kept (make down DOWN_ARGS=--volumes deletes it)" ;;
esac
