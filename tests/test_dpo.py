"""Tests of dpo.py: the drifts' mathematics, GAE, learning on CPU, the CLI and its errors."""

import dataclasses
import json
import math
import os
import subprocess
import sys

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
DRIFTS = {"dpo": dpo.dpo_drift, "ppo": dpo.ppo_drift}


# ---------------------------------------------------------------------------------------------
# Drift validity (Lu et al. 2022, Appendix D) and the closed forms
# ---------------------------------------------------------------------------------------------
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
        if a >= 0:
            x = (r - 1) * a
            return max(0.0, x - alpha * math.tanh(x / alpha))
        x = math.log(r) * a
        return max(0.0, x - beta * math.tanh(x / beta))

    points = [(1.5, 1.0), (3.0, 2.0), (0.5, 1.0), (0.5, -1.0), (0.2, -2.5), (1.8, -1.0), (1.0, 0.7), (2.2, 0.0)]
    for r, a in points:
        assert float(dpo.dpo_drift(jnp.float32(r), jnp.float32(a))) == pytest.approx(eq9(r, a), abs=1e-6)
    # Hand-worked values: (r=1.5, A=1) -> 0.5 - 2·tanh(0.25); (r=0.5, A=-1) -> ln 2 - 0.6·tanh(ln 2 / 0.6).
    assert float(dpo.dpo_drift(jnp.float32(1.5), jnp.float32(1.0))) == pytest.approx(0.0101627, abs=1e-6)
    assert float(dpo.dpo_drift(jnp.float32(0.5), jnp.float32(-1.0))) == pytest.approx(0.2014566, abs=1e-6)
    # Non-default coefficients reach the formula.
    assert float(dpo.dpo_drift(jnp.float32(1.5), jnp.float32(1.0), alpha=0.5)) == pytest.approx(eq9(1.5, 1.0, 0.5))


def test_ppo_drift_makes_the_objective_ppo_clip():
    eps = 0.2
    loss_per_point = jax.vmap(lambda r, a: dpo.actor_loss(r[None], a[None], lambda x, y: dpo.ppo_drift(x, y, eps)))
    ours = loss_per_point(R_GRID.ravel(), A_GRID.ravel())
    clipped = -jnp.minimum(R_GRID * A_GRID, jnp.clip(R_GRID, 1 - eps, 1 + eps) * A_GRID).ravel()
    np.testing.assert_allclose(np.asarray(ours), np.asarray(clipped), atol=1e-6)


def test_dpo_objective_differs_from_ppo_where_the_paper_says():
    # Rollback: for A < 0 and r < 1 - ε PPO's loss is flat in r, DPO's pushes r back up towards 1:
    # ∂L/∂r = -A + ∂f/∂r = 1 - 2·(1 - sech²(ln 2 / 0.6)) ≈ -0.34 < 0, so gradient descent raises r.
    grad_loss = jax.grad(lambda r, a, d: dpo.actor_loss(r[None], a[None], d))
    r, a = jnp.float32(0.5), jnp.float32(-1.0)
    assert float(grad_loss(r, a, dpo.ppo_drift)) == 0.0
    expected = 1.0 - 2.0 * (1.0 - 1.0 / math.cosh(math.log(2.0) / 0.6) ** 2)
    assert float(grad_loss(r, a, dpo.dpo_drift)) == pytest.approx(expected, abs=1e-5)
    assert expected < 0.0


# ---------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------
def gae_reference(rewards, values, next_values, terminated, cuts, gamma, lam):
    T, E = rewards.shape
    adv = np.zeros((T, E))
    for e in range(E):
        running = 0.0
        for t in reversed(range(T)):
            delta = rewards[t, e] + gamma * (1 - terminated[t, e]) * next_values[t, e] - values[t, e]
            running = delta + gamma * lam * (1 - cuts[t, e]) * running
            adv[t, e] = running
    return adv


