"""Tests of epg.py: the learned loss, the inner loop, task samplers, the ES generation, meta-training, resume,
devices, --test.

Every run of this module uses the settings of FLAGS (goal-point, lifetimes of 2,048 steps), so the lifetimes,
the generation and the evaluation are compiled once for the whole module (see `compile_once`), --test included."""

import concurrent.futures
import csv
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import processes  # noqa: E402

import epg  # noqa: E402

OBS_DIM, ACTION_DIM = 4, 2  # goal-point
FLAGS = [
    "--task-family",
    "goal-point",
    "--lifetime",
    "2048",
    "--buffer-size",
    "64",
    "--update-every",
    "64",
    "--minibatch-size",
    "32",
    "--pop-size",
    "4",
    "--num-tasks",
    "2",
    "--num-eval-episodes",
    "2",
    "--eval-every",
    "2",
    "--num-eval-tasks",
    "4",
    "--num-select-tasks",
    "4",
    "--save-every",
    "1",
    "--memory-units",
    "4",
    "--num-generations",
    "2",
]
RUN_FILES = (
    "args.json",
    "generations.csv",
    "checkpoint.msgpack",
    "loss.msgpack",
    "best_loss.msgpack",
    "fitness_curve.png",
    "summary.json",
)


def epg_args(flags):
    return tyro.cli(epg.Args, args=flags)


ARGS = epg.resolve_args(epg_args(FLAGS))
NOT_COMPILED = (  # read by main, resolve_args and run_test alone, never by make_lifetime or make_generation
    "run_dir",
    "resume",
    "test",
    "load_loss",
    "load_reward_blind_loss",
    "num_seeds",
    "ppo_rollouts",
    "ppo_learning_rates",
    "num_sweep_tasks",
)


@pytest.fixture(scope="module", autouse=True)
def compile_once():
    """epg.make_generation and epg.make_runner memoised on their arguments (NOT_COMPILED aside), so that the runs of
    this module that build the same function compile it once. The memo returns the very function an unmemoised call
    would build for those arguments."""
    patch = pytest.MonkeyPatch()
    for name in ("make_generation", "make_runner"):
        build, built = getattr(epg, name), {}

        def memoised(args, env, *rest, build=build, built=built):
            key = (repr(dataclasses.replace(args, **dict.fromkeys(NOT_COMPILED))), type(env).__name__, rest)
            if key not in built:
                built[key] = build(args, env, *rest)
            return built[key]

        patch.setattr(epg, name, memoised)
    yield
    patch.undo()


@pytest.fixture(scope="module")
def env():
    return epg.make_task_env(ARGS)


@pytest.fixture(scope="module")
def unit(env):
    """(agent, loss parameters, a random full buffer) for the unit tests of the loss."""
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    n = ARGS.buffer_size
    buffer = epg.Buffer(
        obs=jax.random.normal(keys[0], (n, OBS_DIM)),
        action=jax.random.normal(keys[1], (n, ACTION_DIM)),
        reward=jax.random.normal(keys[2], (n,)),
        done=jnp.zeros(n).at[::20].set(1.0),
        terminated=jnp.zeros(n),
        final_obs=jnp.zeros((n, OBS_DIM)),
        valid=jnp.ones(n),
        episode_step=jnp.zeros(n),
    )
    random_start = epg.loss_template(dataclasses.replace(ARGS, loss_init="flax"), env)  # zero-output: no gradient
    return epg.init_agent(jax.random.PRNGKey(0), ARGS, OBS_DIM, ACTION_DIM), random_start, buffer


def stats():
    """The statistics of a lifetime's start: (observations, actions)."""
    return epg.Normalizer.init(OBS_DIM), epg.Normalizer.init(ACTION_DIM)


def loss_value(loss_params, agent, buffer, index, reward_blind=False):
    inputs = epg.loss_inputs(agent, buffer, *stats(), reward_blind)
    return epg.loss_network(ARGS).apply(loss_params, inputs, index).mean()


NEWEST = jnp.arange(32, 64)  # the minibatch: the 32 newest steps of the buffer


