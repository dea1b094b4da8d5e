"""Table and figure of a PPO-vs-DPO comparison from dpo.py run directories (not collected by pytest).

Reads runs/compare/{env}__{ppo,dpo}/ (written by experiments/run_dpo_comparison.sh, see docs/dpo.md), or the one
env of a `dpo.py --compare dpo ppo --run-dir DIR` directory (DIR/{dpo,ppo}/), prints the markdown table of final
sampled-action returns (mean ± sample std, the interquartile mean with its bootstrap 95% interval, and Welch's
t-test p-value) and each run's training time, and writes the learning curves (mean ± standard error over seeds) to
--out; --entropy adds a row of the policies' entropy (mean over seeds).

    python experiments/report_dpo_comparison.py --runs runs/compare --out docs/dpo_comparison.png
    python experiments/report_dpo_comparison.py --runs runs/ant_full --out docs/dpo/ant_full.png --entropy
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

COLORS = {"ppo": "C0", "dpo": "C1"}  # dpo.py's METHOD_COLORS, without importing JAX for two colours


@dataclasses.dataclass
class Report:
    runs: str = "runs/compare"
    """folder holding {env}__ppo and {env}__dpo run directories, or a `dpo.py --compare dpo ppo` run directory"""
    out: str = "docs/dpo_comparison.png"
    """where to write the figure"""
    entropy: bool = False
    """add a row of panels with the policy entropy over training (mean over seeds, as metrics.csv logs it)"""


def run_dirs(runs: str) -> dict[str, dict[str, str]]:
    """{env: {drift: run directory}} of the runs in `runs`: its {env}__{drift} folders, or its ppo/ and dpo/."""
    started = [d for d in ("ppo", "dpo") if os.path.isfile(os.path.join(runs, d, "args.json"))]
    if started:
        with open(os.path.join(runs, started[0], "args.json")) as f:
            env = json.load(f)["env_id"]
        return {env: {d: os.path.join(runs, d) for d in ("ppo", "dpo")}}
    envs = sorted({name.rsplit("__", 1)[0] for name in os.listdir(runs) if "__" in name})
    return {env: {d: os.path.join(runs, f"{env}__{d}") for d in ("ppo", "dpo")} for env in envs}


def main(report: Report):
    runs = run_dirs(report.runs)
    rows_of_panels = 2 if report.entropy else 1
    fig, axes = plt.subplots(
        rows_of_panels, len(runs), figsize=(4.2 * len(runs), 3.4 * rows_of_panels), squeeze=False, sharex="col"
    )
    times = []
    print(
        "| env | budget per seed | seeds | PPO mean ± std | PPO IQM [95% CI] | DPO mean ± std | DPO IQM [95% CI]"
        " | Welch p |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for column, (env, dirs) in enumerate(runs.items()):
        ax = axes[0, column]
        finals = {}
        for drift, run_dir in dirs.items():
            if not os.path.isfile(os.path.join(run_dir, "metrics.csv")):
                continue
            with open(os.path.join(run_dir, "args.json")) as f:
                num_seeds = json.load(f)["num_seeds"]
            with open(os.path.join(run_dir, "metrics.csv")) as f:
                rows = list(csv.DictReader(f))
            steps, mean, std, entropy, sps = (
                np.array([float(r[k] or "nan") for r in rows])
                for k in ("global_step", "episodic_return_mean", "episodic_return_std", "entropy", "sps")
            )
            se = std / np.sqrt(max(num_seeds - 1, 1))  # metrics.csv's std is over seeds with ddof 0
            color = COLORS[drift]
            ax.plot(steps, mean, label=drift.upper(), color=color)
            ax.fill_between(steps, mean - se, mean + se, alpha=0.3, color=color)
            if report.entropy:
                axes[1, column].plot(steps, entropy, label=drift.upper(), color=color)
            seconds = np.sum(steps[0] * num_seeds / sps)  # every update's seconds from its logged speed
            times.append(
                f"{env} {drift.upper()}: {len(rows)} updates of {num_seeds} seeds in {seconds:,.0f} s of training"
            )
            if os.path.isfile(os.path.join(run_dir, "summary.json")):
                with open(os.path.join(run_dir, "summary.json")) as f:
                    finals[drift] = json.load(f)
        ax.set(title=env, ylabel="episodic return (training, mean ± s.e.)")
        ax.legend()
        if report.entropy:
            axes[1, column].set(ylabel="policy entropy (mean over seeds)")
            axes[1, column].legend()
        axes[-1, column].set(xlabel="environment steps per seed")
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
    print("\n".join(times))
    fig.tight_layout()
    fig.savefig(report.out, dpi=110)
    print(f"figure: {report.out}")


if __name__ == "__main__":
    main(tyro.cli(Report))
