"""dpo.py's gymnax PPO (and DPO) against PureJaxRL's purejaxrl/ppo.py, at ppo.py's own configuration, same jax.

    git clone https://github.com/luchris429/purejaxrl /tmp/purejaxrl
    python experiments/report_purejaxrl_comparison.py --purejaxrl /tmp/purejaxrl/purejaxrl --num-seeds 8

Both are scored the same way: at each update's last step, the return of each env's last finished training episode
(PureJaxRL's LogWrapper `returned_episode_returns`, dpo.py's `episodic_return`), averaged over the envs; a seed's
score is the mean of that over the last 5% of updates. dpo.py also reports its own final evaluation (128 fresh
episodes, sampled actions). PureJaxRL's code is imported from the checkout, not copied: this script only supplies
stand-ins for what does not import beside jax 0.10 and gymnax 1.0 (distrax's Categorical, chex's type names,
navix) and adapts gymnax 1.0's six-value step to the five values PureJaxRL's wrappers expect.
"""

import dataclasses
import os
import sys
import time
import types
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import dpo  # noqa: E402


@dataclasses.dataclass
class Args:
    purejaxrl: str = "/tmp/purejaxrl/purejaxrl"
    """the purejaxrl/ folder of a PureJaxRL checkout (the one holding ppo.py and wrappers.py)"""
    env_ids: tuple[str, ...] = ("CartPole-v1", "Acrobot-v1", "Breakout-MinAtar")
    """gymnax envs to compare on"""
    minatar_timesteps: int = 1_000_000
    """environment steps for MinAtar envs (classic control envs run ppo.py's 500k)"""
    num_seeds: int = 8
    """seeds per implementation and env"""
    drifts: tuple[Literal["ppo", "dpo"], ...] = ("ppo", "dpo")
    """dpo.py drifts to run beside PureJaxRL's PPO"""
    out: str = "runs/purejaxrl_comparison.json"
    """where the per-seed scores are written (JSON)"""


CONFIG = dict(  # purejaxrl/ppo.py's __main__ configuration (ENV_NAME and TOTAL_TIMESTEPS set per env)
    LR=2.5e-4,
    NUM_ENVS=4,
    NUM_STEPS=128,
    UPDATE_EPOCHS=4,
    NUM_MINIBATCHES=4,
    GAMMA=0.99,
    GAE_LAMBDA=0.95,
    CLIP_EPS=0.2,
    ENT_COEF=0.01,
    VF_COEF=0.5,
    MAX_GRAD_NORM=0.5,
    ACTIVATION="tanh",
    ANNEAL_LR=True,
    DEBUG=False,
)


class Categorical:
    """Stand-in for distrax.Categorical: the three methods ppo.py calls."""

    def __init__(self, logits):
        self.logits = logits

    def sample(self, seed):
        return jax.random.categorical(seed, self.logits)

    def log_prob(self, value):
        log_p = jax.nn.log_softmax(self.logits)
        return jnp.take_along_axis(log_p, value[..., None].astype(jnp.int32), axis=-1)[..., 0]

    def entropy(self):
        log_p = jax.nn.log_softmax(self.logits)
        return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


class FiveValueStep:
    """A gymnax 1.0 env whose step returns (obs, state, reward, terminated or truncated, info), as gymnax 0.0.x
    did and PureJaxRL's wrappers expect. info loses gymnax 1.0's `final_observation`, which ppo.py would stack for
    every step of the run (MinAtar: 1.6 GB per seed at 1M steps) and never reads."""

    def __init__(self, env):
        self._env = env

    def __getattr__(self, name):
        return getattr(self._env, name)

    def step(self, key, state, action, params=None):
        obs, state, reward, terminated, truncated, info = self._env.step(key, state, action, params)
        info = {k: v for k, v in info.items() if k != "final_observation"}
        return obs, state, reward, jnp.logical_or(terminated, truncated), info


