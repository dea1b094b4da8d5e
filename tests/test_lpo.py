"""Tests of lpo.py: the drift network's validity and PPO initialisation, dpo.py's loop shared verbatim, the ES's
direction and schedules, meta-training with an exact resume and as 2 processes, the transfer command on the shipped
drift, bad input."""

import concurrent.futures
import csv
import dataclasses
import functools
import inspect
import json
import os
import sys

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import processes  # noqa: E402

import dpo  # noqa: E402
import lpo  # noqa: E402

R_GRID, A_GRID = jnp.meshgrid(jnp.linspace(0.05, 3.0, 151), jnp.linspace(-3.0, 3.0, 61), indexing="ij")
A_LINE = jnp.linspace(-3.0, 3.0, 61)
SHIPPED = os.path.join(ROOT, "drifts", "lpo_classic.msgpack")


def test_features_are_the_authors_eight_and_vanish_at_ratio_one():
    x = lpo.lpo_features(jnp.log(R_GRID), A_GRID)
    assert x.shape == R_GRID.shape + (8,)
    r, a = 1.5, -2.0
    expected = [np.log(r), np.log(r) ** 2, 1 - r, (1 - r) ** 2]
    np.testing.assert_allclose(
        np.asarray(lpo.lpo_features(jnp.log(jnp.float32(r)), jnp.float32(a))),
        expected + [a * e for e in expected],
        rtol=1e-6,
    )
    np.testing.assert_array_equal(np.asarray(lpo.lpo_features(jnp.zeros_like(A_LINE), A_LINE)), 0.0)


@pytest.mark.parametrize(
    "ppo_init,hidden", [(True, None), (False, None), (False, (256,))], ids=["lpo", "lpo-zero", "lpo-zero-one-layer"]
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_drift_networks_are_valid_drifts(ppo_init, hidden, seed):
    sizes = lpo.drift_layer_sizes(ppo_init, hidden)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes) - 1)
    net = [jax.random.normal(k, (i, o)) for k, i, o in zip(keys, sizes, sizes[1:])]  # far from 0 off r = 1

    def drift(r, a):
        return lpo.lpo_drift(net, jnp.log(r), a, ppo_init)

    f = drift(R_GRID, A_GRID)
    assert bool(jnp.all(f >= 0.0)) and float(f.max()) > 1e-2
    np.testing.assert_array_equal(np.asarray(drift(jnp.ones_like(A_LINE), A_LINE)), 0.0)
    d_dr = jax.vmap(jax.grad(drift))(jnp.ones_like(A_LINE), A_LINE)
    np.testing.assert_array_equal(np.asarray(d_dr), 0.0)


def test_zero_weights_with_ppo_init_are_ppo_with_eps_0_2():
    zeros = lpo.init_drift_params(jax.random.PRNGKey(0), True)
    assert all(float(jnp.abs(w).max()) == 0.0 for w in zeros)

    def lpo_loss(r, a):
        return lpo.actor_loss(jnp.log(r), a, functools.partial(lpo.lpo_drift, zeros))

    def ppo_loss(r, a):
        return lpo.actor_loss(jnp.log(r), a, lpo.ppo_drift)

    r, a = R_GRID.ravel(), A_GRID.ravel()
    assert abs(float(lpo_loss(r, a)) - float(ppo_loss(r, a))) <= lpo.XI  # the objective moves by at most ξ
    # The gradients are PPO's except in the band 0 < f_PPO ≤ ξ, where the ReLU blocks a gradient of order ξ.
    f_ppo = lpo.ppo_drift(jnp.log(r), a, 0.2)
    outside_band = ~((f_ppo > 0) & (f_ppo <= 10 * lpo.XI))
    np.testing.assert_array_equal(
        np.asarray(jax.grad(lpo_loss)(r, a))[outside_band], np.asarray(jax.grad(ppo_loss)(r, a))[outside_band]
    )


