"""Tests of epg.py: the learned loss, the inner loop, task samplers, meta-training, resume, devices."""

import csv
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
import epg  # noqa: E402

OBS_DIM, ACTION_DIM = 3, 1  # Pendulum-v1


def small_args(**kw) -> epg.Args:
    """CPU-sized settings on the cheap family: buffer 128, an update every 32 steps, minibatches of 16."""
    base = dict(task_family="random-pendulum", lifetime=512, buffer_size=128, update_every=32, minibatch_size=16,
                num_eval_episodes=2, memory_units=8)
    return epg.resolve_args(epg.Args(**{**base, **kw}))


def random_buffer(args: epg.Args, key) -> epg.Buffer:
    n = args.buffer_size
    keys = jax.random.split(key, 3)
    return epg.Buffer(obs=jax.random.normal(keys[0], (n, OBS_DIM)), action=jax.random.normal(keys[1], (n, ACTION_DIM)),
                      reward=jax.random.normal(keys[2], (n,)), done=jnp.zeros(n).at[::50].set(1.0),
                      terminated=jnp.zeros(n), final_obs=jnp.zeros((n, OBS_DIM)), valid=jnp.ones(n))


def loss_value(args, loss_params, agent, buffer, index):
    inputs = epg.loss_inputs(args, agent, buffer, epg.init_running_stats(OBS_DIM))
    return epg.EPGLoss().apply(loss_params, inputs, index)


def test_loss_maps_buffer_to_scalar_with_finite_nonzero_policy_gradient():
    args = small_args()
    agent = epg.init_agent(jax.random.PRNGKey(0), args, OBS_DIM, ACTION_DIM)
    loss_params = epg.init_loss_params(jax.random.PRNGKey(1), args, OBS_DIM, ACTION_DIM)
    buffer, index = random_buffer(args, jax.random.PRNGKey(2)), jnp.arange(96, 112)
    inputs = epg.loss_inputs(args, agent, buffer, epg.init_running_stats(OBS_DIM))
    assert inputs.shape == (args.buffer_size, epg.loss_input_dim(OBS_DIM, ACTION_DIM, args.memory_units))
    value = loss_value(args, loss_params, agent, buffer, index)
    assert value.shape == () and np.isfinite(float(value))
    grads = jax.grad(loss_value, argnums=2)(args, loss_params, agent, buffer, index)
    for part in ("policy", "log_std", "memory"):
        leaves = jax.tree.leaves(grads[part])
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
        assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0.0, part


def test_context_sees_the_whole_buffer():
    args = small_args()
    agent = epg.init_agent(jax.random.PRNGKey(0), args, OBS_DIM, ACTION_DIM)
    loss_params = epg.init_loss_params(jax.random.PRNGKey(1), args, OBS_DIM, ACTION_DIM)
    buffer, index = random_buffer(args, jax.random.PRNGKey(2)), jnp.arange(112, 128)  # the newest steps only
    base = float(loss_value(args, loss_params, agent, buffer, index))
    for row in (0, args.buffer_size // 2):  # the oldest step, and one in the middle: neither is in the minibatch
        changed = buffer._replace(reward=buffer.reward.at[row].add(5.0))
        assert abs(float(loss_value(args, loss_params, agent, changed, index)) - base) > 1e-6, row


def test_gradient_reaches_the_policy_through_the_context_alone():
    """Cut the head's direct connection to the per-step policy outputs: the policy still gets a gradient."""
    args = small_args()
    agent = epg.init_agent(jax.random.PRNGKey(0), args, OBS_DIM, ACTION_DIM)
    loss_params = epg.init_loss_params(jax.random.PRNGKey(1), args, OBS_DIM, ACTION_DIM)
    first = OBS_DIM + ACTION_DIM + 2  # columns of the policy's mean and log-std in the step features
    head = loss_params["params"]["Dense_1"]["kernel"]  # [D + 32, 16]: step features then context
    cut = jax.tree.map(lambda x: x, loss_params)
    cut["params"]["Dense_1"]["kernel"] = head.at[first:first + 2 * ACTION_DIM].set(0.0)
    buffer, index = random_buffer(args, jax.random.PRNGKey(2)), jnp.arange(96, 112)
    grads = jax.grad(loss_value, argnums=2)(args, cut, agent, buffer, index)
    assert float(jnp.abs(grads["policy"]["params"]["Dense_2"]["kernel"]).sum()) > 0.0
    assert float(jnp.abs(grads["log_std"]).sum()) > 0.0


def test_ppo_term_alone_trains_the_agent_and_a_zero_loss_moves_nothing():
    """α = 1 is PPO: over a 32k-step lifetime the return improves. α = 0 with a zero loss: no parameter moves."""
    args = epg.resolve_args(epg.Args(task_family="random-pendulum", lifetime=32768, num_eval_episodes=2))
    zero_loss = jax.tree.map(jnp.zeros_like, epg.loss_template(args))
    tasks = epg.sample_tasks(args.task_family, jax.random.PRNGKey(0), 4, False)
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    run = jax.jit(jax.vmap(jax.vmap(epg.make_lifetime(args), in_axes=(None, 0, 0, None)), in_axes=(None, None, None, 0)))
    out = run(zero_loss, tasks, keys, jnp.array([1.0, 0.0]))
    curve = np.asarray(out.curve[0])  # [tasks, updates]: return of the last finished episode
    quarter = curve.shape[1] // 4
    early, late = np.nanmean(curve[:, :quarter]), np.nanmean(curve[:, -quarter:])
    assert late > early + 150.0, (early, late)
    # α = 0: the final agent is the initial one, which a 512-step lifetime with the same keys also returns
    short = epg.make_lifetime(dataclasses.replace(args, lifetime=512))
    untouched = jax.vmap(short, in_axes=(None, 0, 0, None))(zero_loss, tasks, keys, 0.0).agent
    for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[1], out.agent)), jax.tree.leaves(untouched)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.abs(x[0] - y).max(), out.agent, untouched))
    assert max(float(m) for m in moved) > 1e-3


