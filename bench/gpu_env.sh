# Sourced by bench/frontier_gpu.sh and bench/frontier_gpu_sweep.sh on the lent GPU machine (its own
# Python and torch, none of our venv): checks $OUT, installs the carried wheels (.whl/) into /tmp/site,
# puts them on PYTHONPATH, unbuffers Python's output and prints the GPU.
set -uo pipefail
: "${OUT:?OUT must name the folder whose files come back (the device tool sets it)}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "installing .whl/*.whl failed (was .whl carried?)"; exit 1; }
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader || true