@pytest.mark.parametrize("hidden", [(256,), (256, 256)], ids=["appendix-one-layer", "section-5.1-two-layers"])
def test_an_lpo_zero_drift_file_keeps_its_architecture(tmp_path, hidden):
    net = lpo.init_drift_params(jax.random.PRNGKey(3), False, hidden)
    lpo.save_drift(str(tmp_path / "drift.msgpack"), net, False)
    loaded, ppo_init, settings = lpo.load_drift(str(tmp_path / "drift.msgpack"))
    assert settings == {}  # none recorded
    shapes = list(zip((8,) + hidden, hidden + (1,)))
    assert not ppo_init and [w.shape for w in loaded] == [w.shape for w in net] == shapes
    np.testing.assert_array_equal(
        np.asarray(lpo.lpo_drift(loaded, jnp.log(R_GRID), A_GRID, False)),
        np.asarray(lpo.lpo_drift(net, jnp.log(R_GRID), A_GRID, False)),
    )


SHARED = (
    "compute_gae",
    "Sample",
    "resolve_args",
    "batch_size",
    "num_updates",
    "GymnaxEnv",
    "BraxEnv",
    "make_env",
    "update_running_stats",
    "normalize",
    "Categorical",
    "TanhGaussian",
    "MLP",
    "make_networks",
    "policy",
    "Runner",
    "make_optimizer",
    "make_train",
    "max_chunk",
    "make_evaluate",
    "seed_keys",
    "seed_devices",
    "over_seeds",
    "init_seeds",
    "seed_statistics",
    "evaluate_seeds",
    "atomic_write",
    "load_tree",
    "run_training",
    "run_comparison",
    "plot_curves",
    "write_json",
    "ArgsError",
    "use_cpu_cores",
    "ppo_drift",
    "dpo_drift",
    "actor_loss",
)


@pytest.mark.parametrize("name", SHARED)
def test_the_training_loop_is_dpo_py_verbatim(name):
    assert inspect.getsource(getattr(lpo, name)) == inspect.getsource(getattr(dpo, name))
    assert lpo.ENV_DEFAULTS == dpo.ENV_DEFAULTS


def test_es_maximises_the_fitness_with_the_authors_schedules():
    initial = lpo.init_drift_params(jax.random.PRNGKey(0))
    es = lpo.make_es(lpo.Args(), initial)
    assert float(es.std_schedule(0)) == pytest.approx(0.04) and float(es.std_schedule(10**6)) == pytest.approx(0.01)
    state = es.init(jax.random.PRNGKey(0), initial, es.default_params)
    for g in range(20):  # fitness = the sum of the weights, told negated as run_meta_training tells it
        population, state = es.ask(jax.random.PRNGKey(g), state, es.default_params)
        fitness = jax.vmap(lambda p: jax.flatten_util.ravel_pytree(p)[0].sum())(population)
        state, _ = es.tell(jax.random.PRNGKey(g), population, -fitness, state, es.default_params)
    assert float(state.mean.sum()) > 10.0 and float((state.mean > 0).mean()) > 0.6  # told +fitness: < 0, < 0.4


TINY = [
    "--env-ids",
    "CartPole-v1",
    "--pop-size",
    "4",
    "--total-timesteps",
    "2048",
    "--num-envs",
    "4",
    "--num-unrolls",
    "1",
    "--num-eval-envs",
    "4",
]


