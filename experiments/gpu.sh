#!/usr/bin/env bash
# One prepared run for a machine with an NVIDIA GPU: the paper's ant command (docs/dpo.md) for DPO and PPO, and
# one LPO generation at the paper's inner budget, each under a time limit, printing env-steps/s and final returns.
#
# The GPU machine this was written for has its own JAX (0.11.2 with its CUDA 13 plugin, Python 3.12) and lacks
# brax, mujoco, gymnax, evosax and tyro. Installing requirements.txt there would replace its jaxlib by the CPU
# build pinned here, and JAX would then fall back to the CPU without a word. So this script keeps the machine's JAX
# and installs only the missing packages, from wheels downloaded beforehand, without their dependencies:
#
#   bash experiments/gpu.sh wheels     # on a machine with PyPI: downloads them into .whl/ (about 35 MB)
#   bash experiments/gpu.sh            # on the GPU machine, from the repository root, with .whl/ beside it
#
# Each step is resumable: a run directory under $RUNS that already holds a checkpoint is continued with --resume,
# so a second call after a time-out goes on where the first stopped. Settings (environment variables):
#   RUNS (default ${OUT:-runs}/gpu)  ANT_SEEDS (3)  ANT_TIMESTEPS (the paper's 30M: left to dpo.py's default)
#   PROBE_TIMESTEPS (3,276,800: 20 updates of 163,840 steps at the paper's shape)  LIMIT (seconds per step, 150)
#   LPO_POP (4 members; the paper's population is 32)  TRY_ON_CPU (1: skip the GPU check, for a try at tiny budgets)
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = wheels ]; then
  # The packages (and the dependencies they import) that the GPU image lacks; flax, optax, numpy, scipy, matplotlib,
  # chex, etils, absl-py, msgpack, seaborn, protobuf and packaging are there already.
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    brax==0.14.2 mujoco==4.0.0 mujoco-core==4.0.0 mujoco-studio==4.0.0 mujoco-mjx==3.17.0 gymnax==1.0.1 \
    evosax==0.3.2 tyro==1.0.17 tensorboardX==2.6.5 trimesh==5.2.0 jaxopt==0.8.5 ml-collections==1.1.0 \
    gymnasium==1.3.0 farama-notifications==0.0.6 dotmap==1.3.30 docstring-parser==0.18.0 typeguard==4.6.1 \
    glfw==2.11.0 pyopengl==3.1.10
  exit
fi

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
if [ "${TRY_ON_CPU:-0}" != 1 ]; then
  export JAX_PLATFORMS=cuda
  backend=$(python3 -c "import jax; print(jax.default_backend(), jax.devices()[0].device_kind)") || exit 1
  echo "JAX backend: $backend"
  case "$backend" in gpu*) ;; *) echo "error: JAX does not run on the GPU here ($backend); stopping" >&2; exit 1 ;; esac
fi
RUNS=${RUNS:-${OUT:-runs}/gpu}
LIMIT=${LIMIT:-150}
mkdir -p "$RUNS"

report() {  # report NAME: one line from the run directory's summary.json
  python3 - "$RUNS/$1" "$1" <<'EOF'
import json, os, sys
path = os.path.join(sys.argv[1], "summary.json")
if not os.path.exists(path):
    print(f"{sys.argv[2]}: no summary.json (stopped at the time limit; run again to resume)")
else:
    s = json.load(open(path))
    print(
        f"{sys.argv[2]}: {s['total_timesteps']:,} steps x {s['num_seeds']} seed(s), {s['sps']:,.0f} env-steps/s, "
        f"{s['train_seconds']:.0f} s of training on {s['device']}; final return {s['final_return_mean']:.1f} "
        f"± {s['final_return_std']:.1f} (sampled actions)"
    )
EOF
}

train() {  # train NAME FLAGS...: dpo.py under the time limit, resumed when its run directory has a checkpoint
  local name=$1; shift
  local dir="$RUNS/$name"
  if [ -f "$dir/summary.json" ]; then :
  elif [ -f "$dir/checkpoint.msgpack" ]; then timeout "$LIMIT" python3 dpo.py --resume "$dir"
  else timeout "$LIMIT" python3 dpo.py "$@" --run-dir "$dir" --overwrite; fi  # no checkpoint: start again
  report "$name"
}

echo "== probe: about 20 updates of the paper's ant setting, one seed"
train probe --env-id ant --drift dpo --total-timesteps "${PROBE_TIMESTEPS:-3276800}"
ant_budget=()
if [ -n "${ANT_TIMESTEPS:-}" ]; then ant_budget=(--total-timesteps "$ANT_TIMESTEPS"); fi
for drift in dpo ppo; do
  echo "== python dpo.py --env-id ant --drift $drift --num-seeds ${ANT_SEEDS:-3} ${ant_budget[*]}"
  train "ant_$drift" --env-id ant --drift "$drift" --num-seeds "${ANT_SEEDS:-3}" "${ant_budget[@]}"
done

echo "== one LPO generation on ant at the paper's inner budget, ${LPO_POP:-4} members"
start=$(date +%s)
timeout "$LIMIT" python3 lpo.py --env-ids ant --pop-size "${LPO_POP:-4}" --num-generations 1 \
  --validate-every 0 "${ant_budget[@]}" --run-dir "$RUNS/lpo_generation" --overwrite
echo "lpo generation: exit code $?, $(($(date +%s) - start)) s of wall time, compilation included"