def test_gae_scan_matches_python_loop_with_terminations_truncations_and_unroll_ends():
    rng = np.random.default_rng(0)
    T, E, unroll = 24, 5, 8
    rewards, values = rng.normal(size=(T, E)), rng.normal(size=(T, E))
    next_values = np.roll(values, -1, axis=0) + 0.1 * rng.normal(size=(T, E))
    terminated = (rng.random((T, E)) < 0.1).astype(float)
    truncated = ((rng.random((T, E)) < 0.1) & (terminated == 0)).astype(float)
    unroll_end = (np.arange(T) % unroll == unroll - 1).astype(float)[:, None]
    cuts = np.maximum(np.maximum(terminated, truncated), unroll_end)
    assert terminated.any() and truncated.any()
    adv, ret = dpo.compute_gae(*(jnp.asarray(x, jnp.float32) for x in (rewards, values, next_values, terminated, cuts)),
                               gamma=0.97, gae_lambda=0.95)
    expected = gae_reference(rewards, values, next_values, terminated, cuts, 0.97, 0.95)
    np.testing.assert_allclose(np.asarray(adv), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), expected + values, rtol=1e-5, atol=1e-5)
    # A truncated step bootstraps from V(s'), a terminated one does not.
    t, e = map(int, np.argwhere(truncated)[0])
    assert float(adv[t, e]) == pytest.approx(rewards[t, e] + 0.97 * next_values[t, e] - values[t, e], abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Learning on CPU
# ---------------------------------------------------------------------------------------------
def train_and_evaluate(args):
    args = dpo.resolve_args(args)
    train_keys, eval_keys = dpo.seed_keys(args)
    out = jax.jit(jax.vmap(dpo.make_train(args)))(train_keys)
    returns = jax.jit(jax.vmap(dpo.make_evaluate(args)))(out.params, out.obs_stats, eval_keys)
    return out, np.asarray(returns)


@pytest.mark.parametrize("drift", ["dpo", "ppo"])
def test_cartpole_learns(drift):
    args = dpo.Args(env_id="CartPole-v1", drift=drift, num_seeds=4, total_timesteps=300_000, num_envs=8,
                    learning_rate=5e-4, num_eval_episodes=5)
    _, returns = train_and_evaluate(args)
    # A random policy averages about 22 on CartPole-v1; 400 needs a policy that balances for long.
    assert returns.mean() >= 400, returns


def test_pendulum_learns_above_random():
    args = dpo.Args(env_id="Pendulum-v1", num_seeds=2, total_timesteps=150_000, num_eval_episodes=5)
    out, returns = train_and_evaluate(args)
    # Random torques on Pendulum-v1 return about -1200 on average; swinging up and holding is above -600.
    assert returns.mean() > -600, returns
    curve = np.asarray(out.metrics["episodic_return"]).mean(0)  # NaN until the first episodes end
    finite = curve[np.isfinite(curve)]
    assert finite[-5:].mean() > finite[:5].mean() + 300, finite


def test_same_seed_gives_identical_numbers():
    args = dpo.resolve_args(dpo.Args(env_id="CartPole-v1", num_seeds=2, total_timesteps=4096))
    keys, _ = dpo.seed_keys(args)
    first = jax.jit(jax.vmap(dpo.make_train(args)))(keys)
    second = jax.jit(jax.vmap(dpo.make_train(args)))(keys)  # built and compiled afresh
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other, _ = dpo.seed_keys(dataclasses.replace(args, seed=args.seed + 1))
    third = jax.jit(jax.vmap(dpo.make_train(args)))(other)
    assert not np.array_equal(np.asarray(first.metrics["policy_loss"]), np.asarray(third.metrics["policy_loss"]))


# ---------------------------------------------------------------------------------------------
# The CLI: run directory, reload, errors
# ---------------------------------------------------------------------------------------------
RUN_FILES = ("args.json", "metrics.csv", "learning_curve.png", "params.msgpack", "summary.json")
SUMMARY_KEYS = ("final_return_mean", "final_return_std", "env_id", "drift", "total_timesteps", "num_seeds",
                "wall_seconds")


def run_cli(*flags, check=True):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "dpo.py"), *flags], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def check_run_dir(run_dir, env_id):
    for name in RUN_FILES:
        assert os.path.getsize(os.path.join(run_dir, name)) > 0, name
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    for key in SUMMARY_KEYS:
        assert key in summary, key
    assert summary["env_id"] == env_id and math.isfinite(summary["final_return_mean"])
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        header, *rows = f.read().splitlines()
    assert header.split(",")[:3] == ["global_step", "episodic_return_mean", "episodic_return_std"]
    assert len(rows) == int(summary["total_timesteps"]) // int(rows[0].split(",")[0])
    return summary


