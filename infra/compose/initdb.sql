-- The databases of infra/cluster.env, created by the postgres image on its first start (an empty data
-- volume; docker-entrypoint-initdb.d): Airflow's metadata (also the Celery result backend and the champion
-- gates' advisory lock), MLflow's backend store, and the Optuna studies that search workers share.
CREATE DATABASE shrinkflow_airflow;
CREATE DATABASE shrinkflow_mlflow;
CREATE DATABASE shrinkflow_optuna;
