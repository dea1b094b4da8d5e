"""Tests of es_basics.py: the ES gradient and fitness shaping; every written-out method reaching a tolerance on
sphere and Rosenbrock and surviving ten times the generations it needs (CMA-ES stopping on Hansen's criteria);
NaN and -inf fitness ranked last; SNES and CMA-ES against evosax's; OpenAI-ES's weight decay and observation
normalisation on the reference code's scale; OpenAI-ES on CartPole; MAP-Elites against random search; one
device against two forced host devices and two processes; SIGKILL and --resume; bad multi-process launches; the
CLI's outputs and its refusal of bad input."""

import concurrent.futures
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import processes  # noqa: E402

import es_basics as eb  # noqa: E402


def run(chunk=None, **flags):
    """Resolve Args(**flags) and run it in-process, `chunk` generations per call; returns (args, problem,
    final loop state, outputs)."""
    args = eb.resolve_args(eb.Args(**flags))
    problem = eb.make_problem(args)
    return (args, problem) + eb.run_generations(args, problem, chunk=chunk)


def test_es_gradient_points_along_the_true_gradient_and_antithetic_lowers_its_variance():
    dim, sigma = 10, 0.1
    mean = jnp.linspace(-1.0, 1.0, dim)
    solution = jnp.resize(jnp.array([0.5, 0.1, -0.3]), dim)  # Karpathy's NES toy: F(x) = -‖x - w*‖²
    true_gradient = -2.0 * (mean - solution)

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def estimate(key, pop_size, antithetic):
        noise = eb.antithetic_noise(key, pop_size, dim) if antithetic else eb.all_noise(key, pop_size, dim)
        return eb.es_gradient(jax.vmap(lambda x: -jnp.sum((x - solution) ** 2))(mean + sigma * noise), noise, sigma)

    def cosine(g):
        return float(g @ true_gradient / (jnp.linalg.norm(g) * jnp.linalg.norm(true_gradient)))

    assert cosine(estimate(jax.random.PRNGKey(0), 10_000, False)) > 0.9
    keys = jax.random.split(jax.random.PRNGKey(1), 100)
    plain = jax.vmap(lambda k: estimate(k, 100, False))(keys)
    mirrored = jax.vmap(lambda k: estimate(k, 100, True))(keys)
    assert float(mirrored.var(0).sum()) < 0.1 * float(plain.var(0).sum())  # F(μ) cancels in each pair
    assert cosine(plain.mean(0)) > 0.9 and cosine(mirrored.mean(0)) > 0.9  # both unbiased


def test_centered_ranks_put_nan_and_minus_inf_last():
    np.testing.assert_allclose(
        eb.centered_ranks(jnp.array([3.0, -1.0, 10.0, 0.5])), [1 / 6, -0.5, 0.5, -1 / 6], atol=1e-6
    )
    ranks = eb.centered_ranks(jnp.array([3.0, jnp.nan, 10.0, -jnp.inf, 0.5]))
    assert set(np.argsort(np.asarray(ranks))[:2]) == {1, 3}  # the two lowest ranks
    assert list(eb.best_first(jnp.array([jnp.nan, 1.0, -jnp.inf, 2.0]))[:2]) == [3, 1]


# Each written-out method on 5-D sphere (x₀ = 3·1, f = 45) and 2-D Rosenbrock (x₀ = 0, f = 1): the tolerance
# must be reached within `needed` generations (seeds 1-3 took at most about 2/3 of it), and a run of
# 10 × needed must stay finite and keep it. CMA-ES must instead stop on one of Hansen's criteria.
CONVERGENCE = [
    ("cem", "sphere", 5, 100, 1e-3),
    ("cma-es", "sphere", 5, 120, 1e-8),
    ("openai-es", "sphere", 5, 120, 1e-3),
    ("snes", "sphere", 5, 150, 1e-8),
    ("cem", "rosenbrock", 2, 200, 1e-2),
    ("cma-es", "rosenbrock", 2, 200, 1e-8),
    ("openai-es", "rosenbrock", 2, 300, 1e-2),
    ("snes", "rosenbrock", 2, 300, 0.5),  # separable: the valley is not aligned with the axes
]


CONVERGENCE_NEEDED = [(algo, needed) for algo, problem, _, needed, _ in CONVERGENCE if problem == "sphere"]


