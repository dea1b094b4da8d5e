"""Benchmarks of es_basics.py, not collected by pytest.

compare: several methods over several seeds on one problem, each run into {run_dir}/{method}/seed{s}/ by
es_basics.run (a run that already has its summary.json is reused, so an interrupted comparison resumes); prints a
markdown table of evaluations until the centre first reaches each threshold of f =
-fitness (test functions) or each return (policies), mean ± std over the seeds that reached it, and writes
compare.json and compare.png (centre against evaluations, median over seeds).

throughput: compiled generations per second of the written-out openai-es and evosax's Open_ES on one problem
and population (each the fastest of --repeats alternating runs, one subprocess each), of openai-es over N
forced host devices, and the bytes a generation exchanges between devices against broadcasting parameters.

Examples:
    python experiments/benchmark_es_basics.py --mode compare --problem rosenbrock --num-dims 10 --pop-size 10 \
        --sigma-init 1 --methods cma-es evosax:CMA_ES snes evosax:SNES openai-es --num-seeds 5 --num-generations 20000
    python experiments/benchmark_es_basics.py --mode throughput --problem CartPole-v1 --pop-size 64 --num-generations 50
"""

import csv
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Literal

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@dataclasses.dataclass
class BenchArgs:
    mode: Literal["compare", "throughput"] = "compare"
    """compare methods over seeds, or measure generations per second"""
    problem: str = "rosenbrock"
    """problem, as es_basics.py's --problem"""
    num_dims: int | None = None
    """test functions: dimension"""
    methods: tuple[str, ...] = ("cma-es", "evosax:CMA_ES", "snes", "openai-es")
    """compare: methods, as es_basics.py's --algo"""
    num_seeds: int = 5
    """compare: seeds 1..num_seeds per method"""
    thresholds: tuple[float, ...] = (1e-3, 1e-8)
    """compare: f values (test functions) or returns (policies) to count evaluations to"""
    pop_size: int | None = None
    """population (None: each method's default)"""
    sigma_init: float | None = None
    """initial σ (None: each method's default)"""
    num_generations: int | None = None
    """generations per run (None: each method's default); CMA-ES may stop earlier"""
    run_dir: str = "runs/benchmark_es_basics"
    """compare: where the runs, compare.json and compare.png go"""
    repeats: int = 3
    """throughput: runs per configuration, alternating, the fastest kept (other jobs slow some down)"""
    device_counts: tuple[int, ...] = (1, 2)
    """throughput: forced host device counts for openai-es (XLA_FLAGS=--xla_force_host_platform_device_count)"""
    measure: str = ""
    """internal: measure this algo in this process and print one JSON line"""


def es_args(bench: BenchArgs, algo: str, seed: int = 1, **extra):
    import es_basics as eb

    given = dict(
        num_dims=bench.num_dims,
        pop_size=bench.pop_size,
        sigma_init=bench.sigma_init,
        num_generations=bench.num_generations,
    )
    return eb.resolve_args(
        eb.Args(
            algo=algo, problem=bench.problem, seed=seed, **{k: v for k, v in given.items() if v is not None}, **extra
        )
    )


def compare(bench: BenchArgs):
    import es_basics as eb

    on_function = bench.problem in eb.TEST_FUNCTIONS
    results, curves = {}, {}
    for algo in bench.methods:
        reached, finals, stops, curves[algo] = {t: [] for t in bench.thresholds}, [], [], []
        for seed in range(1, bench.num_seeds + 1):
            args = es_args(bench, algo, seed)
            run_dir = os.path.join(bench.run_dir, algo.replace(":", "_"), f"seed{seed}")
            if os.path.isfile(os.path.join(run_dir, "summary.json")):  # finished before: reuse (resume)
                with open(os.path.join(run_dir, "summary.json")) as f:
                    summary = json.load(f)
            else:
                summary = eb.run(args, run_dir, quiet=True)
            with open(os.path.join(run_dir, "generations.csv")) as f:
                rows = list(csv.DictReader(f))
            value = np.array([float(r["center_fitness"]) for r in rows]) * (-1 if on_function else 1)
            evaluations = np.array([int(r["evaluations"]) for r in rows])
            for t in bench.thresholds:
                hit = np.flatnonzero(value <= t if on_function else value >= t)
                reached[t].append(int(evaluations[hit[0]]) if hit.size else None)
            finals.append(float(value[-1]))
            stops.append(summary["stop_reason"])
            curves[algo].append((evaluations, value))
        results[algo] = dict(
            pop_size=args.pop_size,
            sigma_init=args.sigma_init,
            num_generations=args.num_generations,
            evaluations_to=reached,
            final=finals,
            stop_reasons=stops,
        )
    os.makedirs(bench.run_dir, exist_ok=True)
    with open(os.path.join(bench.run_dir, "compare.json"), "w") as f:
        json.dump(dict(bench=dataclasses.asdict(bench), results=results), f, indent=2)
    plot(os.path.join(bench.run_dir, "compare.png"), curves, bench.problem, on_function)
    quantity = "f ≤" if on_function else "return ≥"
    print(
        "\n| method | λ | σ₀ | budget (generations) | "
        + " | ".join(f"evaluations to {quantity} {t:g}" for t in bench.thresholds)
        + " | final (median) |"
    )
    print("| --- " * (5 + len(bench.thresholds)) + "|")
    for algo, r in results.items():
        cells = []
        for t in bench.thresholds:
            hits = [e for e in r["evaluations_to"][t] if e is not None]
            cells.append(
                f"{np.mean(hits):,.0f} ± {np.std(hits):,.0f} ({len(hits)}/{bench.num_seeds})"
                if hits
                else f"not reached (0/{bench.num_seeds})"
            )
        print(
            f"| {algo} | {r['pop_size']} | {r['sigma_init']:g} | {r['num_generations']} | "
            + " | ".join(cells)
            + f" | {np.median(r['final']):.3g} |"
        )
    print(f"\nruns, compare.json and compare.png in {bench.run_dir} (runs with a summary.json are reused)")


