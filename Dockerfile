# syntax=docker/dockerfile:1.7
# The shrinkflow image: every Airflow component (Celery workers included), the MLflow tracking server and
# the compression stack, for infra/compose.yaml and infra/helm/. Build it from the repository root:
#   docker build -t shrinkflow:0.1.0 .
# The tag is pyproject's version; tests/infra/test_deployment_files.py checks that every deployment file
# names this same image, and that torch below is pyproject's pin.
FROM python:3.11-slim-bookworm

# g++: hls4ml's C simulation compiles the generated model; git: DVC and MLflow record commits.
# tini: PID 1 that forwards signals and reaps the processes Airflow's workers fork.
# dataset-fashion-mnist: the data of pipelines.yaml's pipelines, where tasks/data looks for it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ git tini dataset-fashion-mnist \
 && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The CPU wheel of torch first, from PyTorch's CPU index: the project's torch==2.13.0 is then already
# satisfied (2.13.0+cpu), so `pip install .` does not pull the CUDA build and its NVIDIA wheels from PyPI.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"

WORKDIR /opt/shrinkflow
COPY pyproject.toml README.md pipelines.yaml ./
COPY tasks/ tasks/
COPY compression_ops/ compression_ops/
COPY dags/ dags/
COPY infra/ infra/
# The `cluster` extra: what the scale-out topology adds (Airflow's Celery provider, S3 access).
RUN pip install -c infra/constraints.txt ".[cluster]"

# uid 50000 in group 0, as in Airflow's own image: the Helm chart runs every pod as 50000:0, and
# group-writable folders also suit clusters that pick an arbitrary uid in group 0.
RUN useradd --uid 50000 --gid 0 --no-log-init --create-home shrinkflow \
 && mkdir -p /opt/airflow /opt/shrinkflow/cache \
 && chown -R 50000:0 /opt/airflow /opt/shrinkflow/cache \
 && chmod -R g+rwX /opt/airflow /opt/shrinkflow/cache

# AIRFLOW_HOME is where the Helm chart mounts airflow.cfg and the logs; the DAGs are baked in, not synced.
# SHRINKFLOW_HOME is the worker's local cache; stage folders are published to the object store.
ENV AIRFLOW_HOME=/opt/airflow \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/shrinkflow/dags \
    SHRINKFLOW_PIPELINES=/opt/shrinkflow/pipelines.yaml \
    SHRINKFLOW_HOME=/opt/shrinkflow/cache

# `docker run shrinkflow:0.1.0 scheduler` runs `airflow scheduler`. A command that starts with a program
# (bash, sh, python, airflow, mlflow, or a path) runs as given: the Helm chart starts its containers as
# `bash -c "exec airflow ..."` and its probes call /entrypoint, as with Airflow's own image.
COPY --chmod=0755 <<'EOF' /entrypoint
#!/bin/sh
set -e
case "${1:-}" in
  bash|sh|python|python3|airflow|mlflow|/*) exec "$@" ;;
esac
exec airflow "$@"
EOF

USER shrinkflow
EXPOSE 8080 5000
ENTRYPOINT ["/usr/bin/tini", "--", "/entrypoint"]
CMD ["version"]