@pytest.mark.parametrize("algo, problem, num_dims, needed, tolerance", CONVERGENCE)
def test_method_converges_and_survives_ten_times_the_generations(algo, problem, num_dims, needed, tolerance):
    args, _, loop, out = run(algo=algo, problem=problem, num_dims=num_dims, num_generations=10 * needed, chunk=needed)
    f = -out.center_fitness
    assert (f[:needed] < tolerance).any(), f[:needed].min()
    for leaf in jax.tree.leaves(loop.es):
        assert np.isfinite(np.asarray(leaf)).all()
    assert np.isfinite(out.fitness).all() and np.isfinite(out.sigma).all() and out.sigma[-1] > 0
    assert f[-1] < tolerance, f[-1]
    if algo == "cma-es":
        assert eb.STOP_REASONS[out.stop[-1]] in ("tolfun", "tolx", "sigma-underflow"), out.stop[-1]
        assert len(f) < 10 * needed and (out.stop[:-1] == 0).all()
    else:
        assert len(f) == 10 * needed and (out.stop == 0).all()


def test_map_elites_survives_a_long_run_and_fills_more_cells_than_random_search():
    flags = dict(algo="map-elites", problem="sphere", num_dims=10, pop_size=50, num_bins=20, sigma_init=0.3)
    args, problem, loop, out = run(num_generations=400, chunk=400, **flags)
    assert np.isfinite(loop.es.solutions).all() and not np.isnan(loop.es.fitness).any()
    assert (np.diff(out.archive_cells) >= 0).all()
    np.testing.assert_allclose(out.center_fitness, out.elite_fitness, rtol=1e-6)  # deterministic: no curse
    n = args.pop_size * 40  # random search: 40 generations' samples from generation 0's distribution
    samples = problem.init_mean + args.sigma_init * jax.random.normal(jax.random.PRNGKey(7), (n, problem.num_dims))
    _, descriptors, _ = jax.vmap(problem.evaluate, in_axes=(0, None, None))(samples, None, None)
    random_cells = len(np.unique(np.asarray(eb.map_elites_cell(descriptors, eb.descriptor_bounds(args), 20))))
    assert out.archive_cells[39] > 3 * random_cells, (out.archive_cells[39], random_cells)


ALL_ALGOS = [
    "cem",
    "cma-es",
    "openai-es",
    "snes",
    "map-elites",
    "evosax:CMA_ES",
    "evosax:SNES",
    "evosax:Open_ES",
]


@pytest.mark.parametrize("algo", ALL_ALGOS)
def test_nan_and_minus_inf_fitness_rank_last(algo):
    """One tell with member 1 NaN and member 3 -inf equals the tell where both have the worst fitness (rank
    methods: below every other; MAP-Elites: they never enter the archive)."""
    args = eb.resolve_args(eb.Args(algo=algo, problem="sphere", pop_size=10))
    init, ask, tell = eb.METHODS[algo.split(":")[0]]
    key = jax.random.PRNGKey(3)
    state = init(key, jnp.full(args.num_dims, 3.0), args)
    population, state = ask(key, state, args)
    fitness = jax.vmap(eb.FUNCTIONS["sphere"])(population)
    injected = fitness.at[1].set(jnp.nan).at[3].set(-jnp.inf)
    worst = jnp.min(fitness) - 1.0
    replaced = fitness.at[1].set(worst).at[3].set(worst)
    descriptors = population[:, :2]
    told, _ = tell(key, state, population, injected, descriptors, args)
    expected, _ = tell(
        key,
        state,
        population,
        replaced if algo != "map-elites" else fitness.at[1].set(-jnp.inf).at[3].set(-jnp.inf),
        descriptors,
        args,
    )
    for a, b in zip(jax.tree.leaves(told), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(told.mean)).all() and np.isfinite(np.asarray(told.sigma)).all()


