"""Tests of dpo.py.

Unit tests of the method and of the choices taken from Brax PPO: the drifts' validity (Lu et al. 2022,
Appendix D) and closed forms, GAE against a plain loop, the tanh-squashed Gaussian's log-probability against a
numerical change of variables, Brax's optimiser without clipping, reacher's update count. Behavioural tests:
PPO and DPO learn CartPole-v1 and Pendulum-v1 (squashed policy); chunks of updates compose exactly; a seed
reproduces its numbers. CLI tests: run directories for a Brax, a MinAtar and a continuous gymnax env; a run
killed with SIGKILL and resumed ends with the numbers of an uninterrupted run; seeds sharded over two devices give
one device's numbers to float rounding; the same command gives the same numbers in a process with one and with two
CPU devices (one device unless --num-cpu-devices asks for more); bad input gives one line and a non-zero exit.
"""

import csv
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dpo  # noqa: E402

# A dense grid over the (ratio, advantage) plane, away from r = 0 where log r is undefined.
RATIOS = jnp.linspace(0.05, 3.0, 301)
ADVANTAGES = jnp.linspace(-3.0, 3.0, 121)
R_GRID, A_GRID = jnp.meshgrid(RATIOS, ADVANTAGES, indexing="ij")


def in_ratio(drift):
    """The drift as a function of the ratio r itself (the scripts' drifts take log r)."""

    def f(r, a):
        return drift(jnp.log(r), a)

    return f


DRIFTS = {"dpo": in_ratio(dpo.dpo_drift), "ppo": in_ratio(dpo.ppo_drift)}


@pytest.mark.parametrize("name", DRIFTS)
def test_drift_is_non_negative_on_grid(name):
    f = DRIFTS[name](R_GRID, A_GRID)
    assert bool(jnp.all(f >= 0.0))
    assert float(f.max()) > 0.0  # and not identically zero


@pytest.mark.parametrize("name", DRIFTS)
def test_drift_and_its_ratio_gradient_vanish_at_ratio_one(name):
    drift = DRIFTS[name]
    np.testing.assert_array_equal(np.asarray(drift(jnp.ones_like(ADVANTAGES), ADVANTAGES)), 0.0)
    d_dr = jax.vmap(jax.grad(drift, argnums=0))(jnp.ones_like(ADVANTAGES), ADVANTAGES)
    np.testing.assert_allclose(np.asarray(d_dr), 0.0, atol=1e-6)


def test_dpo_drift_matches_equation_9_at_given_points():
    def eq9(r, a, alpha=2.0, beta=0.6):
        x = (r - 1) * a if a >= 0 else math.log(r) * a
        c = alpha if a >= 0 else beta
        return max(0.0, x - c * math.tanh(x / c))

    for r, a in [(1.5, 1.0), (3.0, 2.0), (0.5, 1.0), (0.5, -1.0), (0.2, -2.5), (1.8, -1.0), (1.0, 0.7), (2.2, 0.0)]:
        assert float(DRIFTS["dpo"](jnp.float32(r), jnp.float32(a))) == pytest.approx(eq9(r, a), abs=1e-6)
    # Hand-worked values: (r=1.5, A=1) -> 0.5 - 2·tanh(0.25); (r=0.5, A=-1) -> ln 2 - 0.6·tanh(ln 2 / 0.6).
    assert float(DRIFTS["dpo"](jnp.float32(1.5), jnp.float32(1.0))) == pytest.approx(0.0101627, abs=1e-6)
    assert float(DRIFTS["dpo"](jnp.float32(0.5), jnp.float32(-1.0))) == pytest.approx(0.2014566, abs=1e-6)
    half = dpo.dpo_drift(jnp.log(jnp.float32(1.5)), jnp.float32(1.0), alpha=0.5)
    assert float(half) == pytest.approx(eq9(1.5, 1.0, 0.5), abs=1e-6)


