"""Tests of es_basics.py: the ES gradient, each written-out method on test functions, CMA-ES against evosax,
OpenAI-ES on CartPole, sharding over devices, MAP-Elites against random search, the CLI and bad input."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import es_basics as eb  # noqa: E402


def run_generations(**flags):
    """Resolve Args(**flags), run every generation in-process; returns (args, problem, method, loop, outputs)."""
    args = eb.resolve_args(eb.Args(**flags))
    problem = eb.make_problem(args)
    method = eb.make_method(args, problem)
    loop = eb.init_loop_state(args, problem, method)
    generation = eb.make_generation(args, problem, method)
    outputs = []
    for g in range(args.num_generations):
        loop, out = generation(loop, eb.generation_key(args.seed, g))
        outputs.append(out)
    return args, problem, method, loop, outputs


def test_es_gradient_points_along_the_true_gradient_and_antithetic_lowers_its_variance():
    dim, sigma = 10, 0.1
    mean = jnp.linspace(-1.0, 1.0, dim)
    true_gradient = -2.0 * (mean - jnp.resize(jnp.array(eb.QUADRATIC_SOLUTION), dim))  # ∇ of -‖x - w*‖²

    def estimate(key, pop_size, antithetic):
        noise = eb.antithetic_noise(key, pop_size, dim) if antithetic else eb.all_noise(key, pop_size, dim)
        fitness = jax.vmap(eb.quadratic)(mean + sigma * noise)
        return eb.es_gradient(fitness, noise, sigma)

    g = estimate(jax.random.PRNGKey(0), 20_000, False)
    cosine = float(g @ true_gradient / (jnp.linalg.norm(g) * jnp.linalg.norm(true_gradient)))
    assert cosine > 0.9, cosine

    keys = jax.random.split(jax.random.PRNGKey(1), 200)
    plain = jax.vmap(lambda k: estimate(k, 100, False))(keys)
    mirrored = jax.vmap(lambda k: estimate(k, 100, True))(keys)
    plain_var, mirrored_var = float(plain.var(0).sum()), float(mirrored.var(0).sum())
    assert mirrored_var < 0.1 * plain_var, (mirrored_var, plain_var)  # the F(μ) term cancels in each pair
    # both are unbiased: their averages over 200 estimates point the same way as the true gradient
    for estimates in (plain, mirrored):
        avg = estimates.mean(0)
        assert float(avg @ true_gradient / (jnp.linalg.norm(avg) * jnp.linalg.norm(true_gradient))) > 0.9


def test_centered_ranks_span_minus_half_to_half_in_fitness_order():
    ranks = eb.centered_ranks(jnp.array([3.0, -1.0, 10.0, 0.5]))
    np.testing.assert_allclose(np.asarray(ranks), [1 / 6, -0.5, 0.5, -1 / 6], atol=1e-6)


# Each written-out method within a fixed budget; starts: sphere x₀ = 3·1 (f = 90), Rosenbrock x₀ = 0 (f = 1).
# Tolerances are per method, and far below what the starting distribution's samples reach.
@pytest.mark.parametrize("algo, problem, num_dims, generations, tolerance", [
    ("cem", "sphere", 10, 200, 1e-3),
    ("cma-es", "sphere", 10, 150, 1e-8),
    ("nes", "sphere", 10, 300, 1e-3),
    ("openai-es", "sphere", 10, 200, 1e-3),
    ("cem", "rosenbrock", 2, 300, 1e-2),
    ("cma-es", "rosenbrock", 2, 150, 1e-8),
    ("nes", "rosenbrock", 2, 400, 0.5),  # plain gradient ascent crawls along the curved valley
    ("openai-es", "rosenbrock", 2, 300, 1e-2),
])
def test_written_out_method_reaches_tolerance(algo, problem, num_dims, generations, tolerance):
    *_, outputs = run_generations(algo=algo, problem=problem, num_dims=num_dims, num_generations=generations)
    final = -float(outputs[-1].center_fitness)
    assert final < tolerance, (algo, problem, final)


# evosax's CMA-ES adds negative weights for the worse half (active CMA), which learns Rosenbrock's
# covariance about twice as fast as the written-out positive-weight version; both must reach 1e-6.
@pytest.mark.parametrize("problem, num_dims, generations", [("sphere", 10, 300), ("rosenbrock", 5, 500)])
def test_written_out_cma_es_is_comparable_to_evosax(problem, num_dims, generations):
    finals = {}
    for algo in ("cma-es", "evosax:CMA_ES"):
        *_, outputs = run_generations(algo=algo, problem=problem, num_dims=num_dims, num_generations=generations,
                                      sigma_init=1.0)
        finals[algo] = -float(outputs[-1].center_fitness)
    assert finals["cma-es"] < 1e-6 and finals["evosax:CMA_ES"] < 1e-6, finals


def test_openai_es_solves_cartpole():
    args, problem, method, loop, outputs = run_generations(algo="openai-es", problem="CartPole-v1",
                                                           num_generations=60)
    centre = [float(o.center_fitness) for o in outputs]  # the noiseless mean policy, 10 new episodes each time
    assert max(centre[-10:]) >= 475.0, centre
    assert centre[0] < 200.0  # the initial policy was far from it


def test_map_elites_fills_more_cells_than_random_search():
    flags = dict(problem="sphere", num_dims=10, pop_size=50, num_generations=40, sigma_init=0.3, num_bins=20)
    args, problem, method, loop, outputs = run_generations(algo="map-elites", **flags)
    map_elites_cells = int(outputs[-1].archive_cells)
    # random search: the same number of samples from MAP-Elites' generation-0 distribution N(x₀, σ²I)
    n = args.pop_size * args.num_generations
    samples = problem.init_mean + args.sigma_init * jax.random.normal(jax.random.PRNGKey(7), (n, problem.num_dims))
    _, descriptors = jax.vmap(problem.evaluate, in_axes=(0, None, None))(samples, None, None)
    random_cells = len(np.unique(np.asarray(eb.map_elites_cell(descriptors, problem.descriptor_bounds, 20))))
    assert map_elites_cells > 3 * random_cells, (map_elites_cells, random_cells)


def test_map_elites_on_cartpole_fills_more_cells_than_random_policies():
    args, problem, method, loop, outputs = run_generations(algo="map-elites", problem="CartPole-v1", pop_size=16,
                                                           num_generations=15, num_bins=10)
    n = args.pop_size * args.num_generations
    samples = problem.init_mean + args.sigma_init * jax.random.normal(jax.random.PRNGKey(7), (n, problem.num_dims))
    stats = eb.init_running_stats(problem.obs_dim)
    _, descriptors = jax.jit(jax.vmap(problem.evaluate, in_axes=(0, None, None)))(
        samples, jax.random.PRNGKey(8), stats)
    random_cells = len(np.unique(np.asarray(eb.map_elites_cell(descriptors, problem.descriptor_bounds, 10))))
    assert int(outputs[-1].archive_cells) > random_cells, (int(outputs[-1].archive_cells), random_cells)


DEVICES = """
import json, sys
sys.path.insert(0, {tests!r})
import jax, numpy as np
from test_es_basics import run_generations
results = {{}}
for flags in [dict(algo="openai-es", problem="CartPole-v1", pop_size=8), dict(algo="cma-es", problem="sphere"),
              dict(algo="map-elites", problem="sphere", pop_size=8)]:
    args, problem, method, loop, outputs = run_generations(num_generations=3, **flags)
    numbers = [x for out in outputs for x in np.asarray(out.fitness).tolist() + [float(out.center_fitness)]]
    results[args.algo] = numbers + np.asarray(method.center(loop.es)).tolist()
