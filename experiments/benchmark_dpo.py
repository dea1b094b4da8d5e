"""Throughput benchmark of dpo.py (not collected by pytest: run it as a script).

Prints, from one process, so every number is a ratio against a reference measured alongside it:
  Brax envs: the ceiling, the same envs stepped alone with random actions through Brax's own training wrappers
    (brax.envs.training.wrap: EpisodeWrapper + AutoResetWrapper), dpo.py's compiled training at the same shape,
    their ratio, and dpo.py's rollouts alone (--update-epochs 0: acting and stepping, no SGD), which splits
    training's time between acting and learning, and the actor's and critic's forward and backward passes alone on
    minibatch-shaped inputs, which bound from above the training / ceiling ratio that any PPO could reach here;
  any env: N seeds vmapped in one call against N one-seed calls;
  with --purejaxrl PATH (a PureJaxRL checkout's purejaxrl/ folder) on a Brax env: the command users run
    (dpo.main in a child process, as `python dpo.py` runs it, its CPU devices included; its summary's sps) against
    PureJaxRL's dpo_continuous_action.py at the same shape and backend in this process, in --repeats interleaved
    rounds, each side compiled afresh and timed on its first run, as a user meets it; with --num-seeds N against N
    sequential PureJaxRL runs, i.e. its one-run rate. Both medians and the median of the rounds' ratios are printed:
    on a 2-core machine the rate drifts by ±10% within minutes, so only ratios of neighbouring runs mean anything.
    --purejaxrl-only skips the other timings; --num-cpu-devices reaches the command.
Every other function is compiled first and then timed; each of those timings is the fastest of --repeats runs.

    python experiments/benchmark_dpo.py --env-id ant --backend spring --num-envs 256 --num-steps 10 --num-unrolls 1 \
        --num-minibatches 32 --actor-hidden 256 256 --critic-hidden 256 256 --activation tanh --total-timesteps 256000
    python experiments/benchmark_dpo.py --env-id CartPole-v1 --num-seeds 4
    python experiments/benchmark_dpo.py --env-id ant --backend spring --num-envs 256 --num-steps 10 --num-unrolls 1 \
        --num-minibatches 32 --actor-hidden 256 256 --critic-hidden 256 256 --activation tanh \
        --total-timesteps 256000 --purejaxrl /tmp/purejaxrl/purejaxrl --purejaxrl-only
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dpo  # noqa: E402


@dataclasses.dataclass
class Bench(dpo.Args):
    repeats: int = 3
    """timed runs of each function, the fastest counting; with --purejaxrl, also the interleaved rounds"""
    purejaxrl: str | None = None
    """a PureJaxRL checkout's purejaxrl/ folder: compare with its dpo_continuous_action.py (Brax envs)"""
    purejaxrl_only: bool = False
    """with --purejaxrl: only the rounds against PureJaxRL (the other timings take --repeats runs each)"""