@pytest.mark.parametrize("hidden", [None, ()], ids=["authors-network", "linear-sign-split"])
def test_at_the_zero_start_only_the_linear_drift_gives_antithetic_pairs_two_drifts_and_an_es_gradient(hidden):
    initial = lpo.init_drift_params(jax.random.PRNGKey(0), True, hidden)
    args = lpo.Args(sigma=(0.1, 1.0, 0.1))
    es = lpo.make_es(args, initial)
    state = es.init(jax.random.PRNGKey(0), initial, es.default_params)
    population, _ = es.ask(jax.random.PRNGKey(1), state, es.default_params)
    drifts = jax.vmap(lambda net: lpo.lpo_drift(net, jnp.log(R_GRID), A_GRID))(population)  # [pop, r, A]
    half = args.pop_size // 2
    # The fitness a drift earns: any functional of it, here its mean over the grid weighted towards small ratios.
    fitness = jnp.mean(drifts * (3.0 - R_GRID), axis=(1, 2))
    flat = jax.vmap(lambda net: jax.flatten_util.ravel_pytree(net)[0])(population)
    gradient = jnp.sum((fitness[:half] - fitness[half:])[:, None] * (flat[:half] - flat[half:]), axis=0)
    if hidden is None:  # tanh and no biases: f̃(-W) = f̃(W), twins are one drift and the estimate is exactly zero
        np.testing.assert_array_equal(np.asarray(drifts[:half]), np.asarray(drifts[half:]))
        assert float(jnp.abs(gradient).max()) == 0.0
    else:  # linear in the weights: twins are opposite corrections of PPO's drift
        assert float(jnp.abs(drifts[:half] - drifts[half:]).max(axis=(1, 2)).min()) > 1e-3  # every pair differs
        assert float(jnp.linalg.norm(gradient)) > 1e-4


def test_es_signal_is_one_when_pair_differences_replicate_and_near_zero_for_noise():
    rng = np.random.default_rng(0)
    effect = rng.normal(size=(200, 1))  # each pair's true difference, the same on every run
    replicated = np.concatenate([effect, -effect]) + 0.1 * rng.normal(size=(400, 4))
    noise = rng.normal(size=(400, 4))
    assert lpo.es_signal(replicated) > 0.95 and abs(lpo.es_signal(noise)) < 0.2
    assert np.isnan(lpo.es_signal(noise[:, :1]))  # one run: no two halves


def test_eval_drift_runs_at_the_settings_the_drift_file_records(tmp_path):
    net = lpo.init_drift_params(jax.random.PRNGKey(0), True, ())
    recorded = lpo.resolve_args(lpo.Args(env_id="CartPole-v1", total_timesteps=1024, num_envs=2, update_epochs=3))
    lpo.save_drift(str(tmp_path / "drift.msgpack"), net, True, dataclasses.asdict(recorded))
    flags = ["--eval-drift", str(tmp_path / "drift.msgpack"), "--compare", "lpo", "--num-eval-envs", "2"]
    ran = lpo.eval_drift_args(tyro.cli(lpo.Args, args=flags + ["--update-epochs", "2"]))
    assert (ran.env_id, ran.total_timesteps, ran.num_envs) == ("CartPole-v1", 1024, 2)  # from the file
    assert ran.update_epochs == 2 and ran.num_eval_envs == 2  # given on the command line: they win
    assert ran.eval_drift == str(tmp_path / "drift.msgpack")
    ran = lpo.resolve_args(lpo.eval_drift_args(tyro.cli(lpo.Args, args=flags + ["--env-id", "Acrobot-v1"])))
    assert (ran.num_envs, ran.update_epochs) == (4, 4)  # another env: its family's defaults, not the file's
    # the run itself: test_eval_drift_on_the_shipped_drift_and_its_ppo_run_is_dpo_py_bit_for_bit


def test_centered_ranks_within_an_env_resist_a_collapsed_run():
    returns = np.array([-1500.0, -200.0, -190.0, -180.0])  # one member's Pendulum runs collapsed
    z = lpo.shape_within_env(returns, "z_score")
    ranks = lpo.shape_within_env(returns, "centered_rank")
    np.testing.assert_allclose(ranks, [-0.5, -1 / 6, 1 / 6, 0.5])  # the survivors keep their spread
    assert np.ptp(z[1:]) < 0.05 * np.ptp(z)  # the z-scores squeeze them together
    for shaping in ("z_score", "centered_rank"):  # one env: evosax's shaping of the scores is its shaping of returns
        shape = lpo.make_es(
            lpo.Args(fitness_shaping=shaping), lpo.init_drift_params(jax.random.PRNGKey(0))
        ).fitness_shaping_fn
        scores = lpo.shape_within_env(returns, shaping)
        np.testing.assert_allclose(shape(None, scores, None, None), shape(None, returns, None, None), atol=1e-6)


