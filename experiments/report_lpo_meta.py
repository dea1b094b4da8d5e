"""The pre-registered in-distribution test of an lpo.py meta-training run (docs/lpo.md; not collected).

The run's best validated ES mean (best_drift.msgpack) trains --num-seeds fresh agents at the settings the drift file
records (its meta-training env and inner loop), on seeds that neither the ES nor the choice of the best mean drew,
beside PPO and DPO on the same seeds and, as the null, --num-random drifts of the same form displaced from the ES's
start (zero, or the hidden start's) by as much as the learned drift, in random directions. Prints the table (mean
± sample std, IQM with its bootstrap 95% interval, the paired t-test against PPO on the shared seeds, Welch's p
against the null's pooled agents) and the command of every row; writes the figure of final returns per seed and the
ES mean's validation curve.

    python experiments/report_lpo_meta.py --run runs/lpo_linear --out docs/lpo/linear
"""

import dataclasses
import json
import os
import sys

import jax
import matplotlib
import numpy as np
import scipy.stats
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lpo  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclasses.dataclass
class Report:
    run: str = "runs/lpo_linear"
    """the meta-training run directory"""
    out: str = "docs/lpo/linear"
    """prefix of the figure (<out>_test.png) and of the copied run files"""
    num_seeds: int = 32
    """fresh agents per drift"""
    seed: int = 1000
    """agent seed of the test (the ES drew its runs from --seed of the run, the validation from a stream of it)"""
    num_random: int = 3
    """random drifts of the learned drift's norm (the null)"""
    env_id: str = ""
    """the meta-training env to test at (its recorded settings; runs under <run>/test_<env-id>/); empty: the run's
    first env (under <run>/test/)"""
    transfer: bool = False
    """instead: the table of the transfer runs under <run>/<transfer-name> and <run>/<transfer-name>_random_*
    (experiments/run_lpo_linear_transfer.sh, run_lpo_network_transfer.sh)"""
    transfer_name: str = "transfer"
    """the transfer runs' directory name inside the run"""


def evaluate(report: Report, drift_file: str, compare: tuple[str, ...], name: str) -> dict:
    """--eval-drift on drift_file at its recorded settings; returns {drift: summary} and prints the command."""
    flags = ["--eval-drift", drift_file, "--num-seeds", str(report.num_seeds), "--seed", str(report.seed)]
    flags += ["--env-id", report.env_id] if report.env_id else []
    test = f"test_{report.env_id}" if report.env_id else "test"
    flags += ["--compare", *compare, "--run-dir", os.path.join(report.run, test, name)]
    print("python lpo.py " + " ".join(flags), flush=True)
    with open(os.path.join(lpo.main(tyro.cli(lpo.Args, args=flags)), "summary.json")) as f:
        return json.load(f)["drifts"]


def cell(x: np.ndarray) -> str:
    stats = lpo.seed_statistics(x, "r")
    low, high = stats["r_iqm_ci"]
    return f"{stats['r_mean']:.1f} ± {stats['r_std']:.1f} | {stats['r_iqm']:.1f} [{low:.1f}, {high:.1f}]"


def final_returns(path: str) -> np.ndarray:
    with open(os.path.join(path, "summary.json")) as f:
        return np.array(json.load(f)["final_returns"])


def welch_p(a: np.ndarray | None, b: np.ndarray | None) -> str:
    """Welch's two-sided p of a against b, or a dash where either is missing."""
    return "-" if a is None or b is None else f"{scipy.stats.ttest_ind(a, b, equal_var=False).pvalue:.2g}"


