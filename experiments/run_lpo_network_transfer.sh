#!/usr/bin/env bash
# Transfer test of a learned drift network (docs/lpo.md, "The drift network, started with a gradient"): envs the drift
# never met (ENVS; by default the four of the CartPole-v1 drifts), 10 seeds each, the learned drift beside DPO, PPO
# and the three null drifts that experiments/report_lpo_meta.py wrote (random displacements from the ES's start). Each
# env keeps its family defaults except the inner regime the drift was discovered in (10 epochs, constant learning
# rate), and runs 128 updates, as many as each meta-training inner run (primary: transfer/); HORIZON=500k runs 500,000
# steps instead (secondary: transfer_500k/). Rerun to resume (finished drifts are kept). PPO's and DPO's agents do not
# depend on the learned drift (same seeds, same flags), so BASELINES=runs/OTHER_SEED copies that run's finished PPO
# and DPO rows instead of training them again. Then:
#   python experiments/report_lpo_meta.py --run $RUN --transfer --transfer-name transfer   # or transfer_500k
# runs/ does not outlive a session on this project's machines: the small files of RUN (its drifts, and each run's
# args.json, metrics.csv and summary.json) are kept under docs/lpo/runs/ after every run and restored first.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/lpo_network_s1}
HORIZON=${HORIZON:-matched}
ENVS=${ENVS:-Acrobot-v1 Pendulum-v1 Breakout-MinAtar SpaceInvaders-MinAtar}  # the held-out envs
declare -A MATCHED=([Acrobot-v1]=65536 [Pendulum-v1]=131072 [MountainCarContinuous-v0]=131072
    [Breakout-MinAtar]=1048576 [SpaceInvaders-MinAtar]=1048576)
name=transfer
[ "$HORIZON" = 500k ] && name=transfer_500k
keep() { find "$RUN" \( -name '*.json' -o -name metrics.csv -o -name '*drift*.msgpack' \) -exec cp --parents {} docs/lpo/ \; ; }
if [ -d "docs/lpo/$RUN" ]; then cp -rn "docs/lpo/$RUN/." "$RUN/" || true; fi  # newer coreutils: non-zero on a skip
for env in $ENVS; do
    steps=${MATCHED[$env]}
    [ "$HORIZON" = 500k ] && steps=500000
    flags=(--env-id "$env" --total-timesteps "$steps" --update-epochs 10 --anneal-lr False --num-seeds 10 --seed 1)
    for drift in dpo ppo; do
        from=${BASELINES:-}/$name/$env/$drift
        if [ -n "${BASELINES:-}" ] && [ -f "$from/summary.json" ] && [ ! -e "$RUN/$name/$env/$drift" ]; then
            mkdir -p "$RUN/$name/$env" && cp -r "$from" "$RUN/$name/$env/$drift"
        fi
    done
    python lpo.py --eval-drift "$RUN/best_drift.msgpack" "${flags[@]}" --compare lpo dpo ppo --run-dir "$RUN/$name/$env"
    keep
    for i in 0 1 2; do
        python lpo.py --eval-drift "$RUN/random_drift_$i.msgpack" "${flags[@]}" --compare lpo \
            --run-dir "$RUN/${name}_random_$i/$env"
        keep
    done
done