@pytest.mark.parametrize("algo", ["cem", "cma-es", "openai-es", "snes"])
def test_methods_carry_on_when_a_fifth_of_the_members_fail(algo, monkeypatch):
    """Every generation about 10% of the members get NaN and 10% -inf; every method still solves the sphere."""
    init, ask, tell = eb.METHODS[algo]

    def failing_tell(key, state, population, fitness, descriptors, args):
        u = jax.random.uniform(key, fitness.shape)
        fitness = jnp.where(u < 0.1, jnp.nan, jnp.where(u < 0.2, -jnp.inf, fitness))
        return tell(key, state, population, fitness, descriptors, args)

    monkeypatch.setitem(eb.METHODS, algo, (init, ask, failing_tell))
    needed = dict(CONVERGENCE_NEEDED)[algo]
    args, _, loop, out = run(algo=algo, problem="sphere", num_dims=5, num_generations=2 * needed, chunk=2 * needed)
    assert np.isfinite(np.asarray(loop.es.mean)).all() and -out.center_fitness[-1] < 1e-3, -out.center_fitness[-1]


def test_snes_update_equals_evosax_and_converges_alike():
    from evosax.algorithms import SNES

    args = eb.resolve_args(eb.Args(algo="snes", problem="sphere", sigma_init=0.7))
    key = jax.random.PRNGKey(0)
    state = eb.diagonal_init(key, jnp.linspace(-2, 2, args.num_dims), args)
    population, _ = eb.gaussian_ask(key, state, args)
    fitness = jax.vmap(eb.FUNCTIONS["rosenbrock"])(population)
    mine, _ = eb.snes_tell(key, state, population, fitness, None, args)
    es = SNES(population_size=args.pop_size, solution=jnp.zeros(args.num_dims))
    params = es.default_params.replace(std_init=jnp.asarray(0.7))
    theirs, _ = es.tell(key, population, -fitness, es.init(key, state.mean, params), params)
    np.testing.assert_allclose(mine.mean, theirs.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mine.sigma, theirs.std, rtol=1e-5)
    generations = {}  # generations to 1e-8 on 10-D sphere, summed over 3 seeds
    for algo in ("snes", "evosax:SNES"):
        args = eb.resolve_args(eb.Args(algo=algo, problem="sphere", num_generations=300))
        problem = eb.make_problem(args)
        generations_300 = eb.make_generations(args, problem)  # compiled once, run for each seed (neither stops)
        runs = []
        for seed in (1, 2, 3):
            loop = eb.init_loop_state(dataclasses.replace(args, seed=seed), problem)
            runs.append(jax.tree.map(np.asarray, generations_300(loop, eb.generation_keys(seed, 0, 300))[1]))
        generations[algo] = sum(int(np.argmax(-out.center_fitness < 1e-8)) + 1 for out in runs)
        assert all((-out.center_fitness < 1e-8).any() for out in runs), algo
    assert 0.75 < generations["snes"] / generations["evosax:SNES"] < 1.33, generations


@pytest.mark.parametrize("problem, num_dims, generations", [("sphere", 10, 300), ("rosenbrock", 5, 500)])
def test_written_out_cma_es_is_comparable_to_evosax(problem, num_dims, generations):
    for algo in ("cma-es", "evosax:CMA_ES"):
        out = run(algo=algo, problem=problem, num_dims=num_dims, num_generations=generations, chunk=generations)[3]
        assert np.nanmin(-out.center_fitness) < 1e-8, (algo, np.nanmin(-out.center_fitness))


def test_openai_es_weight_decay_acts_on_the_reference_scale():
    """Salimans et al.'s code: g = (1/n) Σ rank_i ε_i - λμ with no 1/σ, so the share of the decay in Adam's
    first moment does not depend on σ (the same ε and the same ranking at σ = 0.01 and σ = 1)."""
    moments = []
    for sigma in (0.01, 1.0):
        args = eb.resolve_args(eb.Args(algo="openai-es", problem="sphere", weight_decay=0.005, sigma_init=sigma))
        state = eb.gradient_es_init(None, jnp.full(10, 3.0), args)
        population, _ = eb.openai_es_ask(jax.random.PRNGKey(0), state, args)
        fitness = (population - state.mean) @ jnp.arange(10.0)  # the same order at every σ
        moments.append(eb.openai_es_tell(None, state, population, fitness, None, args)[0].adam_m)
    np.testing.assert_allclose(moments[0], moments[1], rtol=1e-4)
    noise = eb.antithetic_noise(jax.random.PRNGKey(0), 50, 10)
    expected = eb.centered_ranks(noise @ jnp.arange(10.0)) @ noise / 50 - 0.005 * 3.0
    np.testing.assert_allclose(moments[1], 0.1 * expected, rtol=1e-4, atol=1e-7)


