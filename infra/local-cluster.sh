#!/usr/bin/env bash
# The scale-out topology as processes on 127.0.0.1 (tasks/cluster.py; settings: infra/cluster.env).
#   infra/local-cluster.sh up [--workers N] [--pipelines FILE]   a fresh cluster, healthy when it returns
#   infra/local-cluster.sh status                                each component; exit 1 unless all healthy
#   infra/local-cluster.sh env                                   export lines to use it from a shell
#   infra/local-cluster.sh stop|restart COMPONENT                e.g. mlflow, worker-1 (fault drills)
#   infra/local-cluster.sh down                                  stop every process it started
# Needs PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379, and `make install`.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=${SHRINKFLOW_PYTHON:-$here/.venv/bin/python}
if [ ! -x "$py" ]; then
  echo "local-cluster: $py is missing: run 'make install' first (or set SHRINKFLOW_PYTHON)" >&2
  exit 2
fi
cd "$here" && exec "$py" -m tasks.cluster "$@"