def test_loss_maps_buffer_to_scalar_with_finite_nonzero_policy_gradient(unit):
    agent, loss_params, buffer = unit
    inputs = epg.loss_inputs(agent, buffer, *stats())
    # observation, action, reward, done, policy mean and log-std, memory units
    assert inputs.shape == (ARGS.buffer_size, OBS_DIM + ACTION_DIM + 2 + 2 * ACTION_DIM + ARGS.memory_units)
    value = loss_value(loss_params, agent, buffer, NEWEST)
    assert value.shape == () and np.isfinite(float(value))
    grads = jax.grad(loss_value, argnums=1)(loss_params, agent, buffer, NEWEST)
    for part in ("policy", "log_std", "memory"):
        leaves = jax.tree.leaves(grads[part])
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
        assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0.0, part


def test_context_sees_the_whole_buffer(unit):
    agent, loss_params, buffer = unit
    base = float(loss_value(loss_params, agent, buffer, NEWEST))
    for row in (0, ARGS.buffer_size // 2):  # the oldest step, and one in the middle: neither is in the minibatch
        changed = buffer._replace(reward=buffer.reward.at[row].add(5.0))
        assert abs(float(loss_value(loss_params, agent, changed, NEWEST)) - base) > 1e-6, row


def test_gradient_reaches_the_policy_through_the_context_alone(unit):
    """Cut the head's direct connection to the per-step policy outputs: the policy still gets a gradient."""
    agent, loss_params, buffer = unit
    first = OBS_DIM + ACTION_DIM + 2  # columns of the policy's mean and log-std in the step features
    head = loss_params["params"]["Dense_1"]["kernel"]  # [D + context, 16]: step features then context
    cut = jax.tree.map(lambda x: x, loss_params)
    cut["params"]["Dense_1"]["kernel"] = head.at[first : first + 2 * ACTION_DIM].set(0.0)
    grads = jax.grad(loss_value, argnums=1)(cut, agent, buffer, NEWEST)
    assert float(jnp.abs(grads["policy"]["params"]["Dense_2"]["kernel"]).sum()) > 0.0
    assert float(jnp.abs(grads["log_std"]).sum()) > 0.0


def test_reward_blind_loss_ignores_the_reward(unit):
    agent, loss_params, buffer = unit
    changed = buffer._replace(reward=buffer.reward + 3.0)
    inputs = epg.loss_inputs(agent, buffer, *stats(), reward_blind=True)
    assert float(jnp.abs(inputs[:, OBS_DIM + ACTION_DIM]).max()) == 0.0  # the reward column
    for blind, same in ((True, True), (False, False)):
        a, b = (float(loss_value(loss_params, agent, x, NEWEST, blind)) for x in (buffer, changed))
        assert (a == b) == same, blind


def test_goal_point_ppo_lifetime_learns_and_a_zero_loss_moves_nothing(env):
    """α = 1 is PPO: in a 2,048-step goal-point lifetime the return rises above any the initial policy gets.
    α = 0 with a zero loss: no parameter moves. (That learning rate and epochs are read at run time too: the --test
    sweep's four settings, one compiled function, give four scores.)"""
    n = ARGS.num_eval_tasks
    run = epg.make_runner(ARGS, env)  # the meta-training evaluation's function
    tasks = epg.sample_tasks("goal-point", jax.random.PRNGKey(0), n, False)
    keys = jax.random.split(jax.random.PRNGKey(1), n)
    zero = jnp.zeros_like(jax.flatten_util.ravel_pytree(epg.loss_template(ARGS, env))[0])
    ppo, still = (run(zero, tasks, keys, epg.InnerSettings.of(ARGS, alpha)) for alpha in (1.0, 0.0))
    late, before = np.nanmean(np.asarray(ppo.curve)[:, -8:]), np.nanmean(np.asarray(still.curve))
    assert late > before + 2.0, (late, before)
    assert float(ppo.final_return.mean()) > float(still.final_return.mean()) + 2.0
    untouched = jax.vmap(lambda k: epg.init_agent(jax.random.split(k, 3)[0], ARGS, OBS_DIM, ACTION_DIM))(keys)
    for a, b in zip(jax.tree.leaves(still.agent), jax.tree.leaves(untouched)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)  # jit vs eager rounding


def test_fitness_is_scored_on_fresh_episodes_after_the_lifetime():
    """A lifetime shorter than one episode finishes no episode of its own (its curve is all NaN), yet its fitness is
    the finite return of --num-eval-episodes episodes that the final policy runs afterwards (rollout.py:66-77)."""
    short = dataclasses.replace(ARGS, lifetime=64, episode_length=100, num_eval_episodes=2)
    env = epg.make_task_env(short)
    tasks = epg.sample_tasks("goal-point", jax.random.PRNGKey(0), 2, False)
    out = epg.make_runner(short, env)(
        jnp.zeros(epg.ravel_pytree(epg.loss_template(short, env))[0].shape),
        tasks,
        jax.random.split(jax.random.PRNGKey(1), 2),
        epg.InnerSettings.of(short, 1.0),
    )
    assert np.isnan(np.asarray(out.curve)).all() and np.isfinite(np.asarray(out.final_return)).all()
    assert float(jnp.abs(out.final_return[0] - out.final_return[1])) > 0.0  # two goals, two scores


def test_goal_point_reward_is_progress_towards_the_goal():
    env = epg.GoalPointEnv(50)
    task = {"goal": jnp.array([1.0, 0.0])}
    obs, state = env.reset(jax.random.PRNGKey(0), task)
    total = 0.0
    for _ in range(49):
        obs, state, reward, terminated, truncated, _ = env.step(
            jax.random.PRNGKey(1), state, jnp.array([5.0, 0.0]), task
        )
        total += float(reward)
        assert float(truncated) == 0.0 and float(terminated) == 0.0
    assert abs(float(obs[2]) - 1.0) < 0.01  # the force is clipped to 1: top speed 1 m/s
    start = np.asarray(env.reset(jax.random.PRNGKey(0), task)[0][:2])
    progress = np.linalg.norm([1.0, 0.0] - start) - np.linalg.norm([1.0, 0.0] - np.asarray(obs[:2]))
    np.testing.assert_allclose(total, progress / env.DT, rtol=1e-4, atol=1e-3)
    obs, state, reward, terminated, truncated, final_obs = env.step(jax.random.PRNGKey(1), state, jnp.zeros(2), task)
    assert float(truncated) == 1.0 and float(jnp.abs(obs[2:]).sum()) == 0.0 and float(final_obs[2]) > 0.5


def test_generation_shares_tasks_and_seeds_across_the_population(env):
    """At α = 1 the loss is unused, so members meeting the same tasks and seeds get identical returns. (At α = 0
    the perturbed losses differ, and so do the returns: the meta-training test's second generation.)"""
    theta = jax.flatten_util.ravel_pytree(epg.loss_template(ARGS, env))[0]
    generation = epg.make_generation(ARGS, env)  # the meta-training test's function
    opt_state = epg.make_es_optimizer(ARGS).init(theta)
    ppo_returns = np.asarray(generation(theta, opt_state, epg.generation_key(ARGS, 0), 1.0)[3])
    assert ppo_returns.shape == (4, 2) and ppo_returns[0, 0] != ppo_returns[0, 1]  # two different tasks
    np.testing.assert_array_equal(ppo_returns, np.broadcast_to(ppo_returns[0], ppo_returns.shape))


@pytest.mark.parametrize("split", ["sides", "sector", "half"])
def test_goal_splits_hold_out_their_test_goals(split):
    """half: right vs left half. sides: the ±y quadrants, equally, so the mean direction is zero (no goal-agnostic
    movement gains); sector: all but the -x quadrant; both test in the -x quadrant."""
    for family, (low, high) in epg.GOAL_RADIUS.items():
        train = np.asarray(epg.sample_tasks(family, jax.random.PRNGKey(0), 4000, False, split=split)["goal"])
        test = np.asarray(epg.sample_tasks(family, jax.random.PRNGKey(0), 4000, True, split=split)["goal"])
        in_test_quadrant = (train[:, 0] < 0) & (np.abs(train[:, 1]) < -train[:, 0])
        direction = (train / np.linalg.norm(train, axis=1, keepdims=True)).mean(axis=0)
        if split == "half":
            assert (train[:, 0] > 0).all() and (test[:, 0] < 0).all()
        else:
            assert not in_test_quadrant.any() and (np.abs(test[:, 1]) < -test[:, 0]).all()
            in_plus_x_quadrant = (train[:, 0] > 0) & (np.abs(train[:, 1]) < train[:, 0])
            assert in_plus_x_quadrant.any() == (split == "sector")
        if split == "sides":
            assert (np.abs(train[:, 1]) > np.abs(train[:, 0])).all() and np.abs(direction).max() < 0.05
        for goals in (train, test):
            radius = np.linalg.norm(goals, axis=1)
            assert radius.min() >= low - 1e-6 and radius.max() <= high + 1e-6
            assert goals[:, 1].min() < -0.5 * low and goals[:, 1].max() > 0.5 * low  # both sides of the x axis


def test_es_gradient_follows_the_fitness():
    """With fitness = <w, ε>, the centered-rank ES direction points along w."""
    w = jax.random.normal(jax.random.PRNGKey(0), (50,))
    eps = epg.mirrored_noise(jax.random.PRNGKey(1), 2000, 50)
    np.testing.assert_array_equal(np.asarray(eps[:1000]), -np.asarray(eps[1000:]))
    g = epg.es_ascent_direction(jnp.zeros(50), eps, eps @ w, weight_decay=0.0)
    assert float(g @ w / (jnp.linalg.norm(g) * jnp.linalg.norm(w))) > 0.9
    shaped = epg.centered_ranks(jnp.array([3.0, jnp.nan, -1.0, jnp.inf * -1, 10.0]))
    assert float(shaped[4]) == 0.5 and float(shaped[1]) == float(shaped[3]) < float(shaped[2])  # NaN, -inf tie last


def read_rows(run_dir):
    with open(os.path.join(run_dir, "generations.csv")) as f:
        return [{k: float(v) for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


TWO_PROCESSES = """
import json, sys
sys.path[:0] = [{root!r}, {tests!r}]
import jax, tyro
from jax.flatten_util import ravel_pytree
import epg, processes
args = tyro.cli(epg.Args)
epg.start_processes(args)
args = epg.resolve_args(args)
built, build = [], epg.make_generation
epg.make_generation = lambda *a: built.append(build(*a)) or built[-1]  # the run's, already compiled
epg.run_meta_training(args)
theta = ravel_pytree(epg.loss_template(args, epg.make_task_env(args)))[0]
opt_state = epg.make_es_optimizer(args).init(theta)
generation = built[0].lower(theta, opt_state, epg.generation_key(args, 0), 0.0)
print(json.dumps([jax.process_count(), jax.device_count(), processes.collectives(generation.compile().as_text())]))
"""


def test_meta_training_run_dir_interrupted_resume_and_two_processes_of_two_devices(tmp_path, monkeypatch):
    """Two generations: the run directory; Ctrl-C then --resume reproduces them; 2 processes of 2 forced host devices
    each (so the population is split over the devices of one process and over processes at once) give the same ES
    means (loss.msgpack, best_loss.msgpack) bit for bit and the logged fitnesses to float32 rounding (a device's
    batch of lifetimes sets the order of XLA's sums); the compiled generation exchanges the returns
    f32[pop, num_tasks] and nothing else."""
    full, interrupted, two = str(tmp_path / "full"), str(tmp_path / "interrupted"), str(tmp_path / "two")
    driver = [sys.executable, "-c", TWO_PROCESSES.format(root=ROOT, tests=os.path.join(ROOT, "tests"))]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    pool = concurrent.futures.ThreadPoolExecutor(1)  # the two processes run while this one runs the others
    launched = pool.submit(processes.launch, driver + FLAGS + ["--run-dir", two], 2, 600, env)
    epg.main(epg_args(FLAGS + ["--run-dir", full]))
    for name in RUN_FILES:
        assert os.path.isfile(os.path.join(full, name)), name
    rows = read_rows(full)
    assert [r["generation"] for r in rows] == [1, 2] and [r["alpha"] for r in rows] == [1.0, 0.0]
    assert all(np.isfinite(r["mean_fitness"]) for r in rows) and np.isfinite(rows[-1]["eval_fitness"])
    assert rows[1]["best_fitness"] > rows[1]["mean_fitness"]  # α = 0: the perturbed losses give different returns
    with open(os.path.join(full, "summary.json")) as f:
        summary = json.load(f)
    assert summary["num_generations"] == 2 and summary["lifetimes_per_minute"] > 0
    # best_loss.msgpack: the evaluated ES mean (generation 2, the only one) scored on tasks drawn for the choice
    assert summary["selected_generation"] == 2 and list(summary["selection_scores"]) == ["2"]
    chosen = epg.load_loss(os.path.join(full, "best_loss.msgpack"), ARGS)[0]
    np.testing.assert_array_equal(
        np.asarray(chosen), np.asarray(epg.load_loss(os.path.join(full, "loss.msgpack"), ARGS)[0])
    )

    # Ctrl-C before generation 2: the finished generation is checkpointed and the exit code is 130
    original = epg.generation_key

    def interrupt_at_second(args, g):
        if g == 1:
            raise KeyboardInterrupt
        return original(args, g)

    monkeypatch.setattr(epg, "generation_key", interrupt_at_second)
    with pytest.raises(SystemExit) as stop:
        epg.main(epg_args(FLAGS + ["--run-dir", interrupted]))
    assert stop.value.code == 130 and len(read_rows(interrupted)) == 1
    monkeypatch.setattr(epg, "generation_key", original)
    epg.main(epg_args(["--resume", interrupted]))
    np.testing.assert_equal(read_rows(interrupted), rows)  # exactly; NaN (not evaluated) equals NaN

    # the population sharded over 2 processes × 2 devices (shard_map) gives the single device's numbers
    results = launched.result()
    pool.shutdown()
    for code, _, err in results:
        assert code == 0, err[-3000:]
    assert "on 4 cpu device(s)" in results[0][1]
    assert json.loads(results[0][1].strip().splitlines()[-1]) == [2, 4, ["f32[4,2]{1,0} all-gather"]]
    assert not (tmp_path / "two" / "summary.json.tmp").exists()
    for name in ("loss.msgpack", "best_loss.msgpack"):
        with open(os.path.join(full, name), "rb") as a, open(os.path.join(two, name), "rb") as b:
            assert a.read() == b.read(), name
    for a, b in zip(rows, read_rows(two), strict=True):
        for k in ("best_fitness", "mean_fitness", "eval_fitness"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6)


def test_test_mode_writes_every_trainer_to_the_summary(tmp_path, env):
    """--test: evolved, reward-ablated evolved, tuned PPO (a sweep of four settings), zero and reward-blind losses
    on the same held-out goals, with FLAGS and the default --ppo-epochs (so the lifetimes compiled for the other
    tests serve every trainer)."""
    theta = jax.flatten_util.ravel_pytree(epg.loss_template(ARGS, env))[0]
    evolved, blind = str(tmp_path / "evolved.msgpack"), str(tmp_path / "blind.msgpack")
    epg.save_loss(evolved, theta + 0.01, ARGS)
    epg.save_loss(blind, theta, dataclasses.replace(ARGS, reward_blind=True))
    run_dir = str(tmp_path / "test")
    epg.main(
        epg_args(
            FLAGS
            + [
                "--test",
                "--load-loss",
                evolved,
                "--load-reward-blind-loss",
                blind,
                "--num-seeds",
                "4",
                "--run-dir",
                run_dir,
                "--ppo-rollouts",
                "64",
                "--ppo-epochs",
                "1",
                "4",
                "--ppo-learning-rates",
                "0.001",
                "0.003",
                "--num-sweep-tasks",
                "4",
            ]
        )
    )
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    expected = {"evolved", "evolved-no-reward", "ppo", "zero", "reward-blind", "reinforce-0.9", "reinforce-0.99"}
    assert set(summary["trainers"]) == expected
    for trainer in summary["trainers"].values():
        for key in ("final_return_mean", "final_return_std", "final_return_iqm", "auc_mean", "auc_std", "auc_iqm"):
            assert np.isfinite(trainer[key]), key
        low, high = trainer["final_return_iqm_ci"]
        assert low <= trainer["final_return_iqm"] <= high
    trainers = summary["trainers"]
    assert trainers["evolved"]["final_returns"] != trainers["zero"]["final_returns"]  # different losses
    # the reward-ablated evolved loss: the same loss and seeds, the reward input zeroed, so other agents
    assert trainers["evolved"]["final_returns"] != trainers["evolved-no-reward"]["final_returns"]
    assert summary["task_family"] == "goal-point" and "-x quadrant" in summary["split"] and summary["lifetime"] == 2048
    sweep, choice = summary["ppo_sweep"], summary["ppo_choice"]
    assert len({row["final_return_mean"] for row in sweep}) == 4  # epochs and learning rate take effect
    best = max(sweep, key=lambda row: row["final_return_mean"])
    assert [best[k] for k in ("rollout", "epochs", "learning_rate")] == list(choice.values())
    assert (np.asarray(summary["tasks"]["goal"])[:, 0] < 0).all()
    assert os.path.isfile(os.path.join(run_dir, "test_curves.png"))


def test_damaged_checkpoint_and_loss_file_are_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "args.json").write_text(json.dumps({"task_family": "goal-point"}))
    (run_dir / "checkpoint.msgpack").write_bytes(b"\x00not a checkpoint")
    (run_dir / "best_loss.msgpack").write_bytes(b"garbage")
    wrong_size = str(tmp_path / "wrong_size.msgpack")  # e.g. a file of an epg.py without --loss-size
    epg.save_loss(wrong_size, jnp.zeros(100), ARGS)
    for flags, expected in [
        (["--resume", str(run_dir)], "damaged checkpoint.msgpack"),
        (["--test", "--load-loss", str(run_dir)], "damaged best_loss.msgpack"),
        (["--test", "--load-loss", wrong_size], "a loss of 100 parameters"),
    ]:
        with pytest.raises(SystemExit) as stop:
            epg.main(epg_args(flags))
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and expected in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--lifetime", "256"], "shorter than the buffer"),
        (["--lifetime", "1000"], "divide --lifetime"),
        (["--pop-size", "7"], "must be even"),
        (["--update-every", "48"], "multiple of --minibatch-size"),
        (["--update-every", "0"], "--update-every 0 must be finite and > 0"),
        (["--test"], "--test needs --load-loss"),
        (["--test", "--load-loss", "/nonexistent/loss.msgpack"], "not found"),
        (["--resume", "/nonexistent/run"], "no readable args.json"),
        (["--loss-size", "linear"], "size of --loss-form pg-weight only"),
        (["--sigma", "inf"], "--sigma inf must be finite and > 0"),
        (["--weight-decay", "nan"], "--weight-decay nan must be finite and >= 0"),
        (["--inner-learning-rate", "-0.001"], "--inner-learning-rate -0.001 must be finite and > 0"),
        (["--ppo-anneal-frac", "1.5"], "--ppo-anneal-frac 1.5 must be finite and in [0, 1]"),
        (["--ppo-learning-rates", "1e-3", "nan"], "--ppo-learning-rates (0.001, nan) must be finite and > 0"),
        (["--memory-units", "-1"], "--memory-units -1 must be finite and >= 0"),
        (["--balanced-tasks", "--goal-split", "half"], "--balanced-tasks needs --goal-split sides"),
    ],
)
def test_bad_input_is_one_line_and_nonzero_exit(flags, expected, capsys):
    with pytest.raises(SystemExit) as stop:
        epg.main(epg_args(flags))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and expected in err and len(err.splitlines()) == 1, err