@pytest.mark.parametrize("env_flags", [
    ("--env-id", "ant", "--backend", "spring", "--num-envs", "16", "--num-unrolls", "2", "--num-minibatches", "4",
     "--total-timesteps", "480", "--episode-length", "50"),
    ("--env-id", "Breakout-MinAtar", "--num-envs", "8", "--num-steps", "16", "--total-timesteps", "512"),
    ("--env-id", "Pendulum-v1", "--num-envs", "4", "--num-steps", "32", "--total-timesteps", "512"),
], ids=["brax-ant", "minatar-breakout", "pendulum"])
def test_cli_writes_run_dir_and_reload_reproduces_evaluation(tmp_path, env_flags):
    run_dir = str(tmp_path / "run")
    proc = run_cli(*env_flags, "--num-seeds", "2", "--num-eval-episodes", "2", "--run-dir", run_dir)
    assert proc.stdout.strip().splitlines()[-1] == f"run directory: {run_dir}"
    summary = check_run_dir(run_dir, env_flags[1])
    eval_dir = str(tmp_path / "eval")
    run_cli("--load", run_dir, "--eval-only", "--num-eval-episodes", "2", "--run-dir", eval_dir)
    with open(os.path.join(eval_dir, "summary.json")) as f:
        reloaded = json.load(f)
    # Same parameters, same evaluation keys, deterministic actions: the same returns, seed by seed.
    assert reloaded["final_returns"] == summary["final_returns"]


BAD_INPUTS = {
    "unknown env": (["--env-id", "Pong-v5"], "CartPole-v1"),
    "unknown backend": (["--env-id", "ant", "--backend", "warp"], "positional"),
    "unknown drift": (["--drift", "trpo"], "dpo, ppo"),
    "indivisible batch": (["--env-id", "CartPole-v1", "--num-envs", "3", "--num-steps", "5", "--num-minibatches", "4"],
                          "does not divide"),
    "non-positive size": (["--env-id", "CartPole-v1", "--num-envs", "0"], "must be positive"),
    "negative seeds": (["--env-id", "CartPole-v1", "--num-seeds", "-2"], "must be positive"),
    "missing checkpoint": (["--load", "/nonexistent/run", "--eval-only"], "not found"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_line_and_nonzero_exit(name, capsys):
    flags, expected = BAD_INPUTS[name]
    import tyro

    with pytest.raises(SystemExit) as exit_info:
        dpo.main(tyro.cli(dpo.Args, args=flags))
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err, err


def test_damaged_checkpoint_is_refused(tmp_path, capsys):
    import tyro

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = dpo.resolve_args(dpo.Args(env_id="CartPole-v1"))
    (run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args)))
    (run_dir / "params.msgpack").write_bytes(b"\x93not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        dpo.main(tyro.cli(dpo.Args, args=["--load", str(run_dir), "--eval-only"]))
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "damaged" in err, err


def test_cli_error_has_no_traceback_and_comes_before_compiling():
    proc = run_cli("--env-id", "CartPole-v1", "--num-envs", "3", "--num-minibatches", "2", "--num-steps", "5",
                   check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "compiled" not in proc.stdout
    assert proc.stderr.strip().splitlines() == [
        "error: batch num_envs × num_steps × num_unrolls = 3 × 5 × 1 = 15 does not divide into --num-minibatches 2"]


SHARDED_RUN = """
import json, sys
sys.path.insert(0, {root!r})
import jax, numpy as np, dpo
assert jax.device_count() == 2, jax.devices()
args = dpo.resolve_args(dpo.Args(env_id="CartPole-v1", num_seeds=2, total_timesteps=4096))
keys, _ = dpo.seed_keys(args)
out = dpo.over_devices(dpo.make_train(args), args.num_seeds)(keys)
print(json.dumps(np.asarray(out.metrics["policy_loss"]).tolist()))
"""


def test_seeds_sharded_over_two_devices_match_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "-c", SHARDED_RUN.format(root=ROOT)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = np.array(json.loads(proc.stdout.strip().splitlines()[-1]))
    args = dpo.resolve_args(dpo.Args(env_id="CartPole-v1", num_seeds=2, total_timesteps=4096))
    keys, _ = dpo.seed_keys(args)
    single = np.asarray(jax.jit(jax.vmap(dpo.make_train(args)))(keys).metrics["policy_loss"])
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-6)