def test_observation_normalisation_floors_the_variance_and_clips():
    stats = eb.ObsStats(jnp.array([10.0, 0.0]), jnp.array([100.0, 1e-6]), jnp.array(10.0))  # mean (1, 0)
    out = eb.normalize_obs(jnp.array([1.05, 0.01]), stats, True)  # variances 9 and 1e-7: the second floored to 1e-2
    np.testing.assert_allclose(out, [0.05 / 3, 0.1], rtol=1e-4)
    np.testing.assert_allclose(eb.normalize_obs(jnp.array([1e3, -1e3]), stats, True), [5.0, -5.0])


def test_openai_es_solves_cartpole_and_gathers_statistics_from_a_fraction_of_the_population():
    args, _, loop, out = run(algo="openai-es", problem="CartPole-v1", num_generations=20, obs_stats_fraction=0.1)
    assert out.center_fitness[0] < 200.0 and max(out.center_fitness[-5:]) >= 475.0, out.center_fitness
    # ~10% of 20 × 64 episodes of 8 to 500 steps: more than 1% of the fewest, less than 30% of the most
    assert 0.01 * 20 * 64 * 8 < float(loop.obs_stats.count) < 0.3 * 20 * 64 * 500, float(loop.obs_stats.count)


def devices_report(launch: eb.Args) -> list:
    """What the device test compares, in whatever process layout this runs: a map-elites run with observation
    statistics (every gather: fitness, descriptors, each member's Σo, Σo², steps) into launch.run_dir, then the
    compiled generation's collectives (openai-es on sphere, no observation statistics). Returns [devices,
    processes, collectives]."""
    eb.start_processes(launch)
    args = eb.resolve_args(
        eb.Args(
            algo="map-elites",
            problem="CartPole-v1",
            pop_size=8,
            num_generations=3,
            normalize_observations=True,
            obs_stats_fraction=0.5,
        )
    )
    eb.run(args, launch.run_dir, quiet=True)
    args = eb.resolve_args(eb.Args(algo="openai-es", problem="sphere", pop_size=8))
    problem = eb.make_problem(args)
    hlo = eb.make_generations(args, problem).lower(eb.init_loop_state(args, problem), eb.generation_keys(1, 0, 1))
    return [jax.device_count(), jax.process_count(), processes.collectives(hlo.compile().as_text())]


DEVICES = """
import json, sys
sys.path[:0] = [{root!r}, {tests!r}]
import tyro
import es_basics as eb
from test_es_basics import devices_report
print(json.dumps(devices_report(tyro.cli(eb.Args))))  # --run-dir and, for several processes, the launch flags
"""


def test_two_processes_and_two_devices_reproduce_one_device_bit_for_bit(tmp_path):
    """The same run (map-elites with observation statistics, so that fitness, descriptors and statistics are all
    gathered) on 1 device (this process), 2 forced host devices and 2 processes of 1 device: the same
    generations.csv, params.npz and summary.json (timings aside). Without statistics or descriptors (openai-es on
    sphere) the compiled generation exchanges the fitness vector f32[pop] and nothing else."""
    driver = [sys.executable, "-c", DEVICES.format(root=ROOT, tests=os.path.join(ROOT, "tests"))]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    command = ["timeout", "-s", "KILL", "300", *driver, "--run-dir", str(tmp_path / "two_devices")]
    two_devices = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the three layouts at once
        launched = pool.submit(processes.launch, driver + ["--run-dir", str(tmp_path / "two_processes")], 2, 300)
        reports = {"one": devices_report(eb.Args(run_dir=str(tmp_path / "one")))}
        results = launched.result()
    out, err = two_devices.communicate()
    assert two_devices.returncode == 0, err[-3000:]
    reports["two_devices"] = json.loads(out.strip().splitlines()[-1])
    for code, _, err in results:
        assert code == 0, err[-3000:]
    reports["two_processes"] = json.loads(results[0][1].strip().splitlines()[-1])
    assert all(line.startswith("[Gloo]") for line in results[1][1].splitlines())  # process 1: only the runtime
    assert [reports[k][:2] for k in reports] == [[1, 1], [2, 1], [2, 2]]
    assert reports["one"][2] == [] and reports["two_devices"][2] == reports["two_processes"][2] == [
        "f32[8]{0} all-gather"
    ]
    assert not os.path.exists(tmp_path / "two_processes" / "summary.json.tmp")
    timings = ("wall_seconds", "first_call_seconds", "generations_per_second", "num_devices")
    folders = [tmp_path / k for k in reports]
    for name in ("generations.csv", "params.npz"):
        contents = [(folder / name).read_bytes() for folder in folders]
        assert contents[0] == contents[1] == contents[2], name
    summaries = [
        {k: v for k, v in json.loads((folder / "summary.json").read_text()).items() if k not in timings}
        for folder in folders
    ]
    assert summaries[0] == summaries[1] == summaries[2]