def test_unknown_task_family_is_refused_by_tyro(capsys):
    with pytest.raises(SystemExit) as stop:
        epg_args(["--task-family", "goal-spider"])
    assert stop.value.code == 2 and "goal-point" in capsys.readouterr().err


def test_ppo_alpha_anneals_to_zero_or_with_fix_ppo_to_one_half():
    """α of (1 - α)·L_φ + α·L_PPO: from 1 to 0 over the first eighth of 160 generations (evolution.py:119); with
    --fix-ppo from 1 to 0.5 over the first sixteenth, then held (evolution.py:115-117)."""
    args = dataclasses.replace(ARGS, num_generations=160)
    assert [epg.ppo_alpha(args, g) for g in (0, 10, 20, 100)] == [1.0, 0.5, 0.0, 0.0]
    fixed = dataclasses.replace(args, fix_ppo=True)
    assert [epg.ppo_alpha(fixed, g) for g in (0, 5, 10, 100)] == [1.0, 0.75, 0.5, 0.5]


def test_a_generation_of_equal_fitness_gives_no_es_step():
    # At α = 1 with common random numbers every member scores the same: the update must not follow the noise.
    eps = epg.mirrored_noise(jax.random.PRNGKey(2), 16, 30)
    theta = jnp.ones(30)
    g = epg.es_ascent_direction(theta, eps, jnp.full(16, 3.8329), weight_decay=1e-3)
    np.testing.assert_allclose(np.asarray(g), -1e-3 * np.asarray(theta), rtol=1e-6)