class MultivariateNormalDiag:
    """Stand-in for distrax.MultivariateNormalDiag: the three methods dpo_continuous_action.py calls."""

    def __init__(self, loc, scale_diag):
        self.loc, self.scale = loc, scale_diag

    def sample(self, seed):
        return self.loc + self.scale * jax.random.normal(seed, self.loc.shape)

    def log_prob(self, value):
        z = (value - self.loc) / self.scale
        return jnp.sum(-0.5 * z**2 - jnp.log(self.scale) - 0.5 * jnp.log(2 * jnp.pi), axis=-1)

    def entropy(self):
        return jnp.sum(0.5 + 0.5 * jnp.log(2 * jnp.pi) + jnp.log(self.scale) * jnp.ones_like(self.loc), axis=-1)


def import_purejaxrl(folder: str, module: str = "ppo"):
    """purejaxrl/<module>.py from a checkout, with the stand-ins installed; gymnax envs made by the module step with
    five values. Raises SystemExit naming a missing file."""
    if not os.path.exists(os.path.join(folder, f"{module}.py")):
        raise SystemExit(f"error: no {module}.py in {folder}: pass --purejaxrl PATH/TO/purejaxrl/purejaxrl")
    import importlib

    import gymnax

    sys.modules["distrax"] = types.SimpleNamespace(
        Categorical=Categorical, MultivariateNormalDiag=MultivariateNormalDiag
    )
    sys.modules["chex"] = types.SimpleNamespace(Array=jax.Array, PRNGKey=jax.Array)
    sys.modules["navix"] = types.ModuleType("navix")
    sys.path.insert(0, folder)
    loaded = importlib.import_module(module)

    def make_five_value(env_id, **kwargs):
        env, params = gymnax.make(env_id, **kwargs)
        return FiveValueStep(env), params

    loaded.gymnax = types.SimpleNamespace(make=make_five_value)  # the module's only use of gymnax; dpo.py's untouched
    return loaded


def purejaxrl_scores(ppo, env_id: str, total_timesteps: int, num_seeds: int) -> tuple[np.ndarray, float]:
    """Per-seed scores [num_seeds] of ppo.py's make_train and the seconds. The seeds run one after another: vmapped
    (as PureJaxRL's README does), its network initialisation batches LAPACK's QR, which on Breakout-MinAtar hung
    jaxlib 0.10.2's CPU thread pool here."""
    config = dict(CONFIG, ENV_NAME=env_id, TOTAL_TIMESTEPS=total_timesteps)
    train = jax.jit(ppo.make_train(config))
    start = time.time()
    returns = []
    for key in jax.random.split(jax.random.PRNGKey(0), num_seeds):
        out = jax.block_until_ready(train(key))
        returns.append(np.asarray(out["metrics"]["returned_episode_returns"])[:, -1, :].mean(-1))  # [updates]
    return tail_mean(np.stack(returns)), time.time() - start


def dpo_args(env_id: str, total_timesteps: int, num_seeds: int, drift: str) -> dpo.Args:
    """dpo.py's Args at ppo.py's configuration (its defaults for classic control; MinAtar's overridden)."""
    args = dpo.Args(env_id=env_id, drift=drift, num_seeds=num_seeds, total_timesteps=total_timesteps)
    args = dataclasses.replace(
        args,
        num_envs=CONFIG["NUM_ENVS"],
        num_steps=CONFIG["NUM_STEPS"],
        num_unrolls=1,
        num_minibatches=CONFIG["NUM_MINIBATCHES"],
        update_epochs=CONFIG["UPDATE_EPOCHS"],
        learning_rate=CONFIG["LR"],
        anneal_lr=True,
        gamma=CONFIG["GAMMA"],
        ent_coef=CONFIG["ENT_COEF"],
        clip_coef=CONFIG["CLIP_EPS"],
        max_grad_norm=CONFIG["MAX_GRAD_NORM"],
        actor_hidden=(64, 64),
        critic_hidden=(64, 64),
        activation="tanh",
        ppo_loop="purejaxrl",
    )
    return dpo.resolve_args(args)