def test_validation_gain_weighs_envs_by_ppos_spread_and_keeps_one_envs_order():
    rng = np.random.default_rng(0)
    cartpole, pendulum = 400 + 20 * rng.standard_normal(16), -400 + 200 * rng.standard_normal(16)
    ppo = [cartpole, pendulum]
    small_sure_gain = np.array(
        [cartpole.mean() + 20, pendulum.mean() - 40]
    )  # about +1 sd on CartPole, -0.2 sd on Pendulum
    large_noisy_gain = np.array(
        [cartpole.mean() - 10, pendulum.mean() + 60]
    )  # about -0.5 sd, +0.3 sd: more in raw units
    assert np.mean(large_noisy_gain - [c.mean() for c in ppo]) > np.mean(small_sure_gain - [c.mean() for c in ppo])
    assert lpo.validation_gain(small_sure_gain, ppo) > lpo.validation_gain(large_noisy_gain, ppo)
    expected = (20 / np.std(cartpole, ddof=1) - 40 / np.std(pendulum, ddof=1)) / 2  # the sample stds, ddof 1
    np.testing.assert_allclose(lpo.validation_gain(small_sure_gain, ppo), expected)
    means = cartpole.mean() + np.array([-30.0, 5.0, 12.0, 40.0])  # one env: the raw difference's order
    gains = [lpo.validation_gain(np.array([m]), [cartpole]) for m in means]
    assert np.all(np.diff(gains) > 0)


def test_env_flags_set_one_envs_inner_loop_and_the_drift_file_records_every_env(tmp_path):
    flags = ["--env-ids", "CartPole-v1", "Pendulum-v1", "--update-epochs", "3"]
    flags += ["--env-flags", "Pendulum-v1:learning-rate=1e-3", "Pendulum-v1:actor-hidden=32 32"]
    args = tyro.cli(lpo.Args, args=flags)
    cartpole, pendulum = (lpo.env_inner_args(args, e) for e in args.env_ids)
    assert (pendulum.learning_rate, pendulum.actor_hidden, pendulum.update_epochs) == (1e-3, (32, 32), 3)
    default = lpo.resolve_args(dataclasses.replace(args, env_id="CartPole-v1"))
    assert cartpole == default and cartpole.update_epochs == 3  # the other env: the command's flags and its defaults
    for entry in ("Acrobot-v1:learning-rate=1e-3", "Pendulum-v1:sigma=0.1", "Pendulum-v1:learning-rate"):
        with pytest.raises(lpo.ArgsError, match="ENV:FLAG=VALUE"):
            lpo.env_inner_args(dataclasses.replace(args, env_flags=(entry,)), "Pendulum-v1")
    with pytest.raises(lpo.ArgsError, match="a bad value for Pendulum-v1"):
        lpo.env_inner_args(dataclasses.replace(args, env_flags=("Pendulum-v1:update-epochs=two",)), "Pendulum-v1")
    # the file records every env's settings; --eval-drift on one of them runs at that env's
    net = lpo.init_drift_params(jax.random.PRNGKey(0), True, ())
    settings = dict(
        dataclasses.asdict(cartpole), env_settings={a.env_id: dataclasses.asdict(a) for a in (cartpole, pendulum)}
    )
    lpo.save_drift(str(tmp_path / "drift.msgpack"), net, True, settings)
    evaluate = ["--eval-drift", str(tmp_path / "drift.msgpack")]
    ran = lpo.eval_drift_args(tyro.cli(lpo.Args, args=evaluate + ["--env-id", "Pendulum-v1"]))
    assert (ran.learning_rate, ran.actor_hidden, ran.update_epochs) == (1e-3, (32, 32), 3)
    ran = lpo.eval_drift_args(tyro.cli(lpo.Args, args=evaluate))  # no --env-id: the first env's
    assert (ran.env_id, ran.learning_rate) == ("CartPole-v1", cartpole.learning_rate)


