"""Table and figure of the LPO transfer test from lpo.py --eval-drift directories (not collected by pytest).

Reads runs/transfer/{env}/{lpo,dpo,ppo}/ (experiments/run_lpo_transfer.sh) and, for drifts missing there, the dpo.py
runs runs/compare/{env}__{dpo,ppo}/ made with the same flags and seeds. Prints the markdown table of final
sampled-action returns (mean ± std, interquartile mean, Welch's t-test p of LPO against PPO and against DPO) and
writes the learning curves (mean ± standard error over seeds) to docs/lpo_transfer.png.

    python experiments/report_lpo_transfer.py
"""

import dataclasses
import json
import os

import matplotlib
import numpy as np
import scipy.stats
import tyro

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402


@dataclasses.dataclass
class Report:
    transfer: str = "runs/transfer"
    """folder of --eval-drift directories, one per env"""
    compare: str = "runs/compare"
    """folder of dpo.py's {env}__{drift} run directories"""
    out: str = "docs/lpo_transfer.png"
    """where to write the figure"""


def run_dir(report: Report, env: str, drift: str) -> str:
    own = os.path.join(report.transfer, env, drift)
    return own if os.path.isfile(os.path.join(own, "summary.json")) else os.path.join(report.compare, f"{env}__{drift}")


def main(report: Report):
    envs = [  # those with a finished run
        env
        for env in sorted(os.listdir(report.transfer))
        if any(os.path.isfile(os.path.join(run_dir(report, env, d), "summary.json")) for d in ("lpo", "dpo", "ppo"))
    ]
    fig, axes = plt.subplots(1, len(envs), figsize=(4.2 * len(envs), 3.4), squeeze=False)
    print(
        "| env | steps per seed | seeds | LPO mean ± std (IQM) | DPO mean ± std (IQM) | PPO mean ± std (IQM) "
        "| p LPO vs PPO | p LPO vs DPO |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for ax, env in zip(axes[0], envs):
        finals = {}
        for drift in ("lpo", "dpo", "ppo"):
            path = run_dir(report, env, drift)
            if not os.path.isfile(os.path.join(path, "summary.json")):
                continue
            with open(os.path.join(path, "summary.json")) as f:
                finals[drift] = json.load(f)
            steps, mean, std = np.loadtxt(os.path.join(path, "metrics.csv"), delimiter=",", skiprows=1, ndmin=2).T[:3]
            se = std / np.sqrt(finals[drift]["num_seeds"])
            ax.plot(steps, mean, label=drift.upper())
            ax.fill_between(steps, mean - se, mean + se, alpha=0.25)
        ax.set(title=env, xlabel="environment steps per seed", ylabel="episodic return (training)")
        ax.xaxis.set_major_formatter(EngFormatter())  # 100k, 1M: long tick labels run into each other
        ax.legend()

        def cell(d, finals=finals):
            if d not in finals:
                return "-"
            r = finals[d]
            return f"{r['final_return_mean']:.1f} ± {r['final_return_std']:.1f} ({r['final_return_iqm']:.1f})"

        def p(d, finals=finals):
            if "lpo" not in finals or d not in finals:
                return "-"
            test = scipy.stats.ttest_ind(finals["lpo"]["final_returns"], finals[d]["final_returns"], equal_var=False)
            return f"{test.pvalue:.2g}"

        first = next(iter(finals.values()))
        print(
            f"| {env} | {first['total_timesteps']:,} | {first['num_seeds']} | {cell('lpo')} | {cell('dpo')} | "
            f"{cell('ppo')} | {p('ppo')} | {p('dpo')} |"
        )
    fig.tight_layout()
    fig.savefig(report.out, dpi=110)
    print(f"figure: {report.out}")


if __name__ == "__main__":
    main(tyro.cli(Report))