def test_ppo_drift_makes_the_objective_ppo_clip():
    eps = 0.2
    loss_per_point = jax.vmap(lambda r, a: dpo.actor_loss(jnp.log(r[None]), a[None], dpo.ppo_drift))
    ours = loss_per_point(R_GRID.ravel(), A_GRID.ravel())
    clipped = -jnp.minimum(R_GRID * A_GRID, jnp.clip(R_GRID, 1 - eps, 1 + eps) * A_GRID).ravel()
    np.testing.assert_allclose(np.asarray(ours), np.asarray(clipped), atol=1e-6)


def test_dpo_objective_rolls_back_where_ppo_is_flat():
    # For A < 0 and r < 1 - ε PPO's loss is flat in r; DPO's pushes r back up towards 1:
    # ∂L/∂r = -A + ∂f/∂r = 1 - 2·(1 - sech²(ln 2 / 0.6)) ≈ -0.34 < 0, so gradient descent raises r.
    grad_loss = jax.grad(lambda r, a, d: dpo.actor_loss(jnp.log(r[None]), a[None], d))
    r, a = jnp.float32(0.5), jnp.float32(-1.0)
    assert float(grad_loss(r, a, dpo.ppo_drift)) == 0.0
    expected = 1.0 - 2.0 * (1.0 - 1.0 / math.cosh(math.log(2.0) / 0.6) ** 2)
    assert float(grad_loss(r, a, dpo.dpo_drift)) == pytest.approx(expected, abs=1e-5) and expected < 0.0


def test_gae_matches_brax_formula_written_as_a_plain_loop():
    rng = np.random.default_rng(0)
    T, B, gamma, lam = 24, 5, 0.97, 0.95
    rewards, values, bootstrap = rng.normal(size=(T, B)), rng.normal(size=(T, B)), rng.normal(size=B)
    terminated = (rng.random((T, B)) < 0.1).astype(float)
    truncated = ((rng.random((T, B)) < 0.1) & (terminated == 0)).astype(float)
    assert terminated.any() and truncated.any()
    next_v = np.concatenate([values[1:], bootstrap[None]])
    vs, acc = np.zeros((T, B)), np.zeros(B)
    for t in reversed(range(T)):
        delta = (rewards[t] + gamma * (1 - terminated[t]) * next_v[t] - values[t]) * (1 - truncated[t])
        acc = delta + gamma * lam * (1 - terminated[t]) * (1 - truncated[t]) * acc
        vs[t] = values[t] + acc
    next_vs = np.concatenate([vs[1:], bootstrap[None]])
    expected_adv = (rewards + gamma * (1 - terminated) * next_vs - values) * (1 - truncated)
    targets, adv, _ = dpo.compute_gae(
        *(jnp.asarray(x, jnp.float32) for x in (rewards, values, bootstrap, terminated, truncated)),
        gamma=gamma,
        gae_lambda=lam,
    )
    np.testing.assert_allclose(np.asarray(targets), vs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(adv), expected_adv, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[truncated > 0] == 0.0)  # a time-limit step gets no advantage


def test_purejaxrl_gae_matches_its_formula_written_as_a_plain_loop():
    rng = np.random.default_rng(1)
    T, B, gamma, lam = 24, 5, 0.99, 0.95
    rewards, values, bootstrap = rng.normal(size=(T, B)), rng.normal(size=(T, B)), rng.normal(size=B)
    done = (rng.random((T, B)) < 0.15).astype(float)
    assert done.any()
    adv, acc, next_value = np.zeros((T, B)), np.zeros(B), bootstrap
    for t in reversed(range(T)):  # purejaxrl/ppo.py's _get_advantages, one step at a time
        delta = rewards[t] + gamma * next_value * (1 - done[t]) - values[t]
        acc = delta + gamma * lam * (1 - done[t]) * acc
        adv[t], next_value = acc, values[t]
    targets, _, ours = dpo.compute_gae(  # every episode end terminal, no truncation: as the purejaxrl loop calls it
        *(jnp.asarray(x, jnp.float32) for x in (rewards, values, bootstrap, done, 0 * done)),
        gamma=gamma,
        gae_lambda=lam,
    )
    np.testing.assert_allclose(np.asarray(ours), adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(targets), adv + values, rtol=1e-5, atol=1e-5)
    # an episode end (a time limit too) is terminal: its advantage is r - V, with no bootstrap or trace
    np.testing.assert_allclose(np.asarray(ours)[done > 0], (rewards - values)[done > 0], rtol=1e-5, atol=1e-5)


