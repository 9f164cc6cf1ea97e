#!/usr/bin/env bash
# Creates one role and one database each for Prefect and MLflow. Run by the postgres image on the
# first start only (empty data volume), from /docker-entrypoint-initdb.d. Passwords come from the
# environment (infra/.env) and are passed as psql variables, never spliced into SQL text.
set -e

: "${PREFECT_DB_PASSWORD:?PREFECT_DB_PASSWORD is not set}"
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
     -v prefect_pw="$PREFECT_DB_PASSWORD" -v mlflow_pw="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE prefect LOGIN PASSWORD :'prefect_pw';
CREATE DATABASE prefect OWNER prefect;
REVOKE ALL ON DATABASE prefect FROM PUBLIC;
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_pw';
CREATE DATABASE mlflow OWNER mlflow;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
\connect prefect
-- Prefect's migrations use pg_trgm; create it here as the superuser
CREATE EXTENSION IF NOT EXISTS pg_trgm;
SQL
