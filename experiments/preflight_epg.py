"""Pre-flight gate of an epg.py meta-training run (not collected by pytest): will the ES see anything?

At the run's starting loss θ₀ and α = 0, --num-pairs antithetic pairs θ₀ ± σ·ε_i each run one lifetime on every
task of two independent sets of --num-tasks training tasks (tasks and lifetime seeds shared by the members within a
set, as in a generation). On each set a pair's difference is d_i = F(θ₀ + σ·ε_i) - F(θ₀ - σ·ε_i), F the mean over
the set's tasks of the fitness. The gate is the correlation r of d on set A with d on set B across the pairs: near
zero, the ranks of a generation are task noise and the run will be a random walk; launch a long run only where r is
clearly positive (docs/epg.md: r ≥ 0.2). `--reward-blind-control` repeats it with the loss's reward input zeroed:
a signal that survives without the reward is about a behaviour, not about learning from reward, and the
correlation of the reward-specific part (the difference with the reward read minus the same pair's with it zeroed,
on each set) says what reading the reward alone contributes. For `--loss-form pg-weight` the gate is stricter
(docs/epg.md): the reward-specific r at least 0.3, the pair differences' sd with the reward zeroed at most a third
of that with it read, and hand-set REINFORCE in that form clearly above the zero loss on training tasks (printed
last, for any form, since it says whether the inner setting lets the form learn at all).

Everything after this script's own flags goes to epg.py's arguments, so the gate measures the run's own setting:

    python experiments/preflight_epg.py --reward-blind-control --lifetime 2048 --update-every 256 --update-epochs 4 \
        --inner-learning-rate 3e-3 --buffer-size 512
"""

import dataclasses
import math
import os
import sys
import time

import jax
import numpy as np
import tyro
from jax.flatten_util import ravel_pytree

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import epg  # noqa: E402


@dataclasses.dataclass
class Gate:
    num_pairs: int = 32
    """antithetic pairs (2 × this many members on each task set)"""
    reward_blind_control: bool = False
    """also measure r with the loss's reward input zeroed (doubles the time)"""
    seed: int = 0
    """seed of the noise and of the two task sets (independent of the run's --seed)"""
    num_reinforce_tasks: int = 16
    """training tasks on which hand-set REINFORCE (the pg-weight form) is compared with the zero loss"""


def pair_differences(args: epg.Args, env, run, theta, eps, key, reward_blind: bool):
    """(d [num_pairs], F [2·num_pairs]) on one task set drawn from key: d_i = F(θ + σ·ε_i) - F(θ - σ·ε_i), eps
    [num_pairs, dim], run the jitted make_population of 2·num_pairs members."""
    key_tasks, key_lives = jax.random.split(key)
    tasks = epg.sample_tasks(env.family, key_tasks, args.num_tasks, False, args.goal_split, args.balanced_tasks)
    settings = epg.InnerSettings.of(dataclasses.replace(args, reward_blind=reward_blind), 0.0)
    members = np.concatenate([theta + args.sigma * eps, theta - args.sigma * eps])
    fitness = np.asarray(run(members, tasks, jax.random.split(key_lives, args.num_tasks), settings)).mean(axis=1)
    return fitness[: len(eps)] - fitness[len(eps) :], fitness


def correlation_interval(r: float, n: int) -> tuple[float, float]:
    """The 95% interval of a Pearson r over n pairs (Fisher's z)."""
    z, half = math.atanh(r), 1.96 / math.sqrt(n - 3)
    return math.tanh(z - half), math.tanh(z + half)


def describe(d_a: np.ndarray, d_b: np.ndarray) -> str:
    """The gate's r of pair differences d_a, d_b [num_pairs] on the two task sets, with its 95% interval."""
    if d_a.std() == 0 or d_b.std() == 0:
        return "r undefined (no pair differs)"
    r = float(np.corrcoef(d_a, d_b)[0, 1])
    low, high = correlation_interval(r, len(d_a))
    return f"r = {r:.3f} (95% CI {low:.2f} to {high:.2f})"


def main(gate: Gate, args: epg.Args):
    env = epg.make_task_env(args)
    theta = np.asarray(ravel_pytree(epg.loss_template(args, env))[0])
    key_noise, key_a, key_b = jax.random.split(jax.random.PRNGKey(gate.seed), 3)
    eps = np.asarray(jax.random.normal(key_noise, (gate.num_pairs, theta.shape[0])))
    run = jax.jit(epg.make_population(args, env))
    print(
        f"gate on {args.task_family} ({args.goal_split} goals), loss of {theta.shape[0]:,} parameters "
        f"(--loss-init {args.loss_init}), σ {args.sigma}, {gate.num_pairs} pairs × {args.num_tasks} tasks × 2 sets, "
        f"lifetimes of {args.lifetime:,} steps, {args.update_epochs} epoch(s), α = 0",
        flush=True,
    )
    differences = {}
    for reward_blind in (False, True) if gate.reward_blind_control else (False,):
        start = time.time()
        d_a, f_a = pair_differences(args, env, run, theta, eps, key_a, reward_blind)
        d_b, _ = pair_differences(args, env, run, theta, eps, key_b, reward_blind)
        differences[reward_blind] = d_a, d_b
        print(
            f"{'reward input zeroed' if reward_blind else 'reward input read '}: {describe(d_a, d_b)}; members' "
            f"fitness {f_a.mean():.2f} ± {f_a.std(ddof=1):.2f}, pair differences sd {d_a.std(ddof=1):.3f}; "
            f"{time.time() - start:.0f} s",
            flush=True,
        )
    if gate.reward_blind_control:  # what reading the reward adds to each pair's difference, on each set
        (read_a, read_b), (blind_a, blind_b) = differences[False], differences[True]
        print(f"reward-specific part (read - zeroed): {describe(read_a - blind_a, read_b - blind_b)}")
        ratio = blind_a.std(ddof=1) / read_a.std(ddof=1)
        print(f"pair differences' sd, reward zeroed / read: {ratio:.3f}")
    reinforce_row(gate, args, env)
    print("gate, reference form: r (reward read) at least 0.2; pg-weight form: the reward-specific r at least 0.3,")
    print("the sd ratio at most 1/3, and hand-set REINFORCE clearly above the zero loss")


def reinforce_row(gate: Gate, args: epg.Args, env):
    """Can the pg-weight form express learning at this inner setting? Hand-set REINFORCE (both discounts) against
    the zero loss on --num-reinforce-tasks training tasks, the same tasks and lifetime seeds for each."""
    linear = dataclasses.replace(args, loss_form="pg-weight", loss_size="linear", reward_blind=False)
    n = gate.num_reinforce_tasks
    key_tasks, key_lives = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(gate.seed), 1))
    tasks = epg.sample_tasks(env.family, key_tasks, n, False, args.goal_split, args.balanced_tasks)
    run = epg.make_runner(linear, env)
    weights = {"zero loss": np.zeros(len(epg.PG_FEATURES))}
    weights.update({name: np.eye(len(epg.PG_FEATURES))[k] for name, k in epg.REINFORCE.items()})
    for name, w in weights.items():
        final = np.asarray(
            run(w, tasks, jax.random.split(key_lives, n), epg.InnerSettings.of(linear, 0.0)).final_return
        )
        print(f"{name:15s} on {n} training tasks: {final.mean():.2f} ± {final.std(ddof=1):.2f}", flush=True)


if __name__ == "__main__":
    gate, rest = tyro.cli(Gate, return_unknown_args=True)
    main(gate, epg.resolve_args(tyro.cli(epg.Args, args=rest)))