def test_each_family_runs_its_own_ppo_loop():
    ant, cartpole = (dpo.resolve_args(dpo.Args(env_id=e)) for e in ("ant", "CartPole-v1"))
    assert (ant.ppo_loop, ant.num_unrolls, ant.num_steps) == ("brax", 16, 5)
    assert (cartpole.ppo_loop, cartpole.num_unrolls, cartpole.num_steps, cartpole.num_envs) == ("purejaxrl", 1, 128, 4)
    # PureJaxRL's learning rate: linear to 0 over the updates, constant within one (ppo.py lines 73-79)
    args = dataclasses.replace(cartpole, max_grad_norm=0.0)
    tx = dpo.make_optimizer(args)
    grads = jnp.ones(3)
    state = tx.init(grads)
    steps = []
    for _ in range(args.update_epochs * args.num_minibatches + 1):
        updates, state = tx.update(grads, state)
        steps.append(float(-updates[0]))
    n = dpo.num_updates(args)
    assert steps[0] == pytest.approx(args.learning_rate, rel=1e-3)  # Adam's first step is lr·sign(g)
    assert steps[-2] == pytest.approx(steps[0], rel=1e-3)  # the whole first update at the full rate
    assert steps[-1] == pytest.approx(args.learning_rate * (1 - 1 / n), rel=1e-3)
    # Brax's normaliser (v0.0.11): variance clipped to [1e-6, 1e6], normalised observations to ±5
    stats = dpo.RunningStats(jnp.zeros(2), jnp.array([1e-9, 4.0]), 10.0)
    np.testing.assert_allclose(dpo.normalize(jnp.array([1e-4, 40.0]), stats, True), [0.1, 5.0], rtol=1e-5)


def test_seed_statistics_use_the_sample_std_and_bootstrap_the_iqm():
    x = np.array([1.0, 2.0, 3.0, 4.0, 100.0, 5.0, 6.0, 7.0])
    stats = dpo.seed_statistics(x, "final_return")
    assert stats["final_return_std"] == pytest.approx(np.std(x, ddof=1))
    assert stats["final_return_iqm"] == pytest.approx(np.mean(np.sort(x)[2:6]))  # the middle half
    low, high = stats["final_return_iqm_ci"]
    assert low < stats["final_return_iqm"] < high < 100.0
    assert dpo.seed_statistics([3.0], "r") == dict(r_mean=3.0, r_std=0.0, r_iqm=3.0, r_iqm_ci=[3.0, 3.0], rs=[3.0])