def test_cma_es_run_stops_cleanly_and_writes_every_output(tmp_path, capsys):
    args = eb.resolve_args(eb.Args(algo="cma-es", problem="sphere", num_generations=5000))
    summary = eb.run(args, str(tmp_path), quiet=True)
    assert summary["stop_reason"] in ("tolfun", "tolx", "sigma-underflow") and summary["num_generations"] < 5000
    assert summary["final_center_fitness"] > -1e-10
    assert "stopped after generation" in capsys.readouterr().out
    for name in ("generations.csv", "fitness_curve.png", "params.npz", "summary.json"):  # main writes args.json
        assert os.path.getsize(tmp_path / name) > 0, name
    with open(tmp_path / "generations.csv") as f:
        assert len(f.readlines()) == summary["num_generations"] + 1
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["stop_reason"] == summary["stop_reason"]


def test_cli_writes_run_dir(tmp_path, capsys):
    """main on parsed flags, in this process (the SIGKILL test runs the script itself)."""
    run_dir = str(tmp_path / "run")
    flags = ["--algo", "snes", "--problem", "rastrigin", "--num-generations", "30", "--run-dir", run_dir]
    eb.main(tyro.cli(eb.Args, args=flags))
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"run directory: {run_dir}"
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["num_generations"] == 30 and summary["best_fitness"] >= summary["final_mean_fitness"]
    assert np.load(os.path.join(run_dir, "params.npz"))["center"].shape == (10,)
    for name in ("args.json", "generations.csv", "fitness_curve.png"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0, name


@pytest.mark.parametrize("flags, expected", [(["--algo", "ppo"], "cma-es"), (["--problem", "Pong-v5"], "sphere")])
def test_tyro_refuses_an_unknown_method_or_problem_without_a_traceback(flags, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eb.main(tyro.cli(eb.Args, args=flags))
    output = capsys.readouterr()
    assert exit_info.value.code != 0 and "Traceback" not in output.err + output.out
    assert expected in output.err + output.out


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--algo", "cem", "--pop-size", "8"], "elites"),
        (["--algo", "openai-es", "--pop-size", "7"], "even"),
        (["--algo", "evosax:Open_ES", "--pop-size", "7"], "even"),
        (["--algo", "map-elites", "--problem", "Pendulum-v1"], "descriptor"),
        (["--num-dims", "0"], "--num-dims"),
        (["--sigma-init", "nan"], "--sigma-init nan must be finite and > 0"),
        (["--learning-rate", "inf", "--algo", "openai-es"], "--learning-rate inf must be finite"),
        (["--obs-stats-fraction", "1.5"], "--obs-stats-fraction 1.5 must be finite and in (0, 1]"),
        (["--algo", "cem", "--elite-ratio", "2"], "--elite-ratio 2.0 must be finite and in (0, 1]"),
        (["--algo", "ite", "--ite-stop-fraction", "0"], "--ite-stop-fraction 0.0 must be finite and in (0, 1]"),
        (["--algo", "cem", "--cem-noise", "-1"], "--cem-noise -1.0 must be finite and >= 0"),
        (["--weight-decay", "-0.1"], "--weight-decay -0.1 must be finite and >= 0"),
        (["--hidden", "32", "-4"], "--hidden (32, -4) must be finite and > 0"),
        (["--algo", "poet", "--pop-size", "7"], "even"),
        (["--algo", "poet", "--poet-max-pairs", "1"], "--poet-max-pairs"),
        (["--algo", "ite", "--ite-max-trials", "0"], "--ite-max-trials"),
    ],
)
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


