"""Table and figure of the LPO-Zero architecture test (not collected by pytest).

Reads the run directories of experiments/run_lpo_zero_architectures.sh: runs/lpo_zero_{256,256_256}_seed{1,2}/
(meta-training) and the same names with _eval (10 fresh agents per drift, beside PPO). Prints the markdown table
of final sampled-action returns (mean ± std, interquartile mean) per meta-training and pooled per architecture,
with Welch's t-test p between the architectures, and draws each meta-training's population-mean return per
generation.

    python experiments/report_lpo_zero_architectures.py
"""

import csv
import json
import os

import matplotlib
import numpy as np
import scipy.stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ARCHITECTURES = {"256": "one hidden layer of 256 (Appendix A)", "256_256": "two hidden layers of 256 (section 5.1)"}
SEEDS = (1, 2)


def cell(returns) -> str:
    returns = np.asarray(returns, dtype=float)
    return f"{returns.mean():.1f} ± {returns.std():.1f} ({scipy.stats.trim_mean(returns, 0.25):.1f})"


def main(out: str = "docs/lpo/lpo_zero_architectures.png"):
    pooled, ppo = {}, None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    print(
        "| drift network | ES seed | last 10 generations: members' mean (PPO, same runs) "
        "| 10 fresh agents: final return mean ± std (IQM) |"
    )
    print("| --- | --- | --- | --- |")
    for hidden, label in ARCHITECTURES.items():
        pooled[hidden] = []
        for seed in SEEDS:
            run = f"runs/lpo_zero_{hidden}_seed{seed}"
            with open(os.path.join(run, "generations.csv")) as f:
                rows = list(csv.DictReader(f))
            gen, members, same_ppo = (
                np.array([float(r[k]) for r in rows])
                for k in ("generation", "CartPole-v1_mean_return", "CartPole-v1_ppo_return")
            )
            ax.plot(
                gen,
                members,
                color="tab:blue" if hidden == "256" else "tab:orange",
                lw=1.0,
                ls="-" if seed == 1 else "--",
                label=f"{label}, ES seed {seed}",
            )
            with open(os.path.join(f"{run}_eval", "summary.json")) as f:
                drifts = json.load(f)["drifts"]
            pooled[hidden] += drifts["lpo"]["final_returns"]
            ppo = drifts["ppo"]["final_returns"]
            print(
                f"| {label} | {seed} | {members[-10:].mean():.1f} ({same_ppo[-10:].mean():.1f}) | "
                f"{cell(drifts['lpo']['final_returns'])} |"
            )
    for hidden, label in ARCHITECTURES.items():
        print(f"| {label} | both (20 agents) | - | {cell(pooled[hidden])} |")
    print(f"| PPO | - | - | {cell(ppo)} |")
    p = scipy.stats.ttest_ind(pooled["256"], pooled["256_256"], equal_var=False).pvalue
    print(f"\nWelch's t-test, one layer against two (20 agents each): p = {p:.3f}")
    for hidden, label in ARCHITECTURES.items():
        p = scipy.stats.ttest_ind(pooled[hidden], ppo, equal_var=False).pvalue
        print(f"{label} against PPO's 10 agents: p = {p:.3f}")
    ax.set(
        xlabel="generation",
        ylabel="members' mean final return, CartPole-v1",
        title="LPO-Zero meta-training, by drift network",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
