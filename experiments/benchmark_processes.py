"""Generations per second of each ES script at one small setting on this machine, run as 1 process with 1 device,
1 process with 2 forced host devices, and 2 processes with 1 device each (JAX's multi-controller runtime, gloo
collectives on 127.0.0.1): docs/distributed.md's table. The rate leaves start-up and compilation out: es_basics.py's
summary.json's generations_per_second (the rate after its first compiled call); epg.py and lpo.py log each
generation's seconds, and the rate is one over their median after the first generation.
Ratios are against the 1-process, 1-device run of the same script, measured in this same invocation.

    python experiments/benchmark_processes.py            # about 10 minutes on 2 cores
"""

import csv
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile

import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import processes  # noqa: E402

ROOT = processes.ROOT
SETTINGS = {
    "es_basics.py": [
        "--algo",
        "openai-es",
        "--pop-size",
        "64",
        "--num-generations",
        "100",
    ],  # and --problem from --es-basics-problem
    "epg.py": ["--task-family", "goal-point", "--lifetime", "4096", "--pop-size", "8", "--num-generations", "5"]
    + ["--eval-every", "100", "--num-select-tasks", "2"],
    "lpo.py": ["--env-ids", "CartPole-v1", "--pop-size", "8", "--total-timesteps", "16384", "--num-generations", "5"]
    + ["--drift-hidden", "--validate-every", "0"],
}


@dataclasses.dataclass
class BenchArgs:
    scripts: tuple[str, ...] = tuple(SETTINGS)
    """which scripts to measure, at the settings of SETTINGS"""
    es_basics_problem: str = "CartPole-v1"
    """es_basics.py's --problem (Pendulum-v1: every episode 200 steps, a heavier generation)"""


def measure(script: str, layout: str, folder: str) -> float:
    """Generations per second of script at its setting in this layout, compilation left out."""
    run_dir = run(script, layout, os.path.join(folder, f"{script}_{layout}"))
    if script == "es_basics.py":
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f)["generations_per_second"]
    with open(os.path.join(run_dir, "generations.csv")) as f:
        seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
    return 1.0 / statistics.median(seconds[1:])


def run(script: str, layout: str, run_dir: str) -> str:
    """Run script at its setting into run_dir in this layout; returns run_dir."""
    command = [sys.executable, os.path.join(ROOT, script), *SETTINGS[script], "--run-dir", run_dir]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if layout == "2 processes x 1 device":
        for code, _, err in processes.launch(command, 2, timeout=1200, env=env):
            assert code == 0, err[-2000:]
    else:
        devices = "2" if layout == "1 process x 2 devices" else "1"
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


def main(bench: BenchArgs):
    SETTINGS["es_basics.py"] += ["--problem", bench.es_basics_problem]
    layouts = ("1 process x 1 device", "1 process x 2 devices", "2 processes x 1 device")
    print("| script | setting | " + " | ".join(layouts) + " |")
    print("|---|---|" + "---|" * len(layouts))
    with tempfile.TemporaryDirectory() as folder:
        for script in bench.scripts:
            rates = [measure(script, layout, folder) for layout in layouts]
            cells = [f"{r:.3g} gen/s ({r / rates[0]:.2f}×)" for r in rates]
            print(f"| {script} | `{' '.join(SETTINGS[script])}` | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