def test_gp_posterior_equals_the_closed_form_on_three_points():
    """M-BOA's GP: μ(x) = P(x) + kᵀK⁻¹(y - P(X)), σ²(x) = 1 - kᵀK⁻¹k, written here in numpy; a fourth, masked
    observation slot must change nothing."""
    observed = np.array([[0.0, 0.0], [0.3, 0.1], [-0.2, 0.4], [9.0, 9.0]])
    residuals, mask = np.array([0.5, -1.0, 0.2, 123.0]), np.array([True, True, True, False])
    points = np.array([[0.1, 0.1], [0.0, 0.0], [1.0, -1.0]])
    prior, rho, noise = np.array([0.3, -0.2, 0.7]), 0.25, 1e-3

    def matern(a, b):
        r = np.sqrt(5) * np.linalg.norm(a[:, None] - b[None], axis=-1) / rho
        return (1 + r + r**2 / 3) * np.exp(-r)

    K = matern(observed[:3], observed[:3]) + noise * np.eye(3)
    k = matern(points, observed[:3])
    mean = prior + k @ np.linalg.inv(K) @ residuals[:3]
    var = 1 - np.einsum("ij,jk,ik->i", k, np.linalg.inv(K), k)
    got_mean, got_var = eb.gp_posterior(
        jnp.asarray(points),
        jnp.asarray(prior),
        jnp.asarray(observed),
        jnp.asarray(residuals),
        jnp.asarray(mask),
        rho,
        noise,
    )
    np.testing.assert_allclose(got_mean, mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_var, var, rtol=1e-3, atol=1e-5)
    assert got_var[1] < 0.01 and got_var[2] > 0.99  # at an observation and far from all of them


def test_ite_trials_follow_the_predictions_and_stop_at_the_fraction():
    """On a toy map whose elites all work as predicted, ITE and the baseline try the best-predicted elite and stop
    after it; when that elite fails, the baseline tries the next in prior order and ITE lowers its neighbours."""
    behaviours = jnp.array([[0.0, 0.0], [0.05, 0.0], [1.0, 0.0], [0.0, 1.0]])
    prior = jnp.array([1.0, 0.95, 0.9, -jnp.inf])  # the last cell is empty
    args = eb.resolve_args(eb.Args(algo="ite", ite_max_trials=4))
    for use_gp in (True, False):
        tried, perf = eb.ite_adapt(behaviours, prior, prior, args, use_gp)
        assert list(np.asarray(tried)) == [0, -1, -1, -1] and float(perf[0]) == 1.0
    real = jnp.array([0.0, 0.0, 0.9, -jnp.inf])  # the two neighbours fail
    assert list(np.asarray(eb.ite_adapt(behaviours, prior, real, args, False)[0])) == [0, 1, 2, -1]
    assert list(np.asarray(eb.ite_adapt(behaviours, prior, real, args, True)[0])) == [0, 2, -1, -1]


def test_minimal_criterion_novelty_and_transfer_rule_on_a_toy():
    scores = jnp.array([0.1, 0.25, 0.6, 0.95, 1.0])
    assert list(np.asarray(eb.minimal_criterion(scores, 0.25, 0.95))) == [False, True, True, True, False]
    archive = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1]])
    novelty = eb.novelty(np.array([[0.05, 0.05], [1.0, 1.0]]), archive, k=2)
    assert novelty[1] > 10 * novelty[0]
    allowed = jnp.array([False, True, True, True])  # candidate 0 is the pair itself
    replace, best = eb.transfer_choice(jnp.array(0.5), jnp.array([0.99, 0.4, 0.7, 0.6]), allowed)
    assert bool(replace) and int(best) == 2
    replace, _ = eb.transfer_choice(jnp.array(0.7), jnp.array([0.99, 0.4, 0.7, 0.6]), allowed)
    assert not bool(replace)  # a tie keeps the resident