def test_inner_optimizers_adam_ignores_the_loss_scale_and_sgd_follows_it():
    """--inner-optimizer: Adam's first step is ±lr whatever the gradient's size; SGD's is lr times the gradient."""
    params, lr = {"w": jnp.zeros(3)}, 0.1
    for name in ("adam", "sgd"):
        optimizer = epg.inner_optimizer(dataclasses.replace(ARGS, inner_optimizer=name), lr)
        steps = [
            optimizer.update({"w": scale * jnp.ones(3)}, optimizer.init(params), params)[0]["w"]
            for scale in (1e-3, 1.0)
        ]
        if name == "adam":
            np.testing.assert_allclose(np.asarray(steps[0]), np.asarray(steps[1]), rtol=1e-3)
            np.testing.assert_allclose(np.asarray(steps[1]), -lr, rtol=1e-3)
        else:
            np.testing.assert_allclose(np.asarray(steps[1]), 1000 * np.asarray(steps[0]), rtol=1e-5)
            np.testing.assert_allclose(np.asarray(steps[1]), -lr, rtol=1e-6)


# ---- The pg-weight form: L = -mean w·log π(a|s), w read from stop-gradient reward features.
def pg_buffer(n=8):
    """A small buffer: unfilled first row, an episode ending at row 3, rewards 1..n, random observations/actions."""
    keys = jax.random.split(jax.random.PRNGKey(5), 2)
    return epg.Buffer(
        obs=jax.random.normal(keys[0], (n, OBS_DIM)),
        action=jax.random.normal(keys[1], (n, ACTION_DIM)),
        reward=jnp.arange(1.0, n + 1),
        done=jnp.zeros(n).at[3].set(1.0),
        terminated=jnp.zeros(n),
        final_obs=jnp.zeros((n, OBS_DIM)),
        valid=jnp.ones(n).at[0].set(0.0),
        episode_step=jnp.concatenate([jnp.array([0.0, 0, 1, 2]), jnp.arange(n - 4.0)]),
    )


