#!/bin/sh
# Runs once, as POSTGRES_USER, when the PostgreSQL volume is first initialised (docker-entrypoint-initdb.d):
# MLflow and Prefect each get a database they own under their own login, and the worker a login that holds
# nothing but mergeyard_app (whose privileges `mergeyard db upgrade` grants: INSERT and SELECT only on the
# audit log). No database is open to PUBLIC. Passwords come from the environment, never from this file.
set -eu
: "${MLFLOW_DB_PASSWORD:?}" "${PREFECT_DB_PASSWORD:?}" "${MERGEYARD_WORKER_DB_PASSWORD:?}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "${POSTGRES_DB:-mergeyard}" \
     -v mlflow_password="$MLFLOW_DB_PASSWORD" -v prefect_password="$PREFECT_DB_PASSWORD" \
     -v worker_password="$MERGEYARD_WORKER_DB_PASSWORD" <<'EOSQL'
SELECT current_database() AS lineage_db \gset
REVOKE ALL ON DATABASE :"lineage_db" FROM PUBLIC;
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE DATABASE prefect OWNER prefect;
REVOKE ALL ON DATABASE prefect FROM PUBLIC;
CREATE ROLE mergeyard_app NOLOGIN;
CREATE ROLE mergeyard_worker LOGIN PASSWORD :'worker_password' IN ROLE mergeyard_app;
EOSQL
