"""Table and figure of a PPO-vs-DPO comparison from dpo.py run directories (not collected by pytest).

Reads runs/compare/{env}__{ppo,dpo}/ (written by runs/compare/run.sh, see docs/dpo.md), prints the markdown table
of final sampled-action returns (mean ± sample std, the interquartile mean with its bootstrap 95% interval, and
Welch's t-test p-value) and
writes the learning curves (mean ± standard error over seeds) to docs/dpo_comparison.png.

    python experiments/report_dpo_comparison.py --runs runs/compare --out docs/dpo_comparison.png
"""

import csv
import dataclasses
import json
import os

import matplotlib
import numpy as np
import scipy.stats
import tyro

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclasses.dataclass
class Report:
    runs: str = "runs/compare"
    """folder holding {env}__ppo and {env}__dpo run directories"""
    out: str = "docs/dpo_comparison.png"
    """where to write the figure"""


def main(report: Report):
    envs = sorted({name.rsplit("__", 1)[0] for name in os.listdir(report.runs) if "__" in name})
    fig, axes = plt.subplots(1, len(envs), figsize=(4.2 * len(envs), 3.4), squeeze=False)
    print(
        "| env | budget per seed | seeds | PPO mean ± std | PPO IQM [95% CI] | DPO mean ± std | DPO IQM [95% CI]"
        " | Welch p |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for ax, env in zip(axes[0], envs):
        finals = {}
        for drift in ("ppo", "dpo"):
            run_dir = os.path.join(report.runs, f"{env}__{drift}")
            if not os.path.isfile(os.path.join(run_dir, "summary.json")):
                continue
            with open(os.path.join(run_dir, "summary.json")) as f:
                summary = json.load(f)
            with open(os.path.join(run_dir, "metrics.csv")) as f:
                rows = list(csv.DictReader(f))
            steps, mean, std = (
                np.array([float(r[k] or "nan") for r in rows])
                for k in ("global_step", "episodic_return_mean", "episodic_return_std")
            )
            se = std / np.sqrt(summary["num_seeds"])
            ax.plot(steps, mean, label=drift.upper())
            ax.fill_between(steps, mean - se, mean + se, alpha=0.3)
            finals[drift] = summary
        ax.set(title=env, xlabel="environment steps per seed", ylabel="episodic return (training)")
        ax.legend()
        if len(finals) == 2:
            ppo, dpo = finals["ppo"], finals["dpo"]
            p = scipy.stats.ttest_ind(ppo["final_returns"], dpo["final_returns"], equal_var=False).pvalue
            cells = [f"{env} | {ppo['total_timesteps']:,} | {ppo['num_seeds']}"]
            for s in (ppo, dpo):  # summary.json's sample std (ddof 1) and the IQM's bootstrap interval
                low, high = s["final_return_iqm_ci"]
                cells.append(f"{s['final_return_mean']:.1f} ± {s['final_return_std']:.1f}")
                cells.append(f"{s['final_return_iqm']:.1f} [{low:.1f}, {high:.1f}]")
            verdict = "" if p < 0.05 else f" (no difference detected at n = {ppo['num_seeds']})"
            print(f"| {' | '.join(cells)} | {p:.2g}{verdict} |")
    fig.tight_layout()
    fig.savefig(report.out, dpi=110)
    print(f"figure: {report.out}")


if __name__ == "__main__":
    main(tyro.cli(Report))
