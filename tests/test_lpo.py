"""Tests of lpo.py: the drift network's validity, PPO initialisation, meta-training, resume, devices."""

import csv
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
import lpo  # noqa: E402

R_GRID, A_GRID = jnp.meshgrid(jnp.linspace(0.05, 3.0, 151), jnp.linspace(-3.0, 3.0, 61), indexing="ij")
A_LINE = jnp.linspace(-3.0, 3.0, 61)


def test_features_have_eight_entries_and_vanish_at_ratio_one():
    x = lpo.lpo_features(R_GRID, A_GRID)
    assert x.shape == R_GRID.shape + (8,)
    np.testing.assert_array_equal(np.asarray(lpo.lpo_features(jnp.ones_like(A_LINE), A_LINE)), 0.0)


@pytest.mark.parametrize("ppo_init", [True, False], ids=["lpo", "lpo-zero"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_drift_networks_are_valid_drifts(ppo_init, seed):
    params = lpo.init_drift_params(jax.random.PRNGKey(seed), ppo_init)
    params = [3.0 * w for w in params]  # larger than at initialisation, so f̃ is far from 0 off r = 1
    drift = lambda r, a: lpo.lpo_drift(params, r, a, ppo_init=ppo_init)
    f = drift(R_GRID, A_GRID)
    assert bool(jnp.all(f >= 0.0)) and float(f.max()) > 1e-3
    np.testing.assert_array_equal(np.asarray(drift(jnp.ones_like(A_LINE), A_LINE)), 0.0)
    d_dr = jax.vmap(jax.grad(drift))(jnp.ones_like(A_LINE), A_LINE)
    np.testing.assert_array_equal(np.asarray(d_dr), 0.0)


def test_zero_weights_with_ppo_init_are_ppo():
    zeros = jax.tree.map(jnp.zeros_like, lpo.init_drift_params(jax.random.PRNGKey(0), True))
    lpo_loss = lambda r, a: lpo.actor_loss(r, a, lambda x, y: lpo.lpo_drift(zeros, x, y))
    ppo_loss = lambda r, a: lpo.actor_loss(r, a, lpo.ppo_drift)
    r, a = R_GRID.ravel(), A_GRID.ravel()
    # The objective differs by at most ξ = 1e-6 (where PPO's drift is positive) ...
    assert abs(float(lpo_loss(r, a)) - float(ppo_loss(r, a))) <= lpo.XI
    # ... and the gradients with respect to the ratio are PPO's, except inside the band 0 < f_PPO < ξ, where
    # the ReLU blocks a gradient that is itself of order ξ (about 1% of this grid's points touch it).
    np.testing.assert_allclose(np.asarray(jax.grad(lpo_loss)(r, a)), np.asarray(jax.grad(ppo_loss)(r, a)), atol=1e-9)
    outside_band = ~((lpo.ppo_drift(r, a) > 0) & (lpo.ppo_drift(r, a) <= 10 * lpo.XI))
    np.testing.assert_array_equal(np.asarray(jax.grad(lpo_loss)(r, a))[outside_band],
                                  np.asarray(jax.grad(ppo_loss)(r, a))[outside_band])


TINY = ["--env-id", "CartPole-v1", "--pop-size", "4", "--save-every", "1", "--total-timesteps", "8192",
        "--num-envs", "8", "--num-eval-episodes", "2"]
RUN_FILES = ("args.json", "generations.csv", "checkpoint.msgpack", "best_drift.msgpack", "mean_drift.msgpack",
             "fitness_curve.png", "drift.png", "summary.json")


def run_cli(*flags, env=None):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "lpo.py"), *flags], capture_output=True, text=True,
                          cwd=ROOT, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def read_generations(run_dir):
    with open(os.path.join(run_dir, "generations.csv")) as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_meta_training_writes_run_dir_and_resume_reproduces_it(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run_cli(*TINY, "--num-generations", "3", "--run-dir", full)
    for name in RUN_FILES:
        assert os.path.getsize(os.path.join(full, name)) > 0, name
    rows = read_generations(full)
    assert [int(r["generation"]) for r in rows] == [1, 2, 3]
    assert all(float(r["best_fitness"]) >= float(r["mean_fitness"]) for r in rows)
    with open(os.path.join(full, "summary.json")) as f:
        summary = json.load(f)
    assert summary["num_generations"] == 3 and summary["best_fitness"] == max(float(r["best_fitness"]) for r in rows)

    # The learned drift transfers: fresh agents trained with it, with DPO and with PPO, in one run.
    transfer = str(tmp_path / "transfer")
    run_cli("--eval-drift", full, "--env-id", "CartPole-v1", "--total-timesteps", "4096", "--num-envs", "8",
            "--num-seeds", "2", "--num-eval-episodes", "2", "--run-dir", transfer)
    with open(os.path.join(transfer, "summary.json")) as f:
        compared = json.load(f)
    assert all(len(compared[name]["final_returns"]) == 2 for name in ("LPO", "DPO", "PPO"))
    assert os.path.getsize(os.path.join(transfer, "learning_curves.png")) > 0

    run_cli(*TINY, "--num-generations", "1", "--run-dir", part)  # an interrupted run: one generation saved
    run_cli("--resume", part, "--num-generations", "3")
    assert read_generations(part) == rows  # bit-for-bit the uninterrupted run's fitnesses and σ


def test_damaged_checkpoint_and_drift_file_are_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = lpo.resolve_args(lpo.Args(env_id="CartPole-v1", pop_size=4, num_generations=2))
    import dataclasses

    (run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args)))
    (run_dir / "checkpoint.msgpack").write_bytes(b"\x00garbage")
    (run_dir / "best_drift.msgpack").write_bytes(b"\x00garbage")
    for flags in (["--resume", str(run_dir)], ["--plot-drift", str(run_dir)],
                  ["--eval-drift", str(run_dir), "--env-id", "CartPole-v1"]):
        with pytest.raises(SystemExit) as exit_info:
            lpo.main(tyro.cli(lpo.Args, args=flags))
        assert exit_info.value.code != 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "damaged" in err, err


