"""shrinkflow's stages, config, data, models, engines and CLI (no Airflow here: dags/ imports us)."""

import os as _os

# Must be in the environment before torch (libgomp) and TVM start their thread pools, which happens
# once per process: with OpenMP's default spinning, torch and TVM workers fight for the two cores
# and interleaved timings go wrong by 100x (see tasks/engines/timing.py). Users can override them.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_os.environ.setdefault("TVM_BIND_THREADS", "0")
