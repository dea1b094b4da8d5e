"""Benchmark of epg.py (not collected by pytest): lifetimes per minute in one vmapped ES generation.

Compiles one generation (population × tasks lifetimes, then the ES update) for a few population sizes,
times it after compilation (best of --repeats), and prints lifetimes per minute and the speed-up over a
generation of 2 lifetimes in the same process (the vmapped batch against the smallest one).

    python experiments/benchmark_epg.py --task-family goal-point --lifetime 2048
"""

import dataclasses
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import epg  # noqa: E402


@dataclasses.dataclass
class Bench:
    task_family: str = "goal-point"
    """task family to time"""
    lifetime: int = 8192
    """environment steps per lifetime"""
    pop_sizes: tuple = (2, 8, 16, 32)
    """populations to time (one task each); the first is the reference"""
    repeats: int = 3
    """timed generations per population (the fastest counts)"""


def lifetimes_per_minute(bench: Bench, pop_size: int) -> float:
    args = epg.resolve_args(
        epg.Args(
            task_family=bench.task_family,
            lifetime=bench.lifetime,
            pop_size=pop_size,
            num_tasks=1,
            num_generations=10,
            buffer_size=min(512, bench.lifetime),
        )
    )
    env = epg.make_task_env(args)
    theta = jax.flatten_util.ravel_pytree(epg.loss_template(args, env))[0]
    opt_state = epg.make_es_optimizer(args).init(theta)
    generation = epg.make_generation(args, env).lower(theta, opt_state, epg.generation_key(args, 0), 0.0).compile()
    best = float("inf")
    for g in range(bench.repeats):
        start = time.perf_counter()
        jax.block_until_ready(generation(theta, opt_state, epg.generation_key(args, g), 0.0))
        best = min(best, time.perf_counter() - start)
    return 60.0 * pop_size / best


def main(bench: Bench):
    print(
        f"{bench.task_family}, lifetimes of {bench.lifetime:,} steps, {jax.device_count()} "
        f"{jax.default_backend()} device(s)"
    )
    reference = None
    for pop_size in bench.pop_sizes:
        rate = lifetimes_per_minute(bench, pop_size)
        reference = reference or rate
        print(
            f"population {pop_size:4d}: {rate:8.1f} lifetimes/min ({rate * bench.lifetime / 60:,.0f} env steps/s), "
            f"{rate / reference:.2f}x the population-{bench.pop_sizes[0]} rate"
        )


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Bench))