def train_seeds(args: dpo.Args, drift) -> tuple[dpo.Runner, dict, float]:
    """dpo.py's training of args.num_seeds seeds with drift, chunk by chunk as its CLI runs it, without files.

    Returns the final runners, metrics {name: [num_seeds, num_updates]} and the training seconds.
    """
    init, train_chunk = dpo.make_train(args, drift)
    runners = dpo.init_seeds(init, dpo.seed_keys(args)[0])
    n = dpo.num_updates(args)
    chunk_fn = dpo.over_seeds(train_chunk, args.num_seeds, (0, None))
    start = time.time()
    chunks = []
    done = 0
    while done < n:
        k = min(dpo.max_chunk(args), n - done)
        runners, metrics = jax.block_until_ready(chunk_fn(runners, jnp.int32(k)))
        chunks.append({name: np.asarray(v)[:, :k] for name, v in metrics.items()})
        done += k
    metrics = {name: np.concatenate([c[name] for c in chunks], axis=1) for name in chunks[0]}
    return runners, metrics, time.time() - start


def dpo_scores(args: dpo.Args) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-seed training scores and final evaluations (sampled actions) [num_seeds] of dpo.py, and the seconds."""
    runners, metrics, seconds = train_seeds(args, dpo.make_drift(args))
    final = dpo.evaluate_seeds(args, runners.train_state.params, runners.obs_stats)["final_returns"]
    return tail_mean(metrics["episodic_return"]), np.asarray(final), seconds


def tail_mean(returns: np.ndarray) -> np.ndarray:
    """Mean over the last 5% of updates of returns [seeds, updates] -> [seeds]."""
    k = max(1, returns.shape[1] // 20)
    return np.nanmean(returns[:, -k:], axis=1)


def describe(x: np.ndarray) -> dict:
    """Mean, sample std (ddof 1), IQM and its bootstrap 95% CI (dpo.py's seed_statistics), and the worst of
    per-seed scores x [n]."""
    stats = dpo.seed_statistics(x, "score")
    return dict(
        mean=stats["score_mean"],
        std=stats["score_std"],
        iqm=stats["score_iqm"],
        iqm_ci=stats["score_iqm_ci"],
        min=float(np.min(x)),
        scores=stats["scores"],
    )


def main(args: Args):
    ppo = import_purejaxrl(args.purejaxrl)
    results = {}
    for env_id in args.env_ids:
        steps = args.minatar_timesteps if env_id.endswith("MinAtar") else 500_000
        scores, seconds = purejaxrl_scores(ppo, env_id, steps, args.num_seeds)
        rows = {"purejaxrl ppo.py": dict(describe(scores), seconds=seconds)}
        for drift in args.drifts:
            train, final, seconds = dpo_scores(dpo_args(env_id, steps, args.num_seeds, drift))
            rows[f"dpo.py --drift {drift}"] = dict(describe(train), seconds=seconds, final_eval=describe(final))
        reference = np.asarray(rows["purejaxrl ppo.py"]["scores"])
        for name, row in rows.items():
            if name != "purejaxrl ppo.py":
                row["welch_p_vs_purejaxrl"] = float(scipy.stats.ttest_ind(row["scores"], reference, equal_var=False)[1])
        results[env_id] = dict(total_timesteps=steps, rows=rows)
        for name, row in rows.items():
            ci = row["iqm_ci"]
            print(
                f"{env_id:18s} {name:22s} {row['mean']:8.2f} ± {row['std']:6.2f}  IQM {row['iqm']:8.2f}"
                f" [{ci[0]:.2f}, {ci[1]:.2f}]  min {row['min']:8.2f}  p {row.get('welch_p_vs_purejaxrl', 1.0):.3f}"
                f"  {row['seconds']:.0f} s",
                flush=True,
            )
        dpo.write_json(args.out, dict(num_seeds=args.num_seeds, jax=jax.__version__, results=results))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