def fastest(fn, *args, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def brax_ceiling(args: dpo.Args, steps: int):
    """run(key): `steps` steps of num_envs Brax envs with uniform random actions, through Brax's own wrappers."""
    from brax import envs
    from brax.envs.wrappers import training

    env = training.wrap(
        envs.get_environment(args.env_id, backend=args.backend), args.episode_length, args.action_repeat
    )

    def run(key):
        state = env.reset(jax.random.split(key, args.num_envs))

        def step(carry, key):
            state, total = carry
            action = jax.random.uniform(key, (args.num_envs, env.action_size), minval=-1.0, maxval=1.0)
            state = env.step(state, action)
            return (state, total + state.reward.sum()), None

        return jax.lax.scan(step, (state, 0.0), jax.random.split(key, steps))[0][1]

    return jax.jit(run)


def training_time(args: dpo.Args, repeats: int) -> float:
    """Seconds of the compiled training of all seeds over the whole run (initialisation excluded)."""
    init, train_chunk = dpo.make_train(args, dpo.make_drift(args))
    runners = dpo.init_seeds(init, dpo.seed_keys(args)[0])
    n = dpo.num_updates(args)
    chunk = dpo.over_seeds(lambda r: train_chunk(r, n), args.num_seeds, (0,)).lower(runners).compile()
    return fastest(chunk, runners, repeats=repeats)


def mlp_steps_time(args: dpo.Args, repeats: int) -> float:
    """Seconds of the SGD steps' unavoidable part over the whole run: forward and backward passes of dpo.py's actor
    and critic on minibatch-shaped inputs, a plain gradient step each, nothing else (no GAE, Adam or sampling).
    Any PPO with these networks and minibatches computes at least this between its rollouts."""
    env = dpo.make_env(args)
    actor, critic = dpo.make_networks(args, env)
    unrolls = args.num_envs * args.num_unrolls // args.num_minibatches
    rows, steps = args.num_steps * unrolls, dpo.num_updates(args) * args.update_epochs * args.num_minibatches
    key_actor, key_critic = jax.random.split(jax.random.PRNGKey(0))
    params = (actor.init(key_actor, jnp.zeros((1, env.obs_dim))), critic.init(key_critic, jnp.zeros((1, env.obs_dim))))

    def loss(params, obs):
        return jnp.sum(actor.apply(params[0], obs[:rows]) ** 2) + jnp.sum(critic.apply(params[1], obs) ** 2)

    def step(params, key):
        grads = jax.grad(loss)(params, jax.random.normal(key, (rows + unrolls, env.obs_dim)))
        return jax.tree.map(lambda p, g: p - 1e-6 * g, params, grads), None

    run = jax.jit(lambda params, key: jax.lax.scan(step, params, jax.random.split(key, steps))[0])
    key = jax.random.PRNGKey(1)
    jax.block_until_ready(run(params, key))
    return fastest(run, params, key, repeats=repeats)


def make_purejaxrl_train(args: dpo.Args, folder: str):
    """PureJaxRL's dpo_continuous_action.py train(key) for one seed at args' shape (num_envs, num_steps,
    minibatches, epochs, learning rate, γ, λ, the total steps and the Brax backend), not yet compiled."""
    from report_purejaxrl_comparison import import_purejaxrl

    module = import_purejaxrl(folder, "dpo_continuous_action")
    module.BraxGymnaxWrapper = functools.partial(module.BraxGymnaxWrapper, backend=args.backend)
    config = dict(
        LR=args.learning_rate,
        NUM_ENVS=args.num_envs,
        NUM_STEPS=args.num_steps,
        TOTAL_TIMESTEPS=purejaxrl_steps(args),
        UPDATE_EPOCHS=args.update_epochs,
        NUM_MINIBATCHES=args.num_minibatches,
        GAMMA=args.gamma,
        GAE_LAMBDA=args.gae_lambda,
        CLIP_EPS=0.2,
        DPO_ALPHA=2.0,
        DPO_BETA=0.6,
        ENT_COEF=args.ent_coef,
        VF_COEF=0.5,
        MAX_GRAD_NORM=0.5,
        ACTIVATION="tanh",
        ENV_NAME=args.env_id,
        ANNEAL_LR=False,
        NORMALIZE_ENV=True,
        DEBUG=False,
    )
    return module.make_train(config)


def purejaxrl_steps(args: dpo.Args) -> int:
    """Env steps of one PureJaxRL run at args' shape: dpo.py's number of updates of num_envs × num_steps."""
    return dpo.num_updates(args) * args.num_envs * args.num_steps


def purejaxrl_first_run_sps(args: dpo.Args, folder: str) -> float:
    """Env-steps/s of one PureJaxRL run: train() compiled afresh (not timed), then its first call timed, as
    run_training compiles its chunk function and then times each call."""
    key = jax.random.PRNGKey(0)
    train = jax.jit(make_purejaxrl_train(args, folder)).lower(key).compile()
    start = time.perf_counter()
    jax.block_until_ready(train(key))
    return purejaxrl_steps(args) / (time.perf_counter() - start)


def cli_sps(args: dpo.Args) -> float:
    """The `sps` that `python dpo.py` with these args writes to summary.json (training over all seeds, compilation
    excluded), from a run in a temporary directory. It runs in a fresh process through dpo.main, as the command
    does, so that it splits the CPU into devices as the command does (use_cpu_cores) while this process keeps
    JAX's one CPU device for PureJaxRL."""
    with tempfile.TemporaryDirectory() as folder:
        dpo.write_json(os.path.join(folder, "args.json"), dataclasses.asdict(args))
        run = (
            f"import dataclasses, sys; sys.path.insert(0, {ROOT!r}); import dpo;"
            f" saved = dpo.resumed_args(dpo.Args(resume={folder!r}));"
            f" dpo.main(dataclasses.replace(saved, resume=None, run_dir={folder!r} + '/run', num_eval_envs=8))"
        )
        subprocess.run([sys.executable, "-c", run], check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(folder, "run", "summary.json")) as f:
            return json.load(f)["sps"]


def compiled_rates(args: dpo.Args, repeats: int):
    """Print dpo.py's compiled training rate; on Brax envs the ceiling, the rollouts alone and the MLPs' floor; with
    several seeds, the vmapped seeds against as many one-seed runs. Each timing: the fastest of `repeats`."""
    steps = dpo.num_updates(args) * dpo.batch_size(args) * args.num_seeds  # agent steps over all seeds
    train_sps = steps / training_time(args, repeats)
    print(f"dpo.py training:                     {train_sps:12,.0f} env-steps/s")
    if args.env_id in dpo.BRAX_ENVS:
        run = brax_ceiling(args, steps // args.num_envs)
        key = jax.random.PRNGKey(0)
        run(key).block_until_ready()
        ceiling_sps = steps / fastest(run, key, repeats=repeats)
        print(f"Brax wrappers, random actions alone: {ceiling_sps:12,.0f} env-steps/s")
        print(f"training / ceiling:                  {train_sps / ceiling_sps:12.3f}")
        rollout_sps = steps / training_time(dataclasses.replace(args, update_epochs=0), repeats)
        print(
            f"dpo.py rollouts alone (0 epochs):    {rollout_sps:12,.0f} env-steps/s, "
            f"{rollout_sps / ceiling_sps:.3f} of the ceiling; the epochs take "
            f"{1 - train_sps / rollout_sps:.0%} of training"
        )
        floor = mlp_steps_time(args, repeats)
        print(
            f"the MLPs' SGD steps alone:           {floor:12.2f} s (any PPO's epochs take at least this); "
            f"training / ceiling at most {(steps / ceiling_sps) / (steps / ceiling_sps + floor):.3f}"
        )
    if args.num_seeds > 1:
        one = dataclasses.replace(args, num_seeds=1)
        sequential = args.num_seeds * training_time(one, repeats)
        vmapped = steps / train_sps
        print(
            f"{args.num_seeds} seeds vmapped: {vmapped:.2f}s; {args.num_seeds} one-seed runs: {sequential:.2f}s;"
            f" ratio {vmapped / sequential:.3f}"
        )


def purejaxrl_rounds(args: dpo.Args, folder: str, rounds: int):
    """Print `rounds` interleaved rounds of PureJaxRL's one-seed rate and the command's rate over all seeds, both
    medians and the median of the rounds' ratios."""
    references, commands = [], []
    for i in range(rounds):  # interleaved, so that a drift of the machine's rate hits both alike
        references.append(purejaxrl_first_run_sps(args, folder))
        commands.append(cli_sps(args))
        print(
            f"round {i + 1}: PureJaxRL {references[-1]:,.0f}, python dpo.py {commands[-1]:,.0f} env-steps/s,"
            f" ratio {commands[-1] / references[-1]:.3f}",
            flush=True,
        )
    ratios = np.array(commands) / np.array(references)
    print(f"PureJaxRL dpo_continuous_action.py:  {np.median(references):12,.0f} env-steps/s (one seed, median)")
    print(
        f"python dpo.py (summary sps):         {np.median(commands):12,.0f} env-steps/s over"
        f" {args.num_seeds} seed(s), median"
    )
    print(
        f"python dpo.py / PureJaxRL:           {np.median(ratios):12.3f} (median of {rounds} rounds;"
        f" range {ratios.min():.3f}-{ratios.max():.3f})"
    )


def main(bench: Bench):
    args = dpo.resolve_args(dpo.Args(**{f.name: getattr(bench, f.name) for f in dataclasses.fields(dpo.Args)}))
    args = dataclasses.replace(args, total_timesteps=dpo.num_updates(args) * dpo.batch_size(args) * args.action_repeat)
    print(
        f"{args.env_id}: {dpo.num_updates(args)} updates of {dpo.batch_size(args):,} steps, {args.num_seeds} seed(s),"
        f" {jax.device_count()} {jax.default_backend()} device(s), fastest of {bench.repeats}"
    )
    if not (bench.purejaxrl and bench.purejaxrl_only):
        compiled_rates(args, bench.repeats)
    if bench.purejaxrl and args.env_id in dpo.BRAX_ENVS:
        purejaxrl_rounds(args, bench.purejaxrl, bench.repeats)


if __name__ == "__main__":
    main(tyro.cli(Bench))