def reward_to_go(reward, done, gamma):
    out, following = np.zeros(len(reward)), 0.0
    for t in reversed(range(len(reward))):
        following = reward[t] + gamma * (1.0 - done[t]) * following
        out[t] = following
    return out


def test_pg_features_are_z_scored_rewards_to_go_cut_at_episode_ends_and_blind_to_a_zeroed_reward():
    buffer = pg_buffer()
    features = np.asarray(epg.pg_features(buffer, 50))
    reward, done = np.asarray(buffer.reward) * np.asarray(buffer.valid), np.asarray(buffer.done)
    for column, x in enumerate([reward_to_go(reward, done, 0.9), reward_to_go(reward, done, 0.99), reward]):
        filled = x[1:]
        np.testing.assert_allclose(features[1:, column], (filled - filled.mean()) / filled.std(), rtol=1e-5)
    np.testing.assert_allclose(
        features[1:, 3:], np.stack([done[1:], [0, 1, 2, 0, 1, 2, 3] / np.float32(50), np.ones(7)], -1)
    )
    assert not features[0].any()  # the unfilled row
    blind = np.asarray(epg.pg_features(buffer, 50, reward_blind=True))
    assert not blind[:, :3].any() and np.array_equal(blind[:, 3:], features[:, 3:])


def test_pg_weight_loss_gradient_is_the_weighted_score_function_and_reinforce_by_hand(env):
    """With the hand-set weight on the z-scored reward-to-go (γ 0.99), the form's gradient is REINFORCE's,
    -1/B Σ_b w_b·∇log π(a_b|s_b), with w computed here independently; the weights get no gradient."""
    args = dataclasses.replace(ARGS, loss_form="pg-weight", loss_size="linear", episode_length=50)
    buffer, obs_stats = pg_buffer(), epg.Normalizer.init(OBS_DIM)
    agent = epg.init_agent(jax.random.PRNGKey(0), ARGS, OBS_DIM, ACTION_DIM)
    index = jnp.arange(1, 8)
    weights = {"weight": jnp.zeros(6).at[epg.REINFORCE["reinforce-0.99"]].set(1.0)}
    grads = jax.grad(epg.pg_weight_loss, argnums=(0, 1))(weights, agent, buffer, obs_stats, index, args)
    assert not np.asarray(grads[0]["weight"]).any()  # stop-gradient: the loss does not train its own weights
    g = reward_to_go(np.asarray(buffer.reward), np.asarray(buffer.done), 0.99)[1:]
    w = (g - g.mean()) / g.std()

    def by_hand(agent):
        pi = epg.policy_distribution(agent, obs_stats.normalize(buffer.obs[index]))
        return -jnp.mean(w * pi.log_prob(buffer.action[index]))

    for a, b in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(jax.grad(by_hand)(agent))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("size", ["linear", "small"])