def test_arm_kinematics_and_damage():
    straight = jnp.zeros(eb.ARM_JOINTS)
    np.testing.assert_allclose(eb.arm_hand(straight), [1.0, 0.0], atol=1e-6)
    base_stuck = jnp.zeros(eb.ARM_JOINTS, bool).at[0].set(True)  # the whole arm turns 45°
    np.testing.assert_allclose(eb.arm_hand(straight, base_stuck, jnp.zeros(eb.ARM_JOINTS)), [0.5**0.5] * 2, atol=1e-6)
    offset = jnp.zeros(eb.ARM_JOINTS).at[4].set(1.0)  # the second half turns 45°
    np.testing.assert_allclose(
        eb.arm_hand(straight, jnp.zeros(eb.ARM_JOINTS, bool), offset), [0.5 + 0.5 * 0.5**0.5, 0.5 * 0.5**0.5], atol=1e-6
    )


def test_track_scores_running_crashing_and_falling():
    """A linear policy that always runs at full speed and never jumps finishes the flat track, hits the first wall
    (4.5 m) when walls are high and falls into the first gap (1 m) when gaps are wide."""
    runner = [(jnp.zeros((eb.RUNNER.obs_dim, 2)), jnp.array([10.0, -10.0]))]
    scores = [float(eb.run_track(runner, jnp.array(env))) for env in ([0.0, 0.0], [1.0, 0.0], [0.0, 1.0])]
    np.testing.assert_allclose(scores, [1.0, 0.45, 0.1], atol=0.02)
    jumper = [(jnp.zeros((eb.RUNNER.obs_dim, 2)), jnp.array([10.0, 10.0]))]  # jumps whenever it lands
    assert float(eb.run_track(jumper, jnp.array([0.0, 0.0]))) == 1.0


def test_ite_cli_smoke(tmp_path, capsys):
    """A tiny ITE run through main writes its files and summary (POET's smoke run is the uninterrupted run of the
    SIGKILL test)."""
    run_dir = str(tmp_path / "run")
    flags = ["--algo", "ite", "--num-generations", "20", "--num-bins", "10", "--ite-max-trials", "5"]
    eb.main(tyro.cli(eb.Args, args=flags + ["--run-dir", run_dir]))
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"run directory: {run_dir}"
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert all(key in summary for key in ["ite_trials", "ite_recovered_fraction", "es_trials"]), summary
    for name in ["ite_damages.csv", "ite.png", "generations.csv", "args.json"]:
        assert os.path.getsize(os.path.join(run_dir, name)) > 0, name


def test_centered_ranks_share_ties_and_give_no_step_without_spread():
    np.testing.assert_allclose(
        eb.centered_ranks(jnp.array([2.0, 5.0, 2.0, 7.0])), [-1 / 3, 1 / 6, -1 / 3, 0.5], atol=1e-6
    )
    np.testing.assert_array_equal(np.asarray(eb.centered_ranks(jnp.full(6, 3.8329))), 0.0)
    # epg.py's copy is the same function (one meaning per name across the scripts)
    sys.path.insert(0, ROOT)
    import epg

    fitness = jnp.array([1.0, jnp.nan, 1.0, -jnp.inf, 4.0, jnp.inf])
    np.testing.assert_array_equal(np.asarray(epg.centered_ranks(fitness)), np.asarray(eb.centered_ranks(fitness)))


POET_FLAGS = ["--algo", "poet", "--num-generations", "100", "--poet-mutate-every", "3", "--poet-transfer-every", "4"]
KILLED = [  # small policies, one centre episode: the cost is start-up and compilation
    (["--algo", "cma-es", "--problem", "CartPole-v1", "--num-generations", "100"], ["generations.csv", "params.npz"]),
    (
        ["--algo", "map-elites", "--problem", "CartPole-v1", "--num-generations", "100"],
        ["generations.csv", "params.npz"],
    ),
    (POET_FLAGS + ["--poet-max-pairs", "3"], ["poet_history.csv", "poet_envs.csv"]),  # 3 pairs: the oldest archived
]


