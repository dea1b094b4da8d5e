#!/usr/bin/env bash
# PPO vs DPO, 10 seeds each, identical hyperparameters (docs/dpo.md, "Results"). Resumable: rerun to continue.
set -u
cd "$(dirname "$0")/.."
run() {  # run NAME FLAGS...
  local name=$1; shift
  for drift in ppo dpo; do
    local dir=runs/compare/${name}__${drift}
    if [ -f "$dir/summary.json" ]; then continue; fi
    if [ -f "$dir/checkpoint.msgpack" ]; then python dpo.py --resume "$dir"; else
      python dpo.py "$@" --drift $drift --num-seeds 10 --seed 1 --run-dir "$dir" --overwrite; fi
  done
}
run Pendulum-v1 --env-id Pendulum-v1 --total-timesteps 500000
run Breakout-MinAtar --env-id Breakout-MinAtar --total-timesteps 500000
run SpaceInvaders-MinAtar --env-id SpaceInvaders-MinAtar --total-timesteps 500000
run halfcheetah --env-id halfcheetah --backend spring --num-envs 128 --num-unrolls 2 --num-minibatches 8 \
    --total-timesteps 400000
