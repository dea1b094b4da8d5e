"""Screen of epg.py's goal-point splits and inner budget (not collected by pytest): where does only learning score?

For each --goal-split and for its training and held-out goals (--num-goals each):
- the best goal-agnostic controller: "go to p* and stop" (force = clip(k_p·(p* - p) - k_d·v, ±1)), the best over a
  grid of targets p* (radius 0 to 1.5 m, 16 directions) and gains, scored by its mean episode return over the goals.
  Any policy that ignores the reward can at best choose one such behaviour for all goals;
- the zero loss (the initial policy, no learning) and PPO (α = 1) at a few inner settings, one lifetime per goal,
  scored as epg.py scores a lifetime (the mean return of fresh episodes of the final policy).
A split where the goal-agnostic ceiling sits at the zero loss's level and PPO clearly above it is one where a loss
can only score by learning from the reward.

    python experiments/screen_epg_family.py
"""

import dataclasses
import functools
import itertools
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import epg  # noqa: E402


@dataclasses.dataclass
class Screen:
    splits: tuple[str, ...] = ("sides", "sector", "half")
    """goal splits to screen"""
    num_goals: int = 32
    """goals per split and side for the learners (one lifetime each)"""
    num_ceiling_goals: int = 4096
    """goals per split and side for the goal-agnostic controllers (cheap: one episode each)"""
    lifetime: int = 2048
    """lifetime of the learners, environment steps"""
    ppo: tuple[str, ...] = ("256,4,3e-3", "64,1,1e-3", "64,4,1e-3")
    """PPO settings: rollout (steps between updates), epochs, learning rate"""


def goal_agnostic_ceiling(goals: jax.Array, episode_length: int) -> tuple[float, np.ndarray]:
    """(best mean return over goals [n, 2], its target p* [2]) of the go-to-p*-and-stop controllers."""
    env = epg.GoalPointEnv(episode_length)
    angles = np.linspace(0, 2 * math.pi, 16, endpoint=False)
    targets = [(0.0, 0.0)] + [(r * math.cos(a), r * math.sin(a)) for r in (0.25, 0.5, 0.75, 1.0, 1.5) for a in angles]
    gains = [(1.0, 1.0), (3.0, 3.0), (10.0, 5.0)]

    def episode(target, gain, goal, key):
        task = {"goal": goal}
        _, state = env.reset(key, task)

        def step(state, _):
            force = jnp.clip(gain[0] * (target - state["pos"]) - gain[1] * state["vel"], -1.0, 1.0)
            _, state, reward, *_ = env.step(key, state, force, task)
            return state, reward

        return jax.lax.scan(step, state, None, episode_length - 1)[1].sum()  # the step before the time limit

    keys = jax.random.split(jax.random.PRNGKey(0), goals.shape[0])
    over_goals = jax.jit(jax.vmap(episode, (None, None, 0, 0)))
    scores = [
        (float(over_goals(jnp.array(t), jnp.array(g), goals, keys).mean()), np.array(t))
        for t, g in itertools.product(targets, gains)
    ]
    return max(scores, key=lambda s: s[0])


def main(screen: Screen):
    start = time.time()

    @functools.cache
    def runner(update_every: int, buffer_size: int):  # learning rate, epochs and α are run-time settings
        cfg = epg.resolve_args(epg.Args(lifetime=screen.lifetime, update_every=update_every, buffer_size=buffer_size))
        return epg.make_runner(cfg, epg.make_task_env(cfg))

    for split in screen.splits:
        args = epg.resolve_args(epg.Args(goal_split=split, lifetime=screen.lifetime))
        env = epg.make_task_env(args)
        theta = jax.flatten_util.ravel_pytree(epg.loss_template(args, env))[0]
        for test in (False, True):
            tasks, keys = epg.fixed_tasks(args, env, epg.SWEEP_STREAM, screen.num_goals, test)
            many = epg.fixed_tasks(args, env, epg.EVAL_STREAM, screen.num_ceiling_goals, test)[0]["goal"]
            ceiling, target = goal_agnostic_ceiling(many, args.episode_length)
            rows = [f"goal-agnostic ceiling {ceiling:6.2f} (p* = {target.round(2).tolist()})"]
            learners = [("zero loss", args, 0.0)]
            for setting in screen.ppo:
                rollout, epochs, lr = setting.split(",")
                ppo = dataclasses.replace(
                    args,
                    update_every=int(rollout),
                    update_epochs=int(epochs),
                    inner_learning_rate=float(lr),
                    buffer_size=max(args.buffer_size, int(rollout)),
                )
                learners.append((f"PPO {setting}", ppo, 1.0))
            for name, cfg, alpha in learners:
                run = runner(cfg.update_every, cfg.buffer_size)
                final = np.asarray(run(0 * theta, tasks, keys, epg.InnerSettings.of(cfg, alpha)).final_return)
                rows.append(f"{name} {final.mean():6.2f} ± {final.std(ddof=1):.2f}")
            side = "held-out" if test else "training"
            print(f"{split:6s} {side:8s} goals: " + "; ".join(rows), flush=True)
    print(
        f"({time.time() - start:.0f} s; lifetimes of {screen.lifetime} steps, {screen.num_goals} goals per learner, "
        f"{screen.num_ceiling_goals} per ceiling; PPO rollout, epochs, learning rate; mean ± sample std)"
    )


if __name__ == "__main__":
    main(tyro.cli(Screen))
