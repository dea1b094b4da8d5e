#!/usr/bin/env bash
# LPO-Zero (--no-ppo-init) meta-trained with the two drift architectures the paper describes, one hidden layer
# of 256 (Appendix A) and two (section 5.1), each with ES seeds 1 and 2, on CartPole-v1 at the inner budget of
# docs/lpo.md's LPO run; then each final drift trains 10 fresh agents on CartPole-v1 beside PPO (the same agent
# seeds for every drift). About 20 minutes per meta-training on 2 cores. Rerun to resume.
set -u
cd "$(dirname "$0")/.."
GENERATIONS=${1:-60}
for seed in 1 2; do
  for hidden in "256" "256 256"; do
    name=lpo_zero_${hidden// /_}_seed$seed
    if [ -f "runs/$name/es_checkpoint.msgpack" ]; then
      python lpo.py --resume "runs/$name"
    else
      python lpo.py --env-ids CartPole-v1 --total-timesteps 65536 --no-ppo-init --drift-hidden $hidden \
        --num-generations "$GENERATIONS" --seed "$seed" --run-dir "runs/$name" --overwrite
    fi
    python lpo.py --eval-drift "runs/$name" --env-id CartPole-v1 --total-timesteps 65536 --num-seeds 10 --seed 1 \
      --compare lpo ppo --run-dir "runs/${name}_eval"
  done
done
