#!/usr/bin/env bash
# Transfer test of the learned linear drift (docs/lpo.md): three held-out envs, 10 seeds each, the learned
# drift beside DPO, PPO and the three random drifts of its weight norm that experiments/report_lpo_meta.py wrote. Each env
# keeps its family defaults except the inner regime the drift was discovered in: 10 epochs, constant learning rate.
# Rerun to resume (finished drifts are kept). Then: python experiments/report_lpo_transfer.py --transfer runs/lpo_linear/transfer
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/lpo_linear}
for env in Acrobot-v1 Pendulum-v1 Breakout-MinAtar; do
    flags=(--env-id "$env" --total-timesteps 500000 --update-epochs 10 --anneal-lr False --num-seeds 10 --seed 1)
    python lpo.py --eval-drift "$RUN/best_drift.msgpack" "${flags[@]}" --compare lpo dpo ppo --run-dir "$RUN/transfer/$env"
    for i in 0 1 2; do
        python lpo.py --eval-drift "$RUN/random_drift_$i.msgpack" "${flags[@]}" --compare lpo --run-dir "$RUN/transfer_random_$i/$env"
    done
done
