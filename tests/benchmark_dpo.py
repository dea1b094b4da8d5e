"""Throughput benchmark of dpo.py (not collected by pytest: run it as a script).

Prints, from one process, so every number is a ratio against a reference measured alongside it:
  1. training env-steps per second of dpo.py's compiled loop;
  2. the same environment stepped alone with random actions at the same batch shape (the ceiling
     for on-policy training), and the ratio of 1 to 2;
  3. the wall time of N seeds vmapped in one call against N sequential calls of one seed.
All timings exclude compilation (each function is compiled first, then timed).

    python tests/benchmark_dpo.py --env-id CartPole-v1 --num-seeds 4
    python tests/benchmark_dpo.py --env-id ant --backend spring --total-timesteps 327680 --num-seeds 2
"""

import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dpo  # noqa: E402


def timed(compiled, *args):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - start


def random_stepping(args: dpo.Args):
    """step(rng): num_updates × rollout steps of num_envs envs with uniform random actions."""
    env = dpo.make_env(args)
    steps = dpo.num_updates(args) * args.num_steps * args.num_unrolls

    def run(rng):
        obs, state = jax.vmap(env.reset)(jax.random.split(rng, args.num_envs))

        def step(carry, _):
            state, rng, total = carry
            rng, key_action, key_env = jax.random.split(rng, 3)
            if env.discrete:
                action = jax.random.randint(key_action, (args.num_envs,), 0, env.action_dim)
            else:
                action = jax.random.uniform(key_action, (args.num_envs, env.action_dim), minval=env.action_low,
                                            maxval=env.action_high)
            _, state, reward, *_ = jax.vmap(env.step)(jax.random.split(key_env, args.num_envs), state, action)
            return (state, rng, total + reward.sum()), None

        return jax.lax.scan(step, (state, rng, 0.0), None, steps)[0][2]

    return run


def main(args: dpo.Args):
    args = dpo.resolve_args(args)
    n, batch, updates = args.num_seeds, dpo.batch_size(args), dpo.num_updates(args)
    total = updates * batch
    print(f"{args.env_id}: {updates} updates × {batch} steps per seed, {n} seeds, "
          f"{jax.device_count()} {jax.default_backend()} device(s) ({jax.devices()[0].device_kind})")

    keys, _ = dpo.seed_keys(args)
    train_many = jax.jit(jax.vmap(dpo.make_train(args))).lower(keys).compile()
    train_sps = total * n / timed(train_many, keys)
    stepper = jax.jit(jax.vmap(random_stepping(args))).lower(keys).compile()
    env_sps = total * n / timed(stepper, keys)
    print(f"training, {n} seeds vmapped:             {train_sps:12,.0f} env-steps/s")
    print(f"random actions alone, same batch shape:  {env_sps:12,.0f} env-steps/s")
    print(f"training / env-alone ratio:              {train_sps / env_sps:12.3f}")

    one = dataclasses.replace(args, num_seeds=1)
    one_keys, _ = dpo.seed_keys(one)
    train_one = jax.jit(jax.vmap(dpo.make_train(one))).lower(one_keys).compile()
    sequential = sum(timed(train_one, keys[i:i + 1]) for i in range(n))
    vmapped = timed(train_many, keys)
    print(f"{n} seeds vmapped: {vmapped:.2f}s; {n} × one seed: {sequential:.2f}s; "
          f"ratio (vmapped / sequential) {vmapped / sequential:.3f}")


if __name__ == "__main__":
    main(tyro.cli(dpo.Args))