print(json.dumps([jax.device_count(), results]))
"""


def test_two_forced_host_devices_reproduce_one_device_exactly():
    results = []
    for count in (1, 2):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}")
        script = DEVICES.format(tests=os.path.join(ROOT, "tests"))
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert results[0][0] == 1 and results[1][0] == 2
    for algo, numbers in results[0][1].items():
        np.testing.assert_array_equal(results[1][1][algo], numbers, err_msg=algo)


def run_cli(*flags):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "es_basics.py"), *flags], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_cli_writes_run_dir_and_compare(tmp_path):
    run_dir = str(tmp_path / "run")
    proc = run_cli("--algo", "openai-es", "--problem", "CartPole-v1", "--pop-size", "8", "--num-generations", "3",
                   "--run-dir", run_dir)
    assert "all-gathered" in proc.stdout and proc.stdout.strip().splitlines()[-1] == f"run directory: {run_dir}"
    for name in ("args.json", "generations.csv", "fitness_curve.png", "params.npz", "summary.json"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0, name
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["num_generations"] == 3 and summary["algo"] == "openai-es" and summary["problem"] == "CartPole-v1"
    assert summary["best_fitness"] >= summary["final_mean_fitness"]
    saved = np.load(os.path.join(run_dir, "params.npz"))
    assert saved["center"].shape == (summary["num_dims"],) and saved["obs_mean"].shape == (4,)

    compare_dir = str(tmp_path / "compare")
    run_cli("--compare", "cem,evosax:SNES", "--problem", "sphere", "--num-generations", "5", "--num-seeds", "2",
            "--run-dir", compare_dir)
    with open(os.path.join(compare_dir, "compare.json")) as f:
        compared = json.load(f)
    assert set(compared["results"]) == {"cem", "evosax:SNES"}
    assert all(len(r["summaries"]) == 2 for r in compared["results"].values())
    assert os.path.getsize(os.path.join(compare_dir, "compare.png")) > 0
    assert os.path.isfile(os.path.join(compare_dir, "evosax_SNES", "seed2", "summary.json"))


@pytest.mark.parametrize("flags, expected", [
    (["--algo", "ppo"], "valid: cem"),
    (["--problem", "Pong-v5"], "valid:"),
    (["--algo", "evosax:Nope"], "CMA_ES"),
    (["--algo", "cem", "--pop-size", "8"], "elite fraction"),
    (["--algo", "openai-es", "--pop-size", "7"], "even"),
    (["--algo", "evosax:Open_ES", "--pop-size", "7"], "even"),
    (["--algo", "map-elites", "--problem", "Pendulum-v1"], "descriptor"),
    (["--compare", "cem,bogus"], "bogus"),
])
def test_bad_input_is_one_line_and_nonzero_exit(flags, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eb.main(tyro.cli(eb.Args, args=flags))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        tyro.cli(eb.Args, args=["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for field in dataclasses.fields(eb.Args):
        assert "--" + field.name.replace("_", "-") in text, field.name
