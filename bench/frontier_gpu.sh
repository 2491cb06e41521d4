#!/usr/bin/env bash
# bench/frontier.py on a lent GPU machine (the device tool's nvidia-h200: Python 3.12 with its own torch,
# none of our venv), from the repo root there; arguments go on to frontier.py:
#
#     bash bench/frontier_gpu.sh --nets resnet8_w16 --ratios 5 9 --budget 3
#
# It needs, carried with the working tree (both ignored through .git/info/exclude):
#   .whl/    wheels of what frontier.py imports and the machine lacks (torch-pruning, pydantic and its
#            needs), for cp312 manylinux x86-64:
#              pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#                --platform manylinux2014_x86_64 -d .whl torch-pruning==1.6.1 pydantic==2.14.4 \
#                pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
#              (the versions of infra/constraints.txt)
#   .fmnist/ Fashion-MNIST's four idx .gz files (cp /usr/share/datasets/fashion-mnist/*.gz .fmnist/)
# and optionally .shrinkflow/bench/frontier (trained bases from an earlier run, see below).
#
# Writes to $OUT: frontier_gpu.json (rewritten after every finished row, so a run cut short keeps its
# rows), frontier_gpu.png, frontier_gpu.log, and bases/*.pt (the bases it trained or used: carry them
# back as .shrinkflow/bench/frontier to skip base training next time).
# Environment: FRONTIER_TIME_LIMIT=SECONDS stops frontier.py after that long (0, the default: no limit),
# so that the bases still get copied to $OUT before the device tool's own limit kills everything.
source bench/gpu_env.sh

rc=0
timeout -k 20 "${FRONTIER_TIME_LIMIT:-0}" \
  python3 bench/frontier.py --device cuda --data-dir .fmnist --out "$OUT/frontier_gpu.json" "$@" 2>&1 \
  | tee "$OUT/frontier_gpu.log" || rc=$?
[ "$rc" = 124 ] && echo "frontier.py stopped at FRONTIER_TIME_LIMIT=${FRONTIER_TIME_LIMIT}s; $OUT/frontier_gpu.json holds the rows it finished" | tee -a "$OUT/frontier_gpu.log"

if compgen -G ".shrinkflow/bench/frontier/*.pt" >/dev/null; then
  mkdir -p "$OUT/bases" && cp .shrinkflow/bench/frontier/*.pt "$OUT/bases/"
fi
exit "$rc"