TWO_PROCESSES = """
import dataclasses, json, sys
sys.path[:0] = [{root!r}, {tests!r}]
import jax, jax.numpy as jnp, tyro
import lpo, processes
args = tyro.cli(lpo.Args)
lpo.start_processes(args)
lpo.run_meta_training(args)
env_args = lpo.resolve_args(dataclasses.replace(args, env_id=args.env_ids[0]))
init, fitness, _, _ = lpo.make_env_fitness(env_args)
keys = jax.random.split(jax.random.PRNGKey(0), 2 * args.num_rollouts)
drift = lpo.init_drift_params(keys[0], args.ppo_init, args.drift_hidden)
nets = jax.tree.map(lambda w: jnp.zeros((args.pop_size, *w.shape)), drift)
lowered = fitness.lower(nets, lpo.init_seeds(init, keys[: args.num_rollouts]), keys[args.num_rollouts :])
print(json.dumps([jax.process_count(), jax.device_count(), processes.collectives(lowered.compile().as_text())]))
"""


def test_meta_training_writes_its_run_dir_and_resumed_and_two_process_runs_agree(tmp_path):
    """A tiny meta-training stopped after 2 generations and resumed (--resume, --num-generations 3) writes its run
    directory and the same drift, ES checkpoint and generations.csv (timings aside), bit for bit, as an uninterrupted
    run of 3 generations as 2 processes of 1 device, whose compiled fitness exchanges the returns f32[pop, R] and
    nothing else. One comparison checks both the resume and the processes: either breaking makes them differ. (A run
    on 2 forced host devices gave the same bytes too, commit 40eab99; left out to keep the suite short.)"""
    part, two = str(tmp_path / "part"), str(tmp_path / "two")
    tiny = TINY + ["--num-rollouts", "2", "--validate-every", "2", "--num-validation-seeds", "2", "--drift-hidden"]
    driver = [sys.executable, "-c", TWO_PROCESSES.format(root=ROOT, tests=os.path.join(ROOT, "tests"))]
    pool = concurrent.futures.ThreadPoolExecutor(1)
    launched = pool.submit(processes.launch, driver + tiny + ["--num-generations", "3", "--run-dir", two], 2, 600)
    lpo.main(tyro.cli(lpo.Args, args=tiny + ["--num-generations", "2", "--run-dir", part]))  # interrupted after 2
    lpo.main(tyro.cli(lpo.Args, args=["--resume", part, "--num-generations", "3"]))  # extended to 3
    for name in (
        "args.json",
        "generations.csv",
        "es_checkpoint.msgpack",
        "drift.msgpack",
        "best_drift.msgpack",
        "fitness_CartPole-v1.png",
    ):
        assert os.path.getsize(os.path.join(part, name)) > 0, name
    net, ppo_init, settings = lpo.load_drift(part)
    assert ppo_init and net[0].shape == (16, 1) and float(jnp.abs(net[0]).sum()) > 0  # the mean left PPO
    assert settings["env_ids"] == ("CartPole-v1",) and settings["total_timesteps"] == 2048
    assert settings["num_envs"] == 4 and settings["learning_rate"] == 2.5e-4  # given, and the family default

    def rows(run_dir):
        with open(os.path.join(run_dir, "generations.csv")) as f:
            return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]

    assert [r["CartPole-v1_validation_return"] != "" for r in rows(part)] == [False, True, False]
    assert all("CartPole-v1_signal" in r for r in rows(part))  # es_signal itself: test_es_signal_...
    results = launched.result()
    pool.shutdown()
    for code, _, err in results:
        assert code == 0, err[-3000:]
    assert json.loads(results[0][1].strip().splitlines()[-1]) == [2, 2, ["f32[4,2]{1,0} all-gather"]]
    for name in ("drift.msgpack", "best_drift.msgpack", "es_checkpoint.msgpack"):
        with open(os.path.join(part, name), "rb") as a, open(os.path.join(two, name), "rb") as b:
            assert a.read() == b.read(), name
    assert rows(two) == rows(part) and len(rows(part)) == 3