def test_squashed_gaussian_log_prob_is_a_change_of_variables():
    loc, scale = jnp.array([0.3, -1.2]), jnp.array([0.5, 1.5])
    pi = dpo.TanhGaussian(loc, scale)
    a = jnp.linspace(-0.99, 0.99, 4001)
    u = jnp.arctanh(a)
    # Density of a = tanh(u) per dimension: N(u; loc, σ) · |du/da|, the derivative taken numerically.
    h = 1e-4
    du_da = (np.arctanh(np.asarray(a, np.float64) + h) - np.arctanh(np.asarray(a, np.float64) - h)) / (2 * h)
    for d in range(2):
        normal = np.exp(-0.5 * ((np.asarray(u) - float(loc[d])) / float(scale[d])) ** 2) / (
            float(scale[d]) * math.sqrt(2 * math.pi)
        )
        expected = np.log(normal * du_da)
        one_dim = dpo.TanhGaussian(loc[d : d + 1], scale[d : d + 1])
        ours = np.asarray(jax.vmap(lambda x, dist=one_dim: dist.log_prob(x[None]))(u))
        np.testing.assert_allclose(ours, expected, rtol=1e-3, atol=1e-3)
        # Its mass on [-0.99, 0.99] is the Gaussian's mass of u on [-atanh 0.99, atanh 0.99].
        edge = (
            (math.atanh(0.99) - float(loc[d])) / float(scale[d]),
            (-math.atanh(0.99) - float(loc[d])) / float(scale[d]),
        )
        mass = 0.5 * (math.erf(edge[0] / math.sqrt(2)) - math.erf(edge[1] / math.sqrt(2)))
        assert np.trapezoid(np.exp(ours), np.asarray(a)) == pytest.approx(mass, abs=2e-3)
    # The joint log-probability sums the dimensions; the env action is tanh(u) scaled to the bounds.
    x = jnp.array([0.1, -0.4])
    assert float(pi.log_prob(x)) == pytest.approx(
        float(sum(dpo.TanhGaussian(loc[d : d + 1], scale[d : d + 1]).log_prob(x[d : d + 1]) for d in range(2))),
        abs=1e-5,
    )
    np.testing.assert_allclose(np.asarray(pi.env_action(x, -2.0, 2.0)), 2.0 * np.tanh(np.asarray(x)), rtol=1e-6)
    # The entropy is Brax's one-sample estimate: its mean over samples is the entropy of tanh(u).
    estimates = jax.vmap(pi.entropy)(jax.random.normal(jax.random.PRNGKey(0), (20000, 2)))
    samples = jax.vmap(pi.sample)(jax.random.split(jax.random.PRNGKey(1), 20000))
    monte_carlo = -float(jnp.mean(jax.vmap(pi.log_prob)(samples)))
    assert float(estimates.mean()) == pytest.approx(monte_carlo, abs=0.05)


def test_brax_optimiser_does_not_clip_and_gymnax_does():
    # A critic-sized gradient beside a tiny actor gradient: a global-norm clip shrinks the actor's step below
    # Adam's ε (the problem on ant with rewards ×10); without the clip Adam's first step is lr·sign(g).
    grads = {"actor": jnp.full(4, 1e-4), "critic": jnp.full(4, 1e3)}
    for env_id, clipped in (("ant", False), ("CartPole-v1", True)):
        args = dpo.resolve_args(dpo.Args(env_id=env_id, anneal_lr=False))
        tx = dpo.make_optimizer(args)
        updates, _ = tx.update(grads, tx.init(grads))
        actor_step = float(jnp.abs(updates["actor"]).max())
        if clipped:
            assert actor_step < 0.1 * args.learning_rate
        else:
            assert actor_step == pytest.approx(args.learning_rate, rel=1e-3)


