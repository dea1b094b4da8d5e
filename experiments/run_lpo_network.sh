#!/bin/bash
# The pre-registered network ES runs of docs/lpo.md ("The drift network, started with a gradient"), one seed after
# the other, resumable: run it again to continue. From the repository root: bash experiments/run_lpo_network.sh
cd "$(dirname "$0")/.."
for S in 1 2; do
  dir=runs/lpo_network_s$S
  [ -f "$dir/fitness_CartPole-v1.png" ] && continue  # drawn when the run ends
  if [ -f $dir/es_checkpoint.msgpack ]; then
    python lpo.py --resume $dir
  else
    python lpo.py --env-ids CartPole-v1 --total-timesteps 65536 --update-epochs 10 \
      --learning-rate 5e-4 --anneal-lr False --drift-start hidden --pop-size 32 --num-rollouts 2 \
      --num-generations 96 --sigma 0.06 0.999 0.01 --es-lr 0.006 1 0.006 --es-beta1 0.9 \
      --fitness-shaping centered_rank --validate-every 6 --seed $S --run-dir $dir --overwrite
  fi
done
