-- Runs once, when the PostgreSQL volume is first initialised. The lineage database (`mergeyard`)
-- is POSTGRES_DB; MLflow and Prefect each get their own.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