def transfer_table(report: Report):
    """Per held-out env: the learned drift, DPO, PPO and the null's pooled agents, with Welch's p of the learned drift
    against PPO and against the null (the pre-registered criterion in docs/lpo.md); a run not finished yet is a
    dash, and the null's cells wait for all its drifts."""
    print("| env | learned | DPO | PPO | null (random drifts, pooled) | Welch p learned vs PPO | vs null |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    name = report.transfer_name
    for env in sorted(os.listdir(os.path.join(report.run, name))):
        paths = [os.path.join(report.run, name, env, d) for d in ("lpo", "dpo", "ppo")]
        paths += [os.path.join(report.run, f"{name}_random_{i}", env, "lpo") for i in range(report.num_random)]
        finals = [final_returns(p) if os.path.isfile(os.path.join(p, "summary.json")) else None for p in paths]
        runs = dict(zip(("lpo", "dpo", "ppo", "null"), finals[:3] + [None]))
        if all(x is not None for x in finals[3:]):
            runs["null"] = np.concatenate(finals[3:])
        cells = " | ".join("-" if x is None else cell(x).replace(" | ", " (IQM ") + ")" for x in runs.values())
        print(f"| {env} | {cells} | {welch_p(runs['lpo'], runs['ppo'])} | {welch_p(runs['lpo'], runs['null'])} |")


def main(report: Report):
    if report.transfer:
        return transfer_table(report)
    best = os.path.join(report.run, "best_drift.msgpack")
    net, ppo_init, settings = lpo.load_drift(best)
    env_id = report.env_id or settings["env_id"]
    results = evaluate(report, best, ("lpo", "dpo", "ppo"), "learned")
    finals = {k: np.array(v["final_returns"]) for k, v in results.items()}
    saved = lpo.resumed_args(lpo.Args(resume=report.run))
    # The null moves the ES's start by as much as the ES did, in random directions (the zero start: the learned norm).
    start = lpo.init_drift_params(jax.random.PRNGKey(saved.seed), saved.ppo_init, saved.drift_hidden, saved.drift_start)
    norm = float(np.sqrt(sum(np.sum(np.square(w - w0)) for w, w0 in zip(net, start))))
    for i in range(report.num_random):
        keys = jax.random.split(jax.random.PRNGKey(10_000 + i), len(net))
        random = [np.asarray(jax.random.normal(k, w.shape)) for k, w in zip(keys, net)]
        scale = norm / np.sqrt(sum(np.sum(np.square(w)) for w in random))
        path = os.path.join(report.run, f"random_drift_{i}.msgpack")
        lpo.save_drift(path, [np.asarray(w0) + w * scale for w, w0 in zip(random, start)], ppo_init, settings)
        finals[f"random {i}"] = np.array(evaluate(report, path, ("lpo",), f"random_{i}")["lpo"]["final_returns"])
    null = np.concatenate([finals[f"random {i}"] for i in range(report.num_random)])
    print(
        f"\nlearned drift: {best} (distance from the ES's start {norm:.3f}, --drift-start {saved.drift_start}); "
        f"{report.num_seeds} seeds from --seed {report.seed}\n"
    )
    print("| drift | final return mean ± std | IQM [95% CI] | paired vs PPO: mean diff., t-test p | Welch p vs null |")
    print("| --- | --- | --- | --- | --- |")
    for name, x in finals.items():
        paired = scipy.stats.ttest_rel(x, finals["ppo"]) if name != "ppo" else None
        vs_ppo = f"{np.mean(x - finals['ppo']):+.1f}, {paired.pvalue:.3g}" if paired else "-"
        vs_null = f"{scipy.stats.ttest_ind(x, null, equal_var=False).pvalue:.3g}" if not name.startswith("r") else "-"
        print(f"| {name.upper() if len(name) == 3 else name} | {cell(x)} | {vs_ppo} | {vs_null} |")
    print(f"| the null's {len(null)} agents pooled | {cell(null)} | - | - |")

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for j, (name, x) in enumerate(finals.items()):  # PPO, DPO, LPO in their colours everywhere; the null in grey
        color = lpo.METHOD_COLORS.get(name.upper(), "grey")
        left.scatter(np.full(len(x), j) + np.linspace(-0.2, 0.2, len(x)), x, s=8, color=color)
        left.plot([j - 0.3, j + 0.3], [x.mean(), x.mean()], color="black")
    left.set_xticks(range(len(finals)), [n.upper() if len(n) == 3 else n for n in finals], rotation=30)
    left.set(
        ylabel="final return (sampled actions)", title=f"{env_id}: {report.num_seeds} fresh seeds, its recorded setting"
    )
    table = np.genfromtxt(os.path.join(report.run, "generations.csv"), delimiter=",", names=True)
    env = env_id.replace("-", "")
    checked = np.isfinite(table[f"{env}_validation_return"])
    lpo_color, ppo_color = lpo.METHOD_COLORS["LPO"], lpo.METHOD_COLORS["PPO"]
    right.plot(table["generation"], table[f"{env}_mean_return"], label="members' mean", alpha=0.4, color=lpo_color)
    right.plot(table["generation"], table[f"{env}_ppo_return"], label="PPO, same runs", alpha=0.4, color=ppo_color)
    validation = table[f"{env}_validation_return"][checked]
    right.plot(table["generation"][checked], validation, "o-", label="ES mean, validation", color=lpo_color)
    args = lpo.env_inner_args(saved, env_id)  # the env's inner loop in meta-training, --env-flags included
    v = args.num_validation_seeds  # PPO on the validation seeds, drawn as run_meta_training draws them
    keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(args.seed), lpo.VALIDATION_STREAM), 2 * v)
    init, _, _, baselines = lpo.make_env_fitness(args)
    ppo_validation = float(np.mean(baselines(lpo.init_seeds(init, keys[:v]), keys[v:])[0]))
    right.axhline(ppo_validation, color=ppo_color, linestyle="--", label="PPO, validation")
    right.set(xlabel="generation", ylabel="final return", title="meta-training")
    right.legend()
    fig.tight_layout()
    fig.savefig(f"{report.out}_test.png", dpi=110)
    print(f"figure: {report.out}_test.png")


if __name__ == "__main__":
    main(tyro.cli(Report))