def test_eval_drift_on_the_shipped_drift_and_its_ppo_run_is_dpo_py_bit_for_bit(tmp_path):
    flags = ["--env-id", "CartPole-v1", "--num-seeds", "2", "--total-timesteps", "4096", "--num-eval-envs", "8"]
    base = lpo.main(
        tyro.cli(
            lpo.Args,
            args=flags + ["--eval-drift", SHIPPED, "--compare", "lpo", "ppo", "--run-dir", str(tmp_path / "eval")],
        )
    )
    with open(os.path.join(base, "summary.json")) as f:
        summary = json.load(f)
    assert set(summary["drifts"]) == {"lpo", "ppo"} and len(summary["drifts"]["lpo"]["final_returns"]) == 2
    ran = lpo.resumed_args(lpo.Args(resume=os.path.join(base, "lpo")))  # the settings the run took: given, recorded
    assert (ran.total_timesteps, ran.num_eval_envs, ran.update_epochs, ran.learning_rate) == (4096, 8, 10, 5e-4)
    assert os.path.getsize(os.path.join(base, "learning_curves.png")) > 0
    recorded = ["--update-epochs", "10", "--learning-rate", "5e-4", "--anneal-lr", "False"]  # what the file records
    dpo.main(tyro.cli(dpo.Args, args=flags + recorded + ["--drift", "ppo", "--run-dir", str(tmp_path / "dpo")]))
    with open(tmp_path / "dpo" / "summary.json") as f:
        assert json.load(f)["final_returns"] == summary["drifts"]["ppo"]["final_returns"]
    # The shipped drift is not PPO's (on this short run ratios stay near 1, where the two can coincide).
    net, ppo_init, _ = lpo.load_drift(SHIPPED)
    r, a = jnp.meshgrid(jnp.linspace(0.5, 1.5, 101), jnp.linspace(-2.0, 2.0, 81), indexing="ij")
    assert ppo_init and float(jnp.abs(lpo.lpo_drift(net, jnp.log(r), a) - lpo.ppo_drift(jnp.log(r), a)).max()) > 1e-2


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "drifts"))))
def test_every_shipped_drift_is_a_valid_drift_that_records_its_check(name):
    """Each file under drifts/ loads; `--eval-drift FILE --num-seeds 16` alone runs at the env and inner loop it
    records (the first meta-training env's); and its drift is one of eq. 8's (zero at r = 1, non-negative)."""
    path = os.path.join(ROOT, "drifts", name)
    net, ppo_init, settings = lpo.load_drift(path)
    ran = lpo.eval_drift_args(tyro.cli(lpo.Args, args=["--eval-drift", path, "--num-seeds", "16"]))
    assert ran.env_id == settings["env_id"] and ran.num_seeds == 16
    for field in ("total_timesteps", "learning_rate", "update_epochs", "anneal_lr", "num_envs"):
        assert getattr(ran, field) == settings[field], field
    r, a = jnp.meshgrid(jnp.linspace(0.5, 1.5, 101), jnp.linspace(-2.0, 2.0, 81), indexing="ij")
    assert float(lpo.lpo_drift(net, jnp.log(r), a, ppo_init).min()) >= 0.0
    assert float(jnp.abs(lpo.lpo_drift(net, jnp.zeros(81), a[0], ppo_init)).max()) == 0.0  # r = 1: f = 0
    assert float(jnp.abs(lpo.drift_network(net, jnp.log(r), a, ppo_init)).max()) > 1e-3  # it left the start's zero


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--pop-size", "5", "--env-ids", "CartPole-v1"], "even"),
        (["--drift-hidden", "-4", "--env-ids", "CartPole-v1"], "positive layer sizes"),
        (["--pop-batch", "3", "--env-ids", "CartPole-v1"], "must be positive and divide --pop-size 32"),
        (["--sigma", "-0.1", "0.999", "0.01", "--env-ids", "CartPole-v1"], "--sigma (-0.1, 0.999, 0.01): its start"),
        (["--es-lr", "nan", "1", "0.01", "--env-ids", "CartPole-v1"], "--es-lr (nan, 1.0, 0.01): its start"),
        (["--sigma", "0.1", "1.5", "0.01", "--env-ids", "CartPole-v1"], "factor per generation in (0, 1]"),
        (["--es-beta1", "1", "--env-ids", "CartPole-v1"], "--es-beta1 1.0 must be in [0, 1)"),
        (["--num-rollouts", "0", "--env-ids", "CartPole-v1"], "--num-rollouts 0 must be >= 1"),
        (["--validate-every", "-1", "--env-ids", "CartPole-v1"], "--validate-every -1 must be finite and >= 0"),
        (["--gamma", "2", "--env-ids", "CartPole-v1"], "--gamma 2.0 must be in [0, 1]"),
        (["--learning-rate", "nan", "--eval-drift", "drifts/lpo_classic.msgpack"], "--learning-rate nan must be"),
        (["--drift-start", "hidden", "--no-ppo-init", "--env-ids", "CartPole-v1"], "--drift-start hidden is a start"),
        (["--num-validation-seeds", "0", "--env-ids", "CartPole-v1"], "at least 2"),
        (["--env-id", "Pong-v5"], "CartPole-v1"),
        (["--fitness-shaping", "rank"], "centered_rank"),
        (["--eval-drift", "/nonexistent/drift.msgpack", "--env-id", "CartPole-v1"], "missing"),
        (["--resume", "/nonexistent/run"], "no readable args.json"),
    ],
)
def test_bad_input_is_one_line_and_nonzero_exit(flags, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        lpo.main(tyro.cli(lpo.Args, args=flags))
    code = exit_info.value.code
    message = capsys.readouterr().err + (code if isinstance(code, str) else "")
    assert code == 2 and expected in message, message  # tyro's exit code for usage errors


def test_extreme_log_ratios_give_finite_losses_and_gradients():
    # log r = ±200: exp(-200) is 0 and exp(200) inf in float32; log(exp(-200)) would be -inf (issue 20).
    log_ratio = jnp.array([-200.0, -200.0, 200.0, 200.0, -90.0, 90.0, 0.0])
    advantage = jnp.array([1.5, -1.5, 1.5, -1.5, -1.0, 1.0, 0.3])
    net = lpo.init_drift_params(jax.random.PRNGKey(0), True)
    net = [jax.random.normal(jax.random.PRNGKey(i + 1), w.shape) for i, w in enumerate(net)]
    drifts = {
        "ppo": lpo.ppo_drift,
        "dpo": lpo.dpo_drift,
        "lpo": functools.partial(lpo.lpo_drift, net),
        "lpo-zero": functools.partial(
            lpo.lpo_drift, lpo.init_drift_params(jax.random.PRNGKey(2), False), ppo_init=False
        ),
    }
    for name, drift in drifts.items():
        loss, grad = jax.value_and_grad(lpo.actor_loss)(log_ratio, advantage, drift)
        assert np.isfinite(float(loss)) and bool(jnp.all(jnp.isfinite(grad))), name
        bounded = jnp.clip(log_ratio, -lpo.LOG_RATIO_BOUND, lpo.LOG_RATIO_BOUND)  # what actor_loss passes on
        assert bool(jnp.all(jnp.isfinite(drift(bounded, advantage)))), name


def test_hidden_start_is_ppo_and_its_twins_are_opposite_drifts_where_the_zero_start_twins_are_one():
    """Both LPO starts give f̃ ≡ 0 (generation 0 is PPO). At the zero start f̃(-W) = f̃(W): an antithetic pair is one
    drift and the ES gets no gradient. At the hidden start the pair's drifts are opposite to first order in σ."""
    log_r, advantage = jnp.linspace(-0.5, 0.5, 41)[:, None], jnp.linspace(-2.0, 2.0, 9)[None, :]
    zero = lpo.init_drift_params(jax.random.PRNGKey(0), True, None, "zero")
    hidden = lpo.init_drift_params(jax.random.PRNGKey(0), True, None, "hidden")
    assert [w.shape for w in hidden] == [w.shape for w in zero] == [(8, 128), (128, 1)]
    assert not np.asarray(hidden[1]).any() and 0.25 < float(jnp.std(hidden[0])) * np.sqrt(8) < 1.5  # LeCun: 1/fan-in
    np.testing.assert_array_equal(lpo.lpo_drift(hidden, log_r, advantage), lpo.lpo_drift(zero, log_r, advantage))
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    eps = [1e-3 * jax.random.normal(k, w.shape) for k, w in zip(keys, zero)]

    def twin(net, sign):
        return np.asarray(lpo.drift_network([w + sign * e for w, e in zip(net, eps)], log_r, advantage))

    np.testing.assert_array_equal(twin(zero, 1.0), twin(zero, -1.0))
    plus, minus = twin(hidden, 1.0), twin(hidden, -1.0)
    assert np.abs(plus - minus).max() > 0
    assert np.abs(plus + minus).max() <= 0.05 * np.abs(plus - minus).max()


def test_the_zero_start_first_es_step_is_a_noise_kick_of_about_the_learning_rate():
    """At the zero start every pair's twins score the same, so the ES gradient is zero but for rounding (evosax
    recovers the noise as (x - mean)/σ); Adam scales that residue to a step of about the learning rate in nearly
    every weight: the authors' start moves by noise, not by a gradient (docs/lpo.md). A linear drift's twins
    differ and its step follows the fitness."""
    args = lpo.Args(env_id="CartPole-v1")
    initial = lpo.init_drift_params(jax.random.PRNGKey(1), True)
    es = lpo.make_es(args, initial)
    state = es.init(jax.random.PRNGKey(1), initial, es.default_params)
    population, state = es.ask(jax.random.PRNGKey(2), state, es.default_params)
    half = np.random.default_rng(0).normal(size=args.pop_size // 2)
    fitness = np.concatenate([half, half])  # twins i and i + pop/2: the same drift, the same runs
    state, _ = es.tell(jax.random.PRNGKey(3), population, -fitness, state, es.default_params)
    step = np.concatenate([np.ravel(w) for w in jax.tree.leaves(es.get_mean(state))])
    assert np.median(np.abs(step)) > 0.5 * args.es_lr[0], np.median(np.abs(step))


def test_pop_batch_trains_the_population_in_slices_with_the_one_call_fitness(tmp_path, capsys):
    """--pop-batch 2 of a population of 4: two compiled calls of 2 members each, progress printed between them, and
    the generation's numbers those of one call over all 4 (generations.csv, every column but the seconds)."""
    flags = TINY + ["--num-generations", "1", "--validate-every", "0", "--drift-hidden"]
    rows = {}
    for batch in ([], ["--pop-batch", "2"]):
        run_dir = str(tmp_path / f"batch{len(batch)}")
        lpo.main(tyro.cli(lpo.Args, args=flags + batch + ["--run-dir", run_dir]))
        with open(os.path.join(run_dir, "generations.csv")) as f:
            rows[len(batch)] = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]
    assert "members 2/4 trained" in capsys.readouterr().out
    assert rows[0] == rows[2], rows


def test_an_occupied_run_dir_is_refused_for_meta_training_and_evaluation(tmp_path, capsys):
    """Meta-training and --eval-drift into a directory that holds a run: one line pointing to --resume, exit 2."""
    for name, flags in (("meta", TINY), ("eval", ["--eval-drift", SHIPPED, "--num-seeds", "2"])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "args.json").write_text("{}")
        with pytest.raises(SystemExit) as stop:
            lpo.main(tyro.cli(lpo.Args, args=flags + ["--run-dir", str(tmp_path / name)]))
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and "--resume" in err and len(err.splitlines()) == 1, err