def test_update_counts_follow_the_authors_budget():
    # n = total_timesteps // (num_envs · num_unrolls · num_steps · action_repeat), run by the authors' loop as
    # (log_frequency + 1) × (n // log_frequency): ant n = 30M / 163,840 = 183 -> 21 × 9 = 189; reacher
    # n = 100M / (2048 · 4 · 50 · 4) = 61 (a quarter of what ignoring the action repeat gives) -> 21 × 3 = 63.
    ant = dpo.resolve_args(dpo.Args(env_id="ant"))
    assert ant.log_frequency == 20 and dpo.num_updates(ant) == 21 * (30_000_000 // 163_840 // 20) == 189
    assert dpo.num_updates(dataclasses.replace(ant, log_frequency=0)) == 183
    reacher = dpo.resolve_args(dpo.Args(env_id="reacher"))
    assert reacher.action_repeat == 4 and dpo.num_updates(reacher) == 63
    # fewer updates than log_frequency: the budget's own count (a short CPU run is not stretched)
    assert dpo.num_updates(dataclasses.replace(ant, total_timesteps=10 * 163_840)) == 10
    # gymnax: PureJaxRL's count, total_timesteps // (num_envs · num_steps) = 500k / 512
    assert dpo.num_updates(dpo.resolve_args(dpo.Args(env_id="CartPole-v1"))) == 976


# ---------------------------------------------------------------------------------------------------------------
# Learning on CPU
# ---------------------------------------------------------------------------------------------------------------
def train_and_evaluate(args):
    init, train_chunk = dpo.make_train(args, dpo.make_drift(args))
    runners = dpo.init_seeds(init, dpo.seed_keys(args)[0])
    chunk = jax.jit(jax.vmap(train_chunk, in_axes=(0, None)))
    curves = []
    for _ in range(math.ceil(dpo.num_updates(args) / dpo.max_chunk(args))):
        n = min(dpo.max_chunk(args), dpo.num_updates(args) - int(runners.update[0]))
        runners, metrics = chunk(runners, n)
        curves.append(np.asarray(metrics["episodic_return"])[:, :n])
    returns = dpo.evaluate_seeds(args, runners.train_state.params, runners.obs_stats)
    return runners, np.concatenate(curves, axis=1), returns


@pytest.mark.parametrize("drift", ["dpo", "ppo"])
def test_cartpole_learns(drift):
    args = dpo.resolve_args(
        dpo.Args(
            env_id="CartPole-v1",
            drift=drift,
            num_seeds=4,
            total_timesteps=300_000,
            num_envs=8,
            num_steps=16,
            learning_rate=5e-4,
            num_eval_envs=16,
        )
    )
    _, _, returns = train_and_evaluate(args)
    # A random policy averages about 22 on CartPole-v1; 400 with sampled actions needs a policy that balances.
    assert returns["final_return_mean"] >= 400, returns


def test_pendulum_learns_with_the_squashed_policy():
    args = dpo.resolve_args(dpo.Args(env_id="Pendulum-v1", num_seeds=2, total_timesteps=150_000, num_eval_envs=16))
    _, curve, returns = train_and_evaluate(args)
    # Random torques on Pendulum-v1 return about -1200; swinging up and holding is above -600.
    assert returns["final_return_mean"] > -600, returns
    finite = curve[:, np.all(np.isfinite(curve), axis=0)].mean(0)  # NaN until both seeds finished an episode
    assert finite[-5:].mean() > finite[:5].mean() + 300, finite


def test_chunks_compose_exactly_and_a_seed_reproduces():
    args = dpo.resolve_args(dpo.Args(env_id="CartPole-v1", num_seeds=2, total_timesteps=12 * 512))
    init, train_chunk = dpo.make_train(args, dpo.make_drift(args))
    keys = dpo.seed_keys(args)[0]
    chunk = jax.jit(jax.vmap(train_chunk, in_axes=(0, None)))
    whole, _ = chunk(dpo.init_seeds(init, keys), 6)
    halves, _ = chunk(chunk(dpo.init_seeds(init, keys), 2)[0], 4)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(halves)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(whole.update[0]) == 6
    other, _ = chunk(dpo.init_seeds(init, dpo.seed_keys(dataclasses.replace(args, seed=2))[0]), 6)
    assert not np.array_equal(np.asarray(other.obs), np.asarray(whole.obs))


# ---------------------------------------------------------------------------------------------------------------
# The CLI: run directory, reload, resume, devices, errors
# ---------------------------------------------------------------------------------------------------------------
RUN_FILES = (
    "args.json",
    "metrics.csv",
    "learning_curve.png",
    "params.msgpack",
    "checkpoint.msgpack",
    "summary.json",
)


def run_cli(*flags, check=True, env=None):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "dpo.py"), *flags],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
        env=env,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def read_summary(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def read_args(run_dir):
    with open(os.path.join(run_dir, "args.json")) as f:
        return json.load(f)


@pytest.mark.parametrize(
    "env_flags",
    [
        (
            "--env-id",
            "ant",
            "--num-envs",
            "16",
            "--num-unrolls",
            "2",
            "--num-minibatches",
            "4",
            "--total-timesteps",
            "480",
            "--episode-length",
            "50",
            "--num-seeds",
            "1",
        ),
        ("--env-id", "Breakout-MinAtar", "--num-envs", "8", "--num-steps", "16", "--total-timesteps", "512"),
        ("--env-id", "Pendulum-v1", "--num-envs", "4", "--num-steps", "32", "--total-timesteps", "1024"),
    ],
    ids=["brax-ant-one-seed", "minatar-breakout", "pendulum"],
)
def test_cli_writes_its_run_dir(tmp_path, env_flags):
    run_dir = str(tmp_path / "run")
    proc = run_cli("--num-seeds", "2", *env_flags, "--num-eval-envs", "4", "--run-dir", run_dir)
    assert proc.stdout.strip().splitlines()[-1] == f"run directory: {run_dir}"
    for name in RUN_FILES:
        assert os.path.getsize(os.path.join(run_dir, name)) > 0, name
    summary = read_summary(run_dir)
    seeds = 1 if env_flags[1] == "ant" else 2
    assert summary["env_id"] == env_flags[1] and len(summary["final_returns"]) == seeds
    # one CPU device by default, whatever the machine's cores (use_cpu_cores); the count is recorded for --resume
    assert summary["device"] == "1 x cpu" and read_args(run_dir)["num_cpu_devices"] == 1
    assert all(math.isfinite(summary[k]) for k in ("final_return_mean", "final_return_iqm"))
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) * int(rows[0]["global_step"]) == summary["total_timesteps"]
    assert all(0.0 <= float(r["clip_fraction"]) <= 1.0 for r in rows)  # share of samples with |r - 1| > ε
    # the saved policies reload from Python into make_train's shapes (load_tree's docstring says how)
    args = dpo.resolve_args(dpo.resumed_args(dpo.Args(resume=run_dir)))
    template = jax.eval_shape(jax.vmap(dpo.make_train(args, dpo.make_drift(args))[0]), dpo.seed_keys(args)[0])
    params, _ = dpo.load_tree(
        os.path.join(run_dir, "params.msgpack"), (template.train_state.params, template.obs_stats)
    )
    assert jax.tree.structure(params) == jax.tree.structure(template.train_state.params)


