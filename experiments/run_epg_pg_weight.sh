#!/bin/bash
# The pre-registered runs of the pg-weight loss form (docs/epg.md): for each size (linear, small network) two
# meta-training seeds and a reward-blind run, then the held-out test of each seed against its reward-blind loss.
# Resumable: run it again to continue. From the repository root: bash experiments/run_epg_pg_weight.sh
cd "$(dirname "$0")/.."
OUT=runs/pg_weight
mkdir -p $OUT
COMMON="--task-family goal-point --goal-split sides --loss-form pg-weight --balanced-tasks --num-tasks 8 \
    --num-eval-tasks 8 --num-select-tasks 32 --num-sweep-tasks 8 --lifetime 2048 --update-every 256 \
    --buffer-size 256 --pop-size 32 --sigma 0.1 --es-learning-rate 0.02 --ppo-anneal-frac 0 --num-generations 60"
for size in linear small; do
  for run in seed1 seed2 blind; do
    case $run in seed1) extra="--seed 1" ;; seed2) extra="--seed 2" ;; blind) extra="--seed 1 --reward-blind" ;; esac
    dir=$OUT/${size}_$run
    [ -f $dir/summary.json ] && continue
    if [ -f $dir/checkpoint.msgpack ]; then
      python epg.py --resume $dir
    else
      python epg.py $COMMON --loss-size $size $extra --run-dir $dir --overwrite  # no checkpoint: start again
    fi
  done
  for s in 1 2; do  # held-out test: 32 goals of the -x quadrant, a seed not used above
    dir=$OUT/${size}_seed${s}_test
    [ -f $dir/summary.json ] && continue
    python epg.py --task-family goal-point --test --seed 2026 --num-seeds 32 --load-loss $OUT/${size}_seed$s \
      --load-reward-blind-loss $OUT/${size}_blind --run-dir $dir --overwrite
  done
done
