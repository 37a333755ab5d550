#!/bin/bash
# Run once, by the postgres image, when its data volume is first initialised.
#
# Grafana reads the two Paceline databases as `grafana_reader`, a role that may only SELECT:
# a dashboard or an Explore query can never change what the services wrote. The databases are
# created here (empty) so that the reader's default privileges cover the tables that
# `paceline-scheduler migrate` and `paceline-reporting migrate` create later as `postgres`.
set -e

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v reader_password="${GRAFANA_DB_PASSWORD:?}" <<'SQL'
CREATE ROLE grafana_reader LOGIN PASSWORD :'reader_password';
CREATE DATABASE paceline;
CREATE DATABASE paceline_reporting;
SQL

for db in paceline paceline_reporting; do
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$db" <<SQL
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT CONNECT ON DATABASE $db TO grafana_reader;
GRANT USAGE ON SCHEMA public TO grafana_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE $POSTGRES_USER IN SCHEMA public
    GRANT SELECT ON TABLES TO grafana_reader;
ALTER ROLE grafana_reader IN DATABASE $db SET default_transaction_read_only = on;
SQL
done
