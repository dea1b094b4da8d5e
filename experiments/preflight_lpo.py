"""Pre-flight gate of an lpo.py meta-training run (not collected by pytest): will the ES see anything?

At the run's starting ES mean θ₀, --num-pairs antithetic pairs θ₀ ± σ·ε_i each train --num-runs inner runs on each
of two independent seed sets (seeds shared by all members within a set, as in a generation). On each set a pair's
difference is d_i = F(θ₀ + σ·ε_i) - F(θ₀ - σ·ε_i), F the mean final return over the set's runs. The gate is the
correlation r of d on set A with d on set B across the pairs (lpo.es_signal, which meta-training also logs every
generation): near zero, a generation's ranks are seed noise and the run will be a random walk; launch a long run
only where r is clearly positive (docs/lpo.md: r ≥ 0.2). Beside it: how far the members' returns spread against
PPO's seed-to-seed spread, and where PPO and the members' mean sit below the env's ceiling.

With several --env-ids (each at its --env-flags inner loop, as in meta-training) the same members train on every
env; beside each env's r, the joint r is the same correlation of the fitness the ES is told: each set's member
returns shaped within each env (--fitness-shaping) and averaged over the envs.

Everything after this script's own flags goes to lpo.py's arguments, so the gate measures the run's own setting:

    python experiments/preflight_lpo.py --env-id CartPole-v1 --total-timesteps 65536 --update-epochs 10 \\
        --learning-rate 5e-4 --anneal-lr False --drift-hidden --sigma 0.1 0.999 0.01
"""

import dataclasses
import os
import sys
import time

import jax
import numpy as np
import tyro
from jax.flatten_util import ravel_pytree

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from preflight_epg import correlation_interval  # noqa: E402

import lpo  # noqa: E402


@dataclasses.dataclass
class Gate:
    num_pairs: int = 32
    """antithetic pairs (2 × this many members on each seed set)"""
    num_runs: int = 2
    """inner runs per member on each of the two seed sets"""
    seed: int = 0
    """seed of the noise and of the two seed sets (independent of the run's --seed)"""


def main(gate: Gate, args: lpo.Args):
    args = dataclasses.replace(args, pop_size=2 * gate.num_pairs)
    env_args = [lpo.env_inner_args(args, e) for e in args.env_ids or (args.env_id,)]
    initial = lpo.init_drift_params(jax.random.PRNGKey(args.seed), args.ppo_init, args.drift_hidden, args.drift_start)
    theta, unravel = ravel_pytree(initial)
    key_noise, key_runs = jax.random.split(jax.random.PRNGKey(gate.seed))
    eps = jax.random.normal(key_noise, (gate.num_pairs, theta.shape[0]))
    members = jax.vmap(unravel)(theta + args.sigma[0] * jax.numpy.concatenate([eps, -eps]))  # evosax's order
    keys = jax.random.split(key_runs, 4 * gate.num_runs)
    shaped = []  # per env [2·pairs, 2]: the members' returns on set A and on set B, shaped within the env
    for a in env_args:
        init, fitness, _, baselines = lpo.make_env_fitness(a)
        runners = lpo.init_seeds(init, keys[: 2 * gate.num_runs])  # set A: the first num_runs, set B: the rest
        print(
            f"gate on {a.env_id}: drift of {theta.shape[0]:,} weights (hidden {a.drift_hidden}), σ {a.sigma[0]}, "
            f"{gate.num_pairs} pairs × {gate.num_runs} runs × 2 seed sets of "
            f"{lpo.num_updates(a) * lpo.batch_size(a):,} steps, {a.update_epochs} epochs at learning rate "
            f"{a.learning_rate} (anneal {a.anneal_lr})",
            flush=True,
        )
        start = time.time()
        per_run = np.asarray(fitness(members, runners, keys[2 * gate.num_runs :]), dtype=float)  # [2·pairs, 2·runs]
        ppo = np.asarray(baselines(runners, keys[2 * gate.num_runs :])[0], dtype=float)
        report("ES signal r", lpo.es_signal(per_run), gate.num_pairs, f"; {time.time() - start:.0f} s")
        member_means = per_run.mean(1)
        print(
            f"members' return {member_means.mean():.1f} ± {member_means.std(ddof=1):.1f} over members (each the mean "
            f"of {2 * gate.num_runs} runs; best {member_means.max():.1f}, worst {member_means.min():.1f}); PPO on the "
            f"same runs {ppo.mean():.1f} ± {ppo.std(ddof=1):.1f} over seeds (std of a {2 * gate.num_runs}-run mean: "
            f"{ppo.std(ddof=1) / np.sqrt(2 * gate.num_runs):.1f})"
        )
        sets = per_run[:, : gate.num_runs].mean(1), per_run[:, gate.num_runs :].mean(1)
        shaped.append(np.stack([lpo.shape_within_env(x, args.fitness_shaping) for x in sets], 1))
    if len(env_args) > 1:
        joint = lpo.es_signal(np.mean(shaped, 0))
        report(f"joint ES signal r ({args.fitness_shaping} within each env, averaged)", joint, gate.num_pairs, "")
    print("gate: launch the long run only where r is at least 0.2")


def report(label: str, r: float, num_pairs: int, suffix: str):
    low, high = correlation_interval(r, num_pairs) if np.isfinite(r) else (np.nan, np.nan)
    print(f"{label} = {r:.3f} (95% CI {low:.2f} to {high:.2f}) over {num_pairs} pairs{suffix}", flush=True)


if __name__ == "__main__":
    gate, rest = tyro.cli(Gate, return_unknown_args=True)
    main(gate, tyro.cli(lpo.Args, args=rest))