def test_goal_samplers_split_the_plane_by_halves():
    for family, (low, high) in epg.GOAL_RADIUS.items():
        train = np.asarray(epg.sample_tasks(family, jax.random.PRNGKey(0), 2000, False)["goal"])
        test = np.asarray(epg.sample_tasks(family, jax.random.PRNGKey(0), 2000, True)["goal"])
        assert (train[:, 0] > 0).all() and (test[:, 0] < 0).all()
        for goals in (train, test):
            radius = np.linalg.norm(goals, axis=1)
            assert radius.min() >= low - 1e-6 and radius.max() <= high + 1e-6
            assert goals[:, 1].min() < -0.5 * low and goals[:, 1].max() > 0.5 * low  # both sides of the x axis


def test_directions_cover_both_signs_and_random_parameters_stay_in_range():
    for family in ("dir-hopper", "dir-cheetah"):
        d = np.asarray(epg.sample_tasks(family, jax.random.PRNGKey(3), 1000, False)["direction"])
        assert set(np.unique(d)) == {-1.0, 1.0} and 400 < (d > 0).sum() < 600
    hopper = epg.sample_tasks("random-hopper", jax.random.PRNGKey(4), 500, False, num_links=4, num_geoms=5)
    pendulum = epg.sample_tasks("random-pendulum", jax.random.PRNGKey(5), 500, False)
    assert hopper["mass_scale"].shape == (500, 4) and hopper["friction_scale"].shape == (500, 5, 3)
    for name, values in [("mass_scale", hopper["mass_scale"]), ("friction_scale", hopper["friction_scale"]),
                         ("mass", pendulum["mass"]), ("length", pendulum["length"])]:
        v = np.asarray(values)
        assert v.min() >= epg.SCALE_RANGE[0] and v.max() <= epg.SCALE_RANGE[1] and v.std() > 0.2, name
    for gravity in (hopper["gravity"], pendulum["gravity"]):
        g = np.asarray(gravity)
        assert g.min() >= epg.GRAVITY_RANGE[0] and g.max() <= epg.GRAVITY_RANGE[1] and g.std() > 2.0


def test_es_gradient_follows_the_fitness():
    """With fitness = <w, ε>, the centered-rank ES direction points along w."""
    w = jax.random.normal(jax.random.PRNGKey(0), (50,))
    eps = epg.antithetic_noise(jax.random.PRNGKey(1), 2000, 50)
    np.testing.assert_array_equal(np.asarray(eps[:1000]), -np.asarray(eps[1000:]))
    g = epg.es_gradient(jnp.zeros(50), eps, eps @ w, sigma=0.1, weight_decay=0.0)
    assert float(g @ w / (jnp.linalg.norm(g) * jnp.linalg.norm(w))) > 0.9
    shaped = epg.centered_ranks(jnp.array([3.0, jnp.nan, -1.0, jnp.inf * -1, 10.0]))
    assert float(shaped[4]) == 0.5 and float(shaped.min()) == -0.5 and float(shaped[1]) < float(shaped[2])


TINY = ["--task-family", "random-pendulum", "--lifetime", "256", "--buffer-size", "64", "--update-every", "32",
        "--minibatch-size", "16", "--pop-size", "4", "--num-tasks", "2", "--num-eval-episodes", "1",
        "--eval-every", "1", "--num-eval-tasks", "2", "--save-every", "1", "--memory-units", "4"]
RUN_FILES = ("args.json", "generations.csv", "checkpoint.msgpack", "loss.msgpack", "best_loss.msgpack",
             "fitness_curve.png", "summary.json")