@pytest.mark.parametrize("flags, expected", [
    (["--pop-size", "5"], "even"),
    (["--env-id", "Pong-v5"], "valid:"),
    (["--fitness-shaping", "rank"], "centered_rank"),
    (["--resume", "/nonexistent/run"], "not found"),
    (["--eval-drift", "/nonexistent/drift.msgpack", "--env-id", "CartPole-v1"], "not found"),
])
def test_bad_input_is_one_line_and_nonzero_exit(flags, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        lpo.main(tyro.cli(lpo.Args, args=flags))
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


GENERATION = """
import json, sys
sys.path.insert(0, {root!r})
import jax, numpy as np, lpo
args = lpo.resolve_args(lpo.Args(env_id="CartPole-v1", pop_size=4, num_generations=1, total_timesteps=4096,
                                 num_envs=8, num_eval_episodes=2))
es = lpo.make_es(args)
state = es.init(jax.random.PRNGKey(0), lpo.drift_template(args), es.default_params)
_, _, fitness = lpo.make_generation(args, es)(state, lpo.generation_key(args, 0))
print(json.dumps([jax.device_count()] + np.asarray(fitness).tolist()))
"""


def test_generation_sharded_over_two_devices_matches_one_device():
    results = []
    for count in (1, 2):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}")
        proc = subprocess.run([sys.executable, "-c", GENERATION.format(root=ROOT)], capture_output=True, text=True,
                              env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert results[0][0] == 1 and results[1][0] == 2
    np.testing.assert_allclose(results[1][1:], results[0][1:], rtol=1e-5)


def test_evolution_improves_the_drift_over_generation_zero():
    # A cheap setting where PPO (the zero drift, generation 0) is far from solving CartPole: 16k steps.
    args = lpo.resolve_args(lpo.Args(env_id="CartPole-v1", pop_size=8, num_rollouts=2, num_generations=8,
                                     total_timesteps=16384, num_eval_episodes=4, es_learning_rate=0.05,
                                     sigma_init=0.1))
    es = lpo.make_es(args)
    state = es.init(jax.random.PRNGKey(args.seed), lpo.drift_template(args), es.default_params)
    generation = lpo.make_generation(args, es)
    for g in range(args.num_generations):
        state, _, _ = generation(state, lpo.generation_key(args, g))
    learned = es.get_mean(state)

    # Held-out inner-loop seeds (never used by the ES): the evolved mean drift against PPO, same seeds.
    train, evaluate = lpo.make_train(args), lpo.make_evaluate(args)

    def final_return(drift_id, key):
        key_train, key_eval = jax.random.split(key)
        out = train(key_train, lpo.DriftParams(learned, drift_id))
        return evaluate(out.params, out.obs_stats, key_eval)

    keys = jax.random.split(jax.random.PRNGKey(12345), 8)
    returns = jax.jit(jax.vmap(jax.vmap(final_return, in_axes=(None, 0)), in_axes=(0, None)))(
        jnp.array([0, 2]), keys)
    lpo_returns, ppo_returns = np.asarray(returns)
    assert lpo_returns.mean() > ppo_returns.mean() + 50, (lpo_returns, ppo_returns)