def test_killed_run_resumes_to_the_uninterrupted_numbers(tmp_path):
    flags = ["--env-id", "CartPole-v1", "--num-seeds", "2", "--total-timesteps", "60000", "--num-eval-envs", "4"]
    whole = str(tmp_path / "whole")
    run_cli(*flags, "--run-dir", whole)
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "dpo.py"), *flags, "--run-dir", killed],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    for line in proc.stdout:  # kill it as soon as it reports its second chunk of updates
        if line.startswith("update ") and not line.startswith("update 1/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(killed, "summary.json"))  # it really was cut short
    run_cli("--resume", killed)
    assert read_summary(killed)["final_returns"] == read_summary(whole)["final_returns"]
    with (
        open(os.path.join(whole, "params.msgpack"), "rb") as a,
        open(os.path.join(killed, "params.msgpack"), "rb") as b,
    ):
        assert a.read() == b.read()
    columns = [f for f in dpo.FIELDS if f != "sps"]
    with open(os.path.join(whole, "metrics.csv")) as a, open(os.path.join(killed, "metrics.csv")) as b:
        assert [[r[k] for k in columns] for r in csv.DictReader(a)] == [
            [r[k] for k in columns] for r in csv.DictReader(b)
        ]
    # the resumed run's training time counts the killed session's updates too (each row's seconds from its speed)
    with open(os.path.join(killed, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    steps_per_update = int(rows[0]["global_step"])
    seconds = sum(steps_per_update * 2 / float(r["sps"]) for r in rows)
    summary = read_summary(killed)
    assert summary["train_seconds"] == pytest.approx(seconds, rel=1e-6)
    assert summary["sps"] == pytest.approx(int(rows[-1]["global_step"]) * 2 / seconds, rel=1e-6)


def test_same_numbers_whatever_the_devices(tmp_path):
    """The same 2-seed command gives the same per-seed numbers in a process with 1 and with 2 CPU devices (a machine
    with 1 or 2 cores), since by default over_seeds uses one device; --num-cpu-devices 2 asks for the split, whose
    seeds, one per device, give the one-device numbers to float rounding (XLA compiles a per-device program apart):
    the logged losses (means over seeds) and each seed's trained parameters, in seed order."""
    flags = ("--env-id", "CartPole-v1", "--num-seeds", "2", "--total-timesteps", "4096", "--update-epochs", "10")
    runs = {}
    for name, devices, extra in [("one", 1, ()), ("two", 2, ()), ("split", 2, ("--num-cpu-devices", "2"))]:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        run_dir = str(tmp_path / name)
        run_cli(*flags, *extra, "--num-eval-envs", "16", "--run-dir", run_dir, env=env)
        with open(os.path.join(run_dir, "metrics.csv")) as f:
            runs[name] = (
                read_summary(run_dir),
                [{k: v for k, v in r.items() if k != "sps"} for r in csv.DictReader(f)],
            )
    assert runs["one"][0]["final_returns"] == runs["two"][0]["final_returns"]
    assert runs["one"][1] == runs["two"][1]  # every logged loss and return, to the last digit
    assert runs["one"][0]["device"] == runs["two"][0]["device"] == "1 x cpu"
    assert runs["split"][0]["device"] == "2 x cpu" and read_args(str(tmp_path / "split"))["num_cpu_devices"] == 2
    for column in ("policy_loss", "value_loss", "entropy", "approx_kl"):
        one, split = ([float(r[column]) for r in runs[name][1]] for name in ("one", "split"))
        np.testing.assert_allclose(split, one, rtol=1e-5, atol=1e-6, err_msg=column)
    one, split = (
        flax.serialization.msgpack_restore((tmp_path / n / "params.msgpack").read_bytes()) for n in ("one", "split")
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5), one, split)


BAD_INPUTS = {
    "unknown env": (["--env-id", "Pong-v5"], "CartPole-v1"),
    "unknown backend": (["--env-id", "ant", "--backend", "warp"], "positional"),
    "unknown drift": (["--drift", "trpo"], "ppo"),
    "indivisible batch of samples": (
        ["--env-id", "CartPole-v1", "--num-envs", "3", "--num-steps", "5", "--num-minibatches", "4"],
        "15 samples do not divide",
    ),
    "indivisible batch of unrolls": (["--env-id", "ant", "--num-envs", "3"], "48 unrolls do not divide"),
    "non-positive size": (["--env-id", "CartPole-v1", "--num-envs", "0"], "--num-envs 0 must be >= 1"),
    "too few steps": (["--env-id", "CartPole-v1", "--total-timesteps", "100"], "less than one update"),
    "missing run": (["--resume", "/nonexistent/run"], "no readable args.json"),
    "no CPU devices": (["--env-id", "CartPole-v1", "--num-cpu-devices", "0"], "must be >= 1"),
}
for flag, value, rule in (  # every rule of dpo.RANGES, a value or two each
    ("--gamma", "1.5", "in [0, 1]"),
    ("--gae-lambda", "2", "in [0, 1]"),
    ("--gamma", "nan", "in [0, 1]"),
    ("--clip-coef", "-0.2", "finite and > 0"),
    ("--learning-rate", "inf", "finite and > 0"),
    ("--learning-rate", "nan", "finite and > 0"),
    ("--max-grad-norm", "-1", "finite and >= 0"),
    ("--adam-eps", "0", "finite and > 0"),
    ("--reward-scaling", "-1", "finite and > 0"),
    ("--ent-coef", "nan", "finite and >= 0"),
    ("--vf-coef", "-0.5", "finite and >= 0"),
    ("--seed", "-1", "finite and >= 0"),
    ("--log-frequency", "-1", "finite and >= 0"),
    ("--total-timesteps", "-5", ">= 1"),
    ("--update-epochs", "0", ">= 1"),
    ("--actor-hidden", "0 64", ">= 1"),
):
    BAD_INPUTS[f"{flag} {value}"] = (["--env-id", "CartPole-v1", flag, *value.split()], f"must be {rule}")


def test_cpu_devices_recorded_are_those_that_run_once_jax_has_started():
    jax.devices()  # JAX has started in this process: its CPU devices can no longer change
    args = dpo.use_cpu_cores(dpo.Args(num_seeds=4, num_cpu_devices=jax.device_count() + 1))
    assert args.num_cpu_devices == jax.device_count()


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_a_short_message_and_nonzero_exit(name, capsys):
    import tyro

    flags, expected = BAD_INPUTS[name]
    with pytest.raises(SystemExit) as exit_info:
        dpo.main(tyro.cli(dpo.Args, args=flags))
    code = exit_info.value.code
    message = capsys.readouterr().err + (code if isinstance(code, str) else "")
    assert code == 2 and expected in message, message  # tyro's exit code for usage errors


def test_cli_error_has_no_traceback_and_comes_before_compiling():
    for flags in (["--env-id", "Pong-v5"], ["--env-id", "CartPole-v1", "--num-envs", "3", "--num-steps", "5"]):
        proc = run_cli(*flags, check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr and "compiled" not in proc.stdout


def test_damaged_checkpoint_is_refused(tmp_path, capsys):
    args = dpo.resolve_args(dpo.Args(env_id="CartPole-v1"))
    (tmp_path / "args.json").write_text(json.dumps(dataclasses.asdict(args)))
    (tmp_path / "checkpoint.msgpack").write_bytes(b"\x93not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        dpo.main(dpo.Args(resume=str(tmp_path)))
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(error) == 1 and error[0].startswith("error: ") and "damaged" in error[0]


def test_the_own_drift_example_of_the_docs_trains_and_bad_drifts_and_chunks_are_refused(tmp_path, monkeypatch):
    """docs/dpo.md's "Your own drift" example, run as written (in a scratch directory): the drift trains through the
    whole pipeline and summary.json names it. A drift written in r, or a negative one, is refused before training;
    train_chunk refuses a count its metrics cannot hold."""
    with open(os.path.join(ROOT, "docs", "dpo.md")) as f:
        example = f.read().split("### Your own drift")[1].split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "docs/dpo.md", "exec"), {})
    with open(tmp_path / "runs" / "quadratic_drift" / "summary.json") as f:
        summary = json.load(f)
    assert summary["drift"] == "quadratic_drift" and len(summary["final_returns"]) == 2
    assert np.isfinite(summary["final_returns"]).all()
    args = dpo.resolve_args(dpo.Args(env_id="CartPole-v1", total_timesteps=8192))

    def written_in_r(ratio, advantage):  # PPO's drift with r where log r belongs: f(log r = 0) = ReLU(-0.8·A)
        return jax.nn.relu((ratio - jnp.clip(ratio, 0.8, 1.2)) * advantage)

    with pytest.raises(dpo.ArgsError, match="does it take r instead of log r"):
        dpo.run_training(args, drift=written_in_r)
    with pytest.raises(dpo.ArgsError, match=">= 0"):
        dpo.check_drift(lambda log_ratio, advantage: -(log_ratio**2) * jnp.abs(advantage))
    init, train_chunk = dpo.make_train(args, dpo.dpo_drift)
    with pytest.raises(ValueError, match="do not fit"):
        train_chunk(init(jax.random.PRNGKey(0)), dpo.max_chunk(args) + 1)


def occupied_run_dir(path):
    """A directory that holds a run (its args.json), at path."""
    path.mkdir(parents=True)
    (path / "args.json").write_text("{}")
    return str(path)


def test_an_occupied_run_dir_is_refused_and_a_diverging_run_stops(tmp_path, capsys):
    """A new run into a directory that holds one is refused in one line pointing to --resume (nothing compiled),
    for one run and for a comparison; a run whose parameters become non-finite stops after that chunk with one
    line and exit 2, and writes no checkpoint."""
    single = dpo.Args(env_id="CartPole-v1", run_dir=occupied_run_dir(tmp_path / "single"))
    comparison = dpo.Args(env_id="CartPole-v1", compare=("dpo", "ppo"), run_dir=occupied_run_dir(tmp_path / "both"))
    for args in (single, comparison):
        with pytest.raises(SystemExit) as stop:
            dpo.main(args)
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and "--resume" in err and "--overwrite" in err and len(err.splitlines()) == 1
    diverging = dpo.Args(env_id="CartPole-v1", learning_rate=1e38, total_timesteps=2048)  # Adam steps of 1e38
    with pytest.raises(SystemExit) as stop:
        dpo.main(dataclasses.replace(diverging, run_dir=str(tmp_path / "nan")))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "diverged" in err and "update 1" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "nan" / "checkpoint.msgpack").exists()