def read_rows(run_dir):
    with open(os.path.join(run_dir, "generations.csv")) as f:
        return [{k: float(v) for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def run_cli(flags, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "epg.py")] + flags, capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


def test_meta_training_run_dir_interrupted_resume_and_two_devices(tmp_path, monkeypatch):
    """Two generations: the run directory; Ctrl-C then --resume reproduces them; 2 forced host devices agree."""
    full, interrupted, sharded = str(tmp_path / "full"), str(tmp_path / "interrupted"), str(tmp_path / "sharded")
    epg.main(epg_args(TINY + ["--num-generations", "2", "--run-dir", full]))
    for name in RUN_FILES:
        assert os.path.isfile(os.path.join(full, name)), name
    rows = read_rows(full)
    assert [r["generation"] for r in rows] == [1, 2] and [r["alpha"] for r in rows] == [1.0, 0.0]
    assert all(np.isfinite(r["mean_fitness"]) and np.isfinite(r["eval_fitness"]) for r in rows)
    with open(os.path.join(full, "summary.json")) as f:
        summary = json.load(f)
    assert summary["num_generations"] == 2 and summary["lifetimes_per_minute"] > 0

    # Ctrl-C before generation 2: the finished generation is checkpointed and the exit code is 130
    original = epg.generation_key

    def interrupt_at_second(args, g):
        if g == 1:
            raise KeyboardInterrupt
        return original(args, g)

    monkeypatch.setattr(epg, "generation_key", interrupt_at_second)
    with pytest.raises(SystemExit) as stop:
        epg.main(epg_args(TINY + ["--num-generations", "2", "--run-dir", interrupted]))
    assert stop.value.code == 130 and len(read_rows(interrupted)) == 1
    monkeypatch.setattr(epg, "generation_key", original)
    epg.main(epg_args(["--resume", interrupted]))
    assert read_rows(interrupted) == rows

    # the population sharded over 2 devices (shard_map) gives the single device's numbers
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    result = run_cli(TINY + ["--num-generations", "2", "--run-dir", sharded], env=env)
    assert result.returncode == 0, result.stderr
    assert "on 2 cpu device(s)" in result.stdout
    for a, b in zip(rows, read_rows(sharded)):
        for k in ("best_fitness", "mean_fitness", "eval_fitness"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4)


def test_test_mode_compares_evolved_loss_with_ppo(tmp_path):
    loss_file = str(tmp_path / "loss.msgpack")
    args = epg.resolve_args(epg.Args(task_family="random-pendulum", lifetime=256, buffer_size=64, update_every=32,
                                     minibatch_size=16, memory_units=4))
    epg.save_loss(loss_file, jax.flatten_util.ravel_pytree(epg.loss_template(args))[0], args)
    run_dir = str(tmp_path / "test")
    result = run_cli(["--test", "--load-loss", loss_file, "--num-seeds", "2", "--run-dir", run_dir] + TINY[:10]
                     + ["--num-eval-episodes", "1"])
    assert result.returncode == 0, result.stderr
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    for name in ("EPG", "PPO"):
        assert len(summary[name]["final_returns"]) == 2 and np.isfinite(summary[name]["final_return_mean"])
    assert os.path.isfile(os.path.join(run_dir, "test_curves.png"))
    assert np.asarray(summary["tasks"]["mass"]).shape == (2,)  # one held-out task per agent, shared by both methods


def test_damaged_checkpoint_and_loss_file_are_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "args.json").write_text(json.dumps({"task_family": "random-pendulum"}))
    (run_dir / "checkpoint.msgpack").write_bytes(b"\x00not a checkpoint")
    (run_dir / "best_loss.msgpack").write_bytes(b"garbage")
    for flags, expected in [(["--resume", str(run_dir)], "damaged checkpoint"),
                            (["--test", "--load-loss", str(run_dir), "--task-family", "random-pendulum"], "damaged loss file")]:
        with pytest.raises(SystemExit) as stop:
            epg.main(epg_args(flags))
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and expected in err and len(err.splitlines()) == 1, err


def epg_args(flags):
    return tyro.cli(epg.Args, args=flags)


@pytest.mark.parametrize("flags, expected", [
    (["--task-family", "goal-spider"], "unknown --task-family"),
    (["--task-family", "random-pendulum", "--lifetime", "256"], "shorter than the buffer"),
    (["--task-family", "random-pendulum", "--lifetime", "1000"], "not a multiple of --update-every"),
    (["--task-family", "random-pendulum", "--pop-size", "7"], "must be even"),
    (["--task-family", "random-pendulum", "--update-every", "48"], "not a multiple of --minibatch-size"),
    (["--task-family", "random-pendulum", "--test"], "--test needs --load-loss"),
    (["--task-family", "random-pendulum", "--test", "--load-loss", "/nonexistent/loss.msgpack"], "not found"),
    (["--resume", "/nonexistent/run"], "args.json not found"),
])
def test_bad_input_is_one_line_and_nonzero_exit(flags, expected, capsys):
    with pytest.raises(SystemExit) as stop:
        epg.main(epg_args(flags))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and expected in err and len(err.splitlines()) == 1, err
