#!/usr/bin/env bash
# The LPO transfer test of docs/lpo.md: the learned drift on held-out envs, 10 seeds, the flags and seeds of
# dpo.py's PPO-vs-DPO table (experiments/run_dpo_comparison.sh), whose runs/compare/ directories give the PPO and DPO rows.
# Pendulum-v1 also reruns PPO through lpo.py, to check it equals runs/compare's bit for bit. Rerun to resume.
set -u
cd "$(dirname "$0")/.."
DRIFT=${1:-drifts/lpo_classic_v1.msgpack}
ev() {  # ev NAME FLAGS...
  local name=$1; shift
  python lpo.py --eval-drift "$DRIFT" --num-seeds 10 --seed 1 --run-dir "runs/transfer/$name" "$@"
}
ev Pendulum-v1 --env-id Pendulum-v1 --total-timesteps 500000 --compare lpo ppo
ev Breakout-MinAtar --env-id Breakout-MinAtar --total-timesteps 500000 --compare lpo
ev SpaceInvaders-MinAtar --env-id SpaceInvaders-MinAtar --total-timesteps 500000 --compare lpo
# In distribution: the meta-training envs and budget, on seeds the ES never drew.
ev CartPole-v1 --env-id CartPole-v1 --total-timesteps 65536
ev Acrobot-v1 --env-id Acrobot-v1 --total-timesteps 65536
