#!/bin/sh
# One stage of a pipeline, as dvc.yaml runs it: `infra/stage.sh <stage> --pipeline NAME [--run-id ID]`.
# `.venv/bin/dvc repro` does not put .venv/bin on PATH, so a bare `python` would be the system's (no
# torch). Pick the interpreter: $SHRINKFLOW_PYTHON, the activated venv, the project's .venv, python3.
here=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "$SHRINKFLOW_PYTHON" ]; then
  py=$SHRINKFLOW_PYTHON
elif [ -n "$VIRTUAL_ENV" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
  py=$VIRTUAL_ENV/bin/python
elif [ -x "$here/.venv/bin/python" ]; then
  py=$here/.venv/bin/python
else
  py=python3
fi
cd "$here" && exec "$py" -m tasks "$@"
