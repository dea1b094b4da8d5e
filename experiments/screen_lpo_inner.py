"""Screen of inner-loop settings for LPO meta-training: where does the drift change the inner run?

A drift can only be discovered where drifts differ in their effect. For each candidate inner setting (epochs,
learning rate, annealing) on each meta-training env, this trains 16 seeds each of PPO at ε 0.2 (the baseline and
LPO's start), DPO, and PPO at ε 0.1 and 0.3, at lpo.py's meta-training budget, and prints:
- the clip fraction (share of samples with |r - 1| > ε, mean over the run), which says whether the policy moves far
  enough per update for the drift's shape away from r = 1 to matter (aim: 10-30%);
- the final return (sampled actions, 32 episodes per seed) of each, mean ± sample std;
- the effect sizes d = |mean difference| / pooled std of DPO vs PPO and of PPO ε 0.1 vs 0.3 (criterion: d ≥ 0.5).
Seeds are common to all four runs of a setting. On 2 CPU cores the default screen takes about 25 minutes.

    python experiments/screen_lpo_inner.py --out runs/lpo_inner_screen.json
"""

import dataclasses
import functools
import os
import sys
import time

import numpy as np
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from report_purejaxrl_comparison import train_seeds  # noqa: E402

import dpo  # noqa: E402  (lpo.py's inner loop is dpo.py's, verbatim: tests/test_lpo.py checks it)


@dataclasses.dataclass
class Screen:
    env_ids: tuple[str, ...] = ("CartPole-v1", "Acrobot-v1")
    """lpo.py's meta-training envs"""
    total_timesteps: int = 65_536
    """inner budget per run (lpo.py's CPU meta-training budget)"""
    num_seeds: int = 16
    """seeds per run, common to the four runs of a setting"""
    settings: tuple[str, ...] = (
        "4:2.5e-4:anneal",
        "4:1e-3:const",
        "10:5e-4:const",
        "10:1e-3:const",
        "10:3e-3:const",
        "20:5e-4:const",
        "20:1e-3:const",
    )
    """inner settings as EPOCHS:LEARNING_RATE:anneal|const (4:2.5e-4:anneal is PureJaxRL's default)"""
    out: str = "runs/lpo_inner_screen.json"
    """per-seed results (JSON)"""


def run(args: dpo.Args, drift) -> tuple[np.ndarray, float]:
    """Final sampled-action returns [num_seeds] and the mean clip fraction of one multi-seed training run."""
    runners, metrics, _ = train_seeds(args, drift)
    returns = np.asarray(dpo.evaluate_seeds(args, runners.train_state.params, runners.obs_stats)["final_returns"])
    return returns, float(np.mean(metrics["clip_fraction"]))


def effect_size(a: np.ndarray, b: np.ndarray) -> float:
    """|mean(a) - mean(b)| over the pooled sample std (Cohen's d, equal n)."""
    pooled = np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
    return float(abs(a.mean() - b.mean()) / max(pooled, 1e-12))


def main(screen: Screen):
    results = []
    print(
        "| env | epochs | lr | clip fraction PPO / DPO | PPO ε .2 | DPO | PPO ε .1 | PPO ε .3 | d DPO-PPO | d ε.1-ε.3 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for env_id in screen.env_ids:
        for setting in screen.settings:
            epochs, lr, schedule = setting.split(":")
            args = dpo.Args(
                env_id=env_id,
                num_seeds=screen.num_seeds,
                total_timesteps=screen.total_timesteps,
                update_epochs=int(epochs),
                learning_rate=float(lr),
                anneal_lr=schedule == "anneal",
                num_eval_envs=32,
            )
            args = dpo.resolve_args(args)
            start = time.time()
            runs = {
                "ppo": run(args, functools.partial(dpo.ppo_drift, clip_coef=0.2)),
                "dpo": run(args, dpo.dpo_drift),
                "ppo_eps0.1": run(args, functools.partial(dpo.ppo_drift, clip_coef=0.1)),
                "ppo_eps0.3": run(args, functools.partial(dpo.ppo_drift, clip_coef=0.3)),
            }
            returns = {k: v[0] for k, v in runs.items()}
            row = dict(
                env_id=env_id,
                update_epochs=int(epochs),
                learning_rate=float(lr),
                anneal_lr=schedule == "anneal",
                clip_fraction={k: v[1] for k, v in runs.items()},
                returns={k: v.tolist() for k, v in returns.items()},
                d_dpo_ppo=effect_size(returns["dpo"], returns["ppo"]),
                d_eps=effect_size(returns["ppo_eps0.1"], returns["ppo_eps0.3"]),
                seconds=time.time() - start,
            )
            results.append(row)
            cells = [f"{r.mean():.1f} ± {r.std(ddof=1):.1f}" for r in returns.values()]
            clip = f"{row['clip_fraction']['ppo']:.3f} / {row['clip_fraction']['dpo']:.3f}"
            print(
                f"| {env_id} | {epochs} | {lr} {schedule} | {clip} | {' | '.join(cells)} | {row['d_dpo_ppo']:.2f} |"
                f" {row['d_eps']:.2f} |",
                flush=True,
            )
            dpo.write_json(screen.out, dict(screen=dataclasses.asdict(screen), results=results))
    print(f"written: {screen.out}")


if __name__ == "__main__":
    main(tyro.cli(Screen))
