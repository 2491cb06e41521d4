#!/usr/bin/env bash
# The frontier sweep on a lent GPU machine, in one device call: bench/frontier.py as many processes at
# once (one per net, ratio and budget; these nets are too small to fill the GPU alone), from the repo
# root there, with .whl and .fmnist carried (see bench/frontier_gpu.sh):
#
#     SWEEP_SECONDS=520 bash bench/frontier_gpu_sweep.sh
#
# 1. trains the two bases (resnet8_w16, resnet10_wide; 15 epochs on all 60k images), two processes;
# 2. runs the jobs below in parallel on the cached bases, each stopped at the sweep's deadline (a row
#    finished is kept: the JSON is rewritten after every row);
# 3. packs every JSON, plot and log, and the bases, into $OUT/sweep.tgz (the device tool returns at most
#    8 files).
# Budget 3 at 2x/3x/5x/9x with every method (latency measured on this machine's CPU, one thread per
# process, while other processes train: ratios to the base are timed interleaved, absolute times are
# that CPU's); budget 12 at 5x and 9x with the leading methods, no latency.
DEADLINE=$((SECONDS + ${SWEEP_SECONDS:-520}))
source bench/gpu_env.sh
export OMP_NUM_THREADS=1  # a dozen processes share the machine's 16 cores
R=$OUT/sweep && mkdir -p "$R"
bench() { python3 bench/frontier.py --device cuda --data-dir .fmnist "$@"; }

ALL="sf_default tp_l1 tp_magnitude sf_grow_lr01 sf_iterative tp_taylor tp_group_norm sf_group_lasso tp_bn_scale tp_growing_reg"
LEAD="sf_default tp_l1 tp_magnitude sf_grow_lr01 sf_iterative tp_group_norm"

for net in resnet8_w16 resnet10_wide; do  # the bases, cached for every job after
  bench --nets $net --ratios 2 --methods tp_l1 --budget 2 --noise-seeds 1 --no-latency \
    --out "$R/warm_$net.json" > "$R/warm_$net.log" 2>&1 &
done
wait
echo "bases ready after $SECONDS s"; grep -h "trained\|base" "$R"/warm_*.log | head -4

left=$((DEADLINE - SECONDS))
for net in resnet8_w16 resnet10_wide; do
  for r in 2 3 5 9; do
    timeout -k 10 $left python3 bench/frontier.py --device cuda --data-dir .fmnist --nets $net --ratios $r \
      --budget 3 --noise-seeds 3 --methods $ALL --out "$R/b3_${net}_${r}x.json" > "$R/b3_${net}_${r}x.log" 2>&1 &
  done
  for r in 5 9; do
    timeout -k 10 $left python3 bench/frontier.py --device cuda --data-dir .fmnist --nets $net --ratios $r \
      --budget 12 --noise-seeds 1 --no-latency --methods $LEAD --out "$R/b12_${net}_${r}x.json" \
      > "$R/b12_${net}_${r}x.log" 2>&1 &
  done
done
wait
echo "jobs done after $SECONDS s"
for f in "$R"/b*.log; do echo "== $f"; tail -4 "$f"; done
mkdir -p "$R/bases" && cp .shrinkflow/bench/frontier/*.pt "$R/bases/" 2>/dev/null
tar -czf "$OUT/sweep.tgz" -C "$OUT" sweep && rm -rf "$R"
ls -la "$OUT"
