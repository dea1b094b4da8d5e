#!/bin/bash
# The pre-registered multi-env ES runs of docs/lpo.md ("Several envs at once"): the drift network from the hidden
# start meta-trained on CartPole-v1 and Pendulum-v1 together, each env at its own inner loop, 2 ES seeds one after
# the other, resumable: run it again to continue. From the repository root: bash experiments/run_lpo_multi.sh
cd "$(dirname "$0")/.."
for S in 1 2; do
  dir=runs/lpo_multi_s$S
  [ -f "$dir/fitness_Pendulum-v1.png" ] && continue  # drawn when the run ends
  if [ -f $dir/es_checkpoint.msgpack ]; then
    python lpo.py --resume $dir
  else
    python lpo.py --env-ids CartPole-v1 Pendulum-v1 --update-epochs 10 --anneal-lr False \
      --env-flags CartPole-v1:total-timesteps=65536 CartPole-v1:learning-rate=5e-4 \
      Pendulum-v1:total-timesteps=131072 --drift-start hidden --pop-size 32 --num-rollouts 2 \
      --num-generations 48 --sigma 0.06 0.999 0.01 --es-lr 0.0087 1 0.0087 --es-beta1 0.9 \
      --fitness-shaping centered_rank --validate-every 6 --seed $S --run-dir $dir --overwrite
  fi
done
