"""Throughput of es_basics.py: written-out openai-es against evosax Open_ES on the same problem and
population (generations per second, and their ratio, from one run), and scaling of the written-out
openai-es over N forced host devices (one subprocess per device count).

Not collected by pytest. Example:
    python tests/benchmark_es_basics.py --problem CartPole-v1 --pop-size 64 --num-generations 50
    python tests/benchmark_es_basics.py --problem sphere --num-dims 1000 --pop-size 256 --device-counts 1 2
"""

import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Tuple

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class BenchArgs:
    problem: str = "CartPole-v1"
    """problem, as es_basics.py's --problem"""
    num_dims: int = 10
    """dimension for test functions"""
    pop_size: int = 64
    """population size (even; must divide over every device count)"""
    num_generations: int = 50
    """timed generations (after one compiled warm-up generation)"""
    repeats: int = 3
    """measure each configuration this many times, alternating the methods, and keep the fastest (other jobs
    on the machine slow some measurements down)"""
    device_counts: Tuple[int, ...] = (1, 2)
    """forced host device counts for the scaling runs (XLA_FLAGS=--xla_force_host_platform_device_count)"""
    measure: str = ""
    """internal: measure this algo in this process and print one JSON line"""


def measure(bench: BenchArgs, algo: str) -> dict:
    """Compile one generation, then time bench.num_generations generations; returns generations/s.

    Observation normalisation is off for both methods, so they do the same work apart from the update.
    """
    sys.path.insert(0, ROOT)
    import jax
    import es_basics as eb

    args = eb.resolve_args(eb.Args(algo=algo, problem=bench.problem, num_dims=bench.num_dims, pop_size=bench.pop_size,
                                   num_generations=bench.num_generations, normalize_observations=False))
    problem = eb.make_problem(args)
    method = eb.make_method(args, problem)
    loop = eb.init_loop_state(args, problem, method)
    generation = eb.make_generation(args, problem, method)
    loop, out = generation(loop, eb.generation_key(args.seed, 0))  # compile and warm up
    jax.block_until_ready(out)
    start = time.perf_counter()
    for g in range(1, args.num_generations + 1):
        loop, out = generation(loop, eb.generation_key(args.seed, g))
    jax.block_until_ready(out)
    seconds = time.perf_counter() - start
    return dict(algo=algo, devices=jax.device_count(), generations_per_second=args.num_generations / seconds,
                num_dims=problem.num_dims)


def subprocess_measure_once(bench: BenchArgs, algo: str, devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, os.path.abspath(__file__), "--problem", bench.problem, "--num-dims", str(bench.num_dims),
           "--pop-size", str(bench.pop_size), "--num-generations", str(bench.num_generations), "--measure", algo]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fastest(bench: BenchArgs, configs: list) -> list:
    """For each (algo, devices) in configs, the fastest of bench.repeats runs, the configs alternating."""
    runs = [[subprocess_measure_once(bench, algo, devices) for algo, devices in configs] for _ in range(bench.repeats)]
    return [max((r[i] for r in runs), key=lambda m: m["generations_per_second"]) for i in range(len(configs))]


def main(bench: BenchArgs):
    if bench.measure:
        print(json.dumps(measure(bench, bench.measure)))
        return
    print(f"{bench.problem}: population {bench.pop_size}, {bench.num_generations} timed generations")
    ours, theirs, *scaling = fastest(bench, [("openai-es", 1), ("evosax:Open_ES", 1)] +
                                     [("openai-es", c) for c in bench.device_counts if c != 1])
    print(f"{ours['num_dims']} parameters, 1 device, fastest of {bench.repeats} runs each")
    print(f"written-out openai-es:   {ours['generations_per_second']:9.1f} generations/s")
    print(f"evosax Open_ES:          {theirs['generations_per_second']:9.1f} generations/s")
    print(f"ratio (written-out / evosax): {ours['generations_per_second'] / theirs['generations_per_second']:.2f}")
    base = ours["generations_per_second"]
    for r in [ours] + scaling:
        print(f"openai-es over {r['devices']} forced host device(s): {r['generations_per_second']:9.1f} generations/s "
              f"(× {r['generations_per_second'] / base:.2f})")

if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