@pytest.mark.parametrize("flags, files", KILLED, ids=["cma-es", "map-elites", "poet"])
def test_sigkill_then_resume_gives_the_uninterrupted_run(tmp_path, flags, files):
    """A run killed at its first checkpoint and resumed writes the files of the uninterrupted run, which runs beside
    it; that run is also the CLI smoke run of each (its last line, its files, POET's summary keys)."""
    command = [sys.executable, os.path.join(ROOT, "es_basics.py"), *flags, "--pop-size", "8", "--hidden", "4"]
    command += ["--num-eval-episodes", "1"]
    full = subprocess.Popen(
        command + ["--run-dir", str(tmp_path / "full")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300

    def wait_for(checkpoint, proc):
        while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)

    wait_for(tmp_path / "full" / "checkpoint.msgpack", full)  # compiled: the killed run's compilation is cached
    killed = subprocess.Popen(command + ["--run-dir", str(tmp_path / "killed")], stdout=subprocess.DEVNULL, cwd=ROOT)
    checkpoint = tmp_path / "killed" / "checkpoint.msgpack"
    wait_for(checkpoint, killed)
    killed.kill()  # SIGKILL at the first checkpoint (2% of the run)
    killed.wait()
    assert checkpoint.exists() and not (tmp_path / "killed" / "summary.json").exists()
    eb.main(tyro.cli(eb.Args, args=command[2:] + ["--resume", str(tmp_path / "killed")]))  # in this process
    out, err = full.communicate(timeout=300)
    assert full.returncode == 0, err[-3000:]
    assert out.strip().splitlines()[-1] == f"run directory: {tmp_path / 'full'}"
    for name in files:
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
    for name in ["args.json", "poet.png" if "poet" in flags else "fitness_curve.png"]:
        assert os.path.getsize(tmp_path / "full" / name) > 0, name
    timings = ("wall_seconds", "first_call_seconds", "generations_per_second")
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("killed", "full")]
    kept = [{k: v for k, v in s.items() if k not in timings} for s in summaries]
    assert kept[0] == kept[1]
    if "poet" in flags:
        assert {"environments_created", "environments_solved", "hardest_solved", "direct_es_generations"} <= set(
            kept[0]
        )


def test_bad_launches_end_in_one_line_and_exit_code_2_without_hanging():
    script = [sys.executable, os.path.join(ROOT, "es_basics.py"), "--algo", "cma-es", "--init-timeout", "2"]
    address = f"127.0.0.1:{processes.free_port()}"

    def started(num_processes, process_id):
        flags = [
            "--coordinator-address",
            address,
            "--num-processes",
            str(num_processes),
            "--process-id",
            str(process_id),
        ]
        command = ["timeout", "-s", "KILL", "60", *script, *flags]
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def ended(procs):
        return [(proc.wait(), proc.stderr.read()) for proc in procs]

    cases = [
        (f"error: no coordinator at {address} after 2 s", ended([started(2, 1)])),  # process 0 never starts
        ("error: process 1 was launched with other flags than process 0", ended([started(2, 0), started(3, 1)])),
        (
            "error: --pop-size 5 does not divide over the 2 JAX devices",
            [(code, err) for code, _, err in processes.launch(script + ["--pop-size", "5"], 2, timeout=60)],
        ),
    ]
    for expected, outcomes in cases:
        for code, err in outcomes:
            lines = [line for line in err.splitlines() if not line.startswith("[Gloo]")]
            assert code == 2 and len(lines) == 1 and lines[0].startswith(expected), (expected, code, err[-2000:])


def test_an_occupied_run_dir_is_refused(tmp_path, capsys):
    """A new run into a directory that holds another's run (an epg.py run's summary.json here) is refused in one
    line pointing to --resume, exit 2, and writes nothing into it."""
    (tmp_path / "epg_run").mkdir()
    (tmp_path / "epg_run" / "summary.json").write_text("{}")
    with pytest.raises(SystemExit) as stop:
        eb.main(tyro.cli(eb.Args, args=["--run-dir", str(tmp_path / "epg_run")]))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "--resume" in err and len(err.splitlines()) == 1, err
    assert os.listdir(tmp_path / "epg_run") == ["summary.json"]


def test_a_diverging_run_stops_with_one_line(tmp_path, capsys):
    """σ₀ = 1e30 on the sphere: every member's f overflows float32, so generation 1 has no finite fitness and the
    run stops there in one line, exit 2 (a single non-finite member would only rank last)."""
    flags = ["--algo", "cma-es", "--problem", "sphere", "--sigma-init", "1e30", "--num-generations", "5"]
    with pytest.raises(SystemExit) as stop:
        eb.main(tyro.cli(eb.Args, args=flags + ["--run-dir", str(tmp_path / "run")]))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "generation 1:" in err and len(err.splitlines()) == 1, err