def plot(path: str, curves: dict, problem: str, on_function: bool):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for algo, runs in curves.items():  # a run that stopped keeps its last centre
        longest = max(runs, key=lambda r: len(r[0]))[0]
        padded = [np.pad(v, (0, len(longest) - len(v)), mode="edge") for _, v in runs]
        ax.plot(longest, np.median(padded, axis=0), label=algo)
    if on_function:
        ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set(xlabel="evaluations", ylabel="f(centre), median over seeds" if on_function else "return", title=problem)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measure(bench: BenchArgs, algo: str) -> dict:
    """Compile, then time bench.num_generations generations in one call; observation normalisation off."""
    import jax

    import es_basics as eb

    args = es_args(bench, algo, normalize_observations=False)
    problem = eb.make_problem(args)
    generations = eb.make_generations(args, problem)
    loop = eb.init_loop_state(args, problem)
    keys = eb.generation_keys(args.seed, 0, args.num_generations)
    jax.block_until_ready(generations(loop, keys))  # compile and warm up
    start = time.perf_counter()
    jax.block_until_ready(generations(loop, keys))
    return dict(
        algo=algo,
        devices=jax.device_count(),
        num_dims=problem.num_dims,
        obs_dim=problem.obs_dim,
        generations_per_second=args.num_generations / (time.perf_counter() - start),
    )


def measure_in_subprocess(bench: BenchArgs, algo: str, devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    flags = ["--mode", "throughput", "--problem", bench.problem, "--measure", algo]
    for name in ("num_dims", "pop_size", "num_generations"):
        if getattr(bench, name) is not None:
            flags += ["--" + name.replace("_", "-"), str(getattr(bench, name))]
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *flags], capture_output=True, text=True, env=env, timeout=1800
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def throughput(bench: BenchArgs):
    configs = [("openai-es", 1), ("evosax:Open_ES", 1)] + [("openai-es", c) for c in bench.device_counts if c != 1]
    runs = [[measure_in_subprocess(bench, algo, d) for algo, d in configs] for _ in range(bench.repeats)]
    ours, theirs, *scaling = [
        max((r[i] for r in runs), key=lambda m: m["generations_per_second"]) for i in range(len(configs))
    ]
    pop = bench.pop_size or 64
    print(f"{bench.problem}: {ours['num_dims']} parameters, population {pop}, fastest of {bench.repeats} runs each")
    print(f"written-out openai-es:   {ours['generations_per_second']:9.1f} generations/s")
    print(f"evosax Open_ES:          {theirs['generations_per_second']:9.1f} generations/s")
    print(f"ratio (written-out / evosax): {ours['generations_per_second'] / theirs['generations_per_second']:.2f}")
    for r in [ours] + scaling:
        print(
            f"openai-es over {r['devices']} forced host device(s): {r['generations_per_second']:9.1f} generations/s"
            f" (× {r['generations_per_second'] / ours['generations_per_second']:.2f})"
        )
    # shared seeds: every device rebuilds the population, so only the scalar fitnesses travel, plus with
    # observation normalisation each member's Σo, Σo² and step count (MAP-Elites: also 2 descriptor floats)
    print(
        f"bytes exchanged per generation: {4 * pop:,} (fitnesses), {4 * pop * (2 * ours['obs_dim'] + 2):,} with "
        f"observation statistics; broadcasting the parameter vectors instead: {4 * pop * ours['num_dims']:,}"
    )


if __name__ == "__main__":
    bench = tyro.cli(BenchArgs)
    if bench.measure:
        print(json.dumps(measure(bench, bench.measure)))
    elif bench.mode == "compare":
        compare(bench)
    else:
        throughput(bench)