def test_pg_weight_start_is_the_zero_loss_and_twins_are_opposite_weights(env, size):
    """θ₀ gives w = 0 everywhere (the zero loss); θ₀ ± σε give opposite weights: exactly for the linear form, to
    first order for the network (the output layer starts at zero), so the antithetic pair differs from the start."""
    args = dataclasses.replace(ARGS, loss_form="pg-weight", loss_size=size, buffer_size=64, episode_length=50)
    theta, unravel = jax.flatten_util.ravel_pytree(epg.loss_template(args, env))
    buffer = pg_buffer(64)
    obs_stats = epg.Normalizer.init(OBS_DIM)
    agent = epg.init_agent(jax.random.PRNGKey(0), ARGS, OBS_DIM, ACTION_DIM)
    index = jnp.arange(32, 64)

    def policy_gradient(theta):  # the loss's gradient on the policy's output layer: linear in the weights w
        grads = jax.grad(epg.pg_weight_loss, argnums=1)(unravel(theta), agent, buffer, obs_stats, index, args)
        return np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads["policy"])])

    assert not policy_gradient(theta).any()
    eps = 1e-3 * jax.random.normal(jax.random.PRNGKey(3), theta.shape)
    plus, minus = policy_gradient(theta + eps), policy_gradient(theta - eps)
    assert np.abs(plus).max() > 0
    assert np.abs(plus + minus).max() <= (1e-6 if size == "linear" else 0.05) * np.abs(plus - minus).max()


def test_balanced_tasks_are_mirror_quartets_of_training_goals():
    goals = np.asarray(epg.sample_tasks("goal-point", jax.random.PRNGKey(0), 8, False, balanced=True)["goal"])
    g = goals[:2]
    np.testing.assert_array_equal(goals[2:], np.concatenate([-g, g * [-1, 1], g * [1, -1]]))
    np.testing.assert_allclose(goals.sum(0), 0.0, atol=1e-6)  # no fixed point gains within the set
    angle_from_y = np.abs(np.arctan2(np.abs(goals[:, 0]), np.abs(goals[:, 1])))
    assert (angle_from_y <= np.pi / 4 + 1e-6).all()  # every mirror stays in the training split (sides)


def test_hand_set_reinforce_in_the_pg_weight_form_learns(env):
    """The form can express learning: REINFORCE (w = the z-scored reward-to-go) ends above the zero loss on 8
    balanced training goals of 2,048-step lifetimes, the same goals and seeds for both."""
    args = dataclasses.replace(
        ARGS, loss_form="pg-weight", loss_size="linear", balanced_tasks=True, num_eval_tasks=8, buffer_size=256
    )
    args = dataclasses.replace(args, update_every=256)
    run = epg.make_runner(args, env)
    tasks, keys = epg.fixed_tasks(args, env, epg.EVAL_STREAM, 8, False)
    settings = epg.InnerSettings.of(args, 0.0)
    reinforce = jnp.zeros(6).at[epg.REINFORCE["reinforce-0.99"]].set(1.0)
    learned, still = (np.asarray(run(w, tasks, keys, settings).final_return) for w in (reinforce, 0 * reinforce))
    assert learned.mean() > still.mean() + 1.5, (learned.mean(), still.mean())


def test_an_occupied_run_dir_is_refused_and_a_diverging_meta_training_stops(tmp_path, capsys):
    """A new run into a directory that holds one: one line pointing to --resume, exit 2. An inner learning rate of
    1e38 makes every member's fitness non-finite: the run stops at generation 1 with one line, exit 2."""
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "summary.json").write_text("{}")
    with pytest.raises(SystemExit) as stop:
        epg.main(epg_args(FLAGS + ["--run-dir", str(tmp_path / "occupied")]))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "--resume" in err and len(err.splitlines()) == 1, err
    with pytest.raises(SystemExit) as stop:
        epg.main(epg_args(FLAGS + ["--inner-learning-rate", "1e38", "--run-dir", str(tmp_path / "inf")]))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "generation 1" in err and "non-finite" in err and len(err.splitlines()) == 1, err
