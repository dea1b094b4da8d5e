"""Discovered Policy Optimisation (DPO) and its PPO baseline, end to end in one file.

Mirror Learning writes the policy objective as r·A - f(r, A): the importance ratio r times the
advantage A, minus a "drift" f that is zero, and flat, at r = 1. PPO-clip is one drift (paper eq. 6);
DPO is the closed-form drift that Lu et al. found by meta-learning and then distilled (eq. 9), which
is cautiously optimistic for positive advantages and rolls back too-small ratios for negative ones.
Everything else here is PPO's loop: rollouts from vectorised environments, GAE, epochs of
minibatch Adam with advantage normalisation, observation normalisation and gradient clipping.

Paper: Chris Lu, Jakub Grudzien Kuba, Alistair Letcher, Luke Metz, Christian Schroeder de Witt,
Jakob Foerster, "Discovered Policy Optimisation", NeurIPS 2022, arXiv:2210.05639.
Relative to PPO (Schulman et al. 2017, arXiv:1707.06347) only the drift in `actor_loss` changes;
`--drift ppo` trains the PPO-clip baseline with the same code.

The whole training run is one jit-compiled function (`make_train(args)` returns `train(rng)`),
vmapped over `--num-seeds` seeds and sharded over every available JAX device.

Example:
    python dpo.py --env-id ant                      # the paper's Brax setting (use a GPU)
    python dpo.py --env-id CartPole-v1 --num-seeds 5 --drift ppo
"""

import csv
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable, NamedTuple, Optional, Tuple

# jaxlib 0.10.2 on CPU runs batched LAPACK calls (here: the QR of orthogonal initialisation, batched by
# the vmap over seeds) as tasks on XLA's intra-op thread pool, whose size is the number of cores; when
# every pool thread waits inside such a call the run deadlocks at 0% CPU (seen with 2 cores, 2 seeds and
# the Brax networks). A pool of at least 16 threads leaves spare threads. Must be set before JAX starts
# its CPU backend; it does nothing on GPU.
os.environ.setdefault("NPROC", "16")

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax.training.train_state import TrainState

BRAX_ENVS = (
    "ant", "halfcheetah", "hopper", "humanoid", "humanoidstandup", "inverted_pendulum",
    "inverted_double_pendulum", "pusher", "reacher", "swimmer", "walker2d",
)
CLASSIC_ENVS = ("CartPole-v1", "Acrobot-v1", "MountainCar-v0", "Pendulum-v1", "MountainCarContinuous-v0")
MINATAR_ENVS = (
    "Breakout-MinAtar", "Asterix-MinAtar", "Freeway-MinAtar", "SpaceInvaders-MinAtar", "Seaquest-MinAtar",
)
GYMNAX_ENVS = CLASSIC_ENVS + MINATAR_ENVS
ENV_IDS = BRAX_ENVS + GYMNAX_ENVS
BACKENDS = ("generalized", "positional", "spring", "mjx")
DRIFTS = ("dpo", "ppo")
ACTIVATIONS = ("tanh", "relu", "swish")


@dataclasses.dataclass
class Args:
    # ---- run ----
    exp_name: str = "dpo"
    """name of this experiment, part of the run name"""
    seed: int = 1
    """seed of the experiment; seed i of --num-seeds gets an independent key split from it"""
    num_seeds: int = 1
    """number of independent training runs, vmapped in one process (the paper reports 10)"""
    run_dir: Optional[str] = None
    """where to write results (default: runs/{env_id}__{exp_name}__{drift}__{seed}__{unix time})"""
    track: bool = False
    """log to Weights & Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "dpo"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    tensorboard: bool = False
    """also write TensorBoard event files (tensorboardX) into the run directory"""
    load: Optional[str] = None
    """a run directory (or its params.msgpack) to reload; used with --eval-only"""
    eval_only: bool = False
    """with --load: evaluate the saved policies without training"""
    num_eval_episodes: int = 10
    """episodes of the deterministic (mode-action) evaluation of each seed's final policy"""

    # ---- environment ----
    env_id: str = "ant"
    """Brax: ant, halfcheetah, hopper, humanoid, humanoidstandup, inverted_pendulum, inverted_double_pendulum,
    pusher, reacher, swimmer, walker2d; gymnax: CartPole-v1, Acrobot-v1, MountainCar-v0, Pendulum-v1,
    MountainCarContinuous-v0, Breakout-MinAtar, Asterix-MinAtar, Freeway-MinAtar, SpaceInvaders-MinAtar,
    Seaquest-MinAtar"""
    backend: str = "positional"
    """Brax physics backend: generalized, positional, spring or mjx (ignored for gymnax envs)"""
    episode_length: Optional[int] = None
    """Brax: environment steps before a time-limit truncation (default 1000)"""
    action_repeat: Optional[int] = None
    """Brax: physics steps per agent step (default 1; reacher 4)"""

    # ---- the method ----
    drift: str = "dpo"
    """drift function in the objective r·A - f(r, A): dpo (paper eq. 9) or ppo (eq. 6, = PPO-clip)"""
    dpo_alpha: float = 2.0
    """DPO drift α, the scale of the positive-advantage branch (eq. 9)"""
    dpo_beta: float = 0.6
    """DPO drift β, the scale of the negative-advantage branch (eq. 9)"""
    clip_coef: float = 0.2
    """PPO clipping ε (used by --drift ppo)"""

    # ---- PPO loop (None: the env family's default, printed at start and saved in args.json) ----
    total_timesteps: Optional[int] = None
    """total environment steps per seed (ant: 30M)"""
    num_envs: Optional[int] = None
    """parallel environments per seed"""
    num_steps: Optional[int] = None
    """unroll length: steps per environment in one unroll; GAE bootstraps at each unroll's end"""
    num_unrolls: Optional[int] = None
    """consecutive unrolls per environment per update (Brax's batch_size × num_minibatches / num_envs)"""
    num_minibatches: Optional[int] = None
    """minibatches per epoch"""
    update_epochs: Optional[int] = None
    """epochs over each batch"""
    learning_rate: Optional[float] = None
    """Adam learning rate"""
    anneal_lr: Optional[bool] = None
    """linearly anneal the learning rate to 0 over training"""
    gamma: Optional[float] = None
    """discount factor γ"""
    gae_lambda: Optional[float] = None
    """GAE λ"""
    ent_coef: Optional[float] = None
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient (value loss is 0.5·mean squared error)"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""
    reward_scaling: Optional[float] = None
    """multiply rewards by this before GAE (Brax's reward_scaling); returns are logged unscaled"""
    normalize_observations: Optional[bool] = None
    """normalise observations by running mean and variance"""
    actor_hidden: Optional[Tuple[int, ...]] = None
    """policy MLP hidden sizes"""
    critic_hidden: Optional[Tuple[int, ...]] = None
    """value MLP hidden sizes"""
    activation: Optional[str] = None
    """hidden activation: tanh, relu or swish"""


# Per-family defaults for the None fields above. Brax: the paper's settings (REFERENCES.md, from the
# Brax PPO configs it used; num_unrolls = batch_size × num_minibatches / num_envs) with Brax PPO's
# default networks. Classic control: PureJaxRL's PPO settings. MinAtar: PureJaxRL-style settings.
_BRAX_BASE = dict(
    total_timesteps=50_000_000, num_envs=2048, num_steps=5, num_unrolls=16, num_minibatches=32,
    update_epochs=4, learning_rate=3e-4, anneal_lr=False, gamma=0.97, gae_lambda=0.95, ent_coef=1e-2,
    reward_scaling=1.0, normalize_observations=True, actor_hidden=(32, 32, 32, 32),
    critic_hidden=(256, 256, 256, 256, 256), activation="swish", episode_length=1000, action_repeat=1,
)
ENV_DEFAULTS = {
    "ant": dict(_BRAX_BASE, total_timesteps=30_000_000, reward_scaling=10.0),
    "humanoid": dict(_BRAX_BASE, reward_scaling=0.1, num_steps=10, update_epochs=8, ent_coef=1e-3),
    "halfcheetah": dict(_BRAX_BASE, total_timesteps=100_000_000, num_steps=20, num_unrolls=8, update_epochs=8,
                        gamma=0.95, ent_coef=1e-3),
    "walker2d": dict(_BRAX_BASE, reward_scaling=0.1, num_steps=20, num_unrolls=4, update_epochs=8, ent_coef=1e-3),
    "reacher": dict(_BRAX_BASE, total_timesteps=100_000_000, reward_scaling=5.0, num_steps=50, num_unrolls=4,
                    update_epochs=8, gamma=0.95, ent_coef=1e-3, action_repeat=4),
    # not in the paper's table: Brax PPO settings of the closest listed env
    "hopper": dict(_BRAX_BASE, reward_scaling=0.1, num_steps=20, num_unrolls=4, update_epochs=8, ent_coef=1e-3),
    "humanoidstandup": dict(_BRAX_BASE, total_timesteps=100_000_000, reward_scaling=0.1, num_steps=15,
                            update_epochs=8, learning_rate=6e-4),
    "inverted_pendulum": dict(_BRAX_BASE, total_timesteps=2_000_000),
    "inverted_double_pendulum": dict(_BRAX_BASE, total_timesteps=20_000_000),
    "pusher": dict(_BRAX_BASE, reward_scaling=5.0, num_steps=30, num_unrolls=4, update_epochs=8, gamma=0.95),
    "swimmer": dict(_BRAX_BASE, reward_scaling=0.1, num_steps=20, num_unrolls=4, update_epochs=8, ent_coef=1e-3),
}
_CLASSIC_BASE = dict(
    total_timesteps=500_000, num_envs=4, num_steps=128, num_unrolls=1, num_minibatches=4, update_epochs=4,
    learning_rate=2.5e-4, anneal_lr=True, gamma=0.99, gae_lambda=0.95, ent_coef=0.01, reward_scaling=1.0,
    normalize_observations=False, actor_hidden=(64, 64), critic_hidden=(64, 64), activation="tanh",
)
ENV_DEFAULTS.update({env_id: dict(_CLASSIC_BASE) for env_id in CLASSIC_ENVS})
ENV_DEFAULTS["Pendulum-v1"] = dict(_CLASSIC_BASE, total_timesteps=1_000_000, num_envs=16, num_steps=64,
                                   learning_rate=1e-3, update_epochs=10, num_minibatches=8, gamma=0.95, ent_coef=0.0,
                                   reward_scaling=0.1, normalize_observations=True)
ENV_DEFAULTS["MountainCarContinuous-v0"] = dict(ENV_DEFAULTS["Pendulum-v1"], gamma=0.99)
ENV_DEFAULTS.update({env_id: dict(
    _CLASSIC_BASE, total_timesteps=10_000_000, num_envs=64, num_steps=128, num_minibatches=8, learning_rate=5e-4,
    actor_hidden=(256, 256), critic_hidden=(256, 256), activation="relu",
) for env_id in MINATAR_ENVS})


class ArgsError(ValueError):
    """A user's mistake in the arguments: reported as one line, before anything is compiled."""


def resolve_args(args: Args) -> Args:
    """Fill the None fields with the env family's defaults and check every value.

    Raises:
        ArgsError: unknown env id, backend, drift or activation; a non-positive size; a batch
            (num_envs × num_steps × num_unrolls) that does not divide into --num-minibatches; fewer
            total timesteps than one batch; --eval-only without --load.
    """
    if args.env_id not in ENV_IDS:
        raise ArgsError(f"unknown --env-id {args.env_id!r}; valid: {', '.join(ENV_IDS)}")
    if args.backend not in BACKENDS:
        raise ArgsError(f"unknown --backend {args.backend!r}; valid: {', '.join(BACKENDS)}")
    if args.drift not in DRIFTS:
        raise ArgsError(f"unknown --drift {args.drift!r}; valid: {', '.join(DRIFTS)}")
    filled = {k: v for k, v in ENV_DEFAULTS[args.env_id].items() if getattr(args, k, None) is None}
    filled.setdefault("episode_length", args.episode_length or 1000)
    filled.setdefault("action_repeat", args.action_repeat or 1)
    args = dataclasses.replace(args, **filled)
    if args.activation not in ACTIVATIONS:
        raise ArgsError(f"unknown --activation {args.activation!r}; valid: {', '.join(ACTIVATIONS)}")
    for name in ("num_seeds", "num_eval_episodes", "total_timesteps", "num_envs", "num_steps", "num_unrolls",
                 "num_minibatches", "update_epochs", "episode_length", "action_repeat"):
        if getattr(args, name) <= 0:
            raise ArgsError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("learning_rate", "max_grad_norm", "reward_scaling", "dpo_alpha", "dpo_beta", "clip_coef"):
        if not getattr(args, name) > 0:
            raise ArgsError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not (0 <= args.gamma <= 1 and 0 <= args.gae_lambda <= 1):
        raise ArgsError(f"--gamma and --gae-lambda must lie in [0, 1], got {args.gamma} and {args.gae_lambda}")
    if any(h <= 0 for h in args.actor_hidden + args.critic_hidden):
        raise ArgsError("--actor-hidden and --critic-hidden sizes must be positive")
    batch = batch_size(args)
    if batch % args.num_minibatches:
        raise ArgsError(
            f"batch num_envs × num_steps × num_unrolls = {args.num_envs} × {args.num_steps} × {args.num_unrolls}"
            f" = {batch} does not divide into --num-minibatches {args.num_minibatches}")
    if args.total_timesteps < batch:
        raise ArgsError(f"--total-timesteps {args.total_timesteps} is less than one batch ({batch} steps)")
    if args.eval_only and args.load is None:
        raise ArgsError("--eval-only needs --load RUN_DIR (the run to evaluate)")
    if args.load is not None and not args.eval_only:
        raise ArgsError("--load is for evaluation: add --eval-only (training from loaded parameters is not supported)")
    return args


def batch_size(args: Args) -> int:
    """Environment steps collected per update: num_envs × num_steps × num_unrolls."""
    return args.num_envs * args.num_steps * args.num_unrolls


def num_updates(args: Args) -> int:
    """Updates in a run: total_timesteps // batch_size (the remainder is not trained on)."""
    return args.total_timesteps // batch_size(args)


# --------------------------------------------------------------------------------------------------
# Environments: one small interface over gymnax and Brax, for a single environment (vmap for many).
#   reset(key)              -> (obs, state)
#   step(key, state, action) -> (obs, state, reward, terminated, truncated, final_obs)
# `obs` is already the first observation of the next episode when the episode ended (auto-reset);
# `final_obs` is the true last observation, from which a time-limit truncation is bootstrapped.
# --------------------------------------------------------------------------------------------------
class GymnaxEnv:
    """A gymnax environment (classic control or MinAtar); observations flattened to float vectors."""

    def __init__(self, env_id: str):
        import gymnax
        from gymnax.environments import spaces

        self.env, self.params = gymnax.make(env_id)
        self.obs_dim = int(np.prod(self.env.observation_space(self.params).shape))
        space = self.env.action_space(self.params)
        self.discrete = isinstance(space, spaces.Discrete)
        self.action_dim = int(space.n) if self.discrete else int(np.prod(space.shape))
        self.action_low = None if self.discrete else float(np.min(space.low))
        self.action_high = None if self.discrete else float(np.max(space.high))
        self.max_episode_steps = int(self.params.max_steps_in_episode)

    def reset(self, key):
        obs, state = self.env.reset(key, self.params)
        return obs.reshape(-1).astype(jnp.float32), state

    def step(self, key, state, action):
        obs, state, reward, terminated, truncated, info = self.env.step(key, state, action, self.params)
        final_obs = info["final_observation"].reshape(-1).astype(jnp.float32)
        return (obs.reshape(-1).astype(jnp.float32), state, jnp.squeeze(reward).astype(jnp.float32),
                terminated.astype(jnp.float32), truncated.astype(jnp.float32), final_obs)


class BraxEnv:
    """A Brax environment with a time limit; resets each ended episode from a freshly sampled start."""

    def __init__(self, env_id: str, backend: str, episode_length: int, action_repeat: int):
        from brax import envs
        from brax.envs.wrappers.training import EpisodeWrapper

        base = envs.get_environment(env_id, backend=backend)
        self.env = EpisodeWrapper(base, episode_length, action_repeat)
        self.obs_dim = int(base.observation_size)
        self.discrete = False
        self.action_dim = int(base.action_size)
        self.action_low, self.action_high = -1.0, 1.0
        self.max_episode_steps = math.ceil(episode_length / action_repeat)

    def reset(self, key):
        state = self.env.reset(key)
        return state.obs, state

    def step(self, key, state, action):
        next_state = self.env.step(state, action)
        truncated = next_state.info["truncation"]
        terminated = next_state.done * (1.0 - truncated)
        reset_state = self.env.reset(key)
        state = jax.tree.map(lambda r, n: jnp.where(next_state.done > 0, r, n), reset_state, next_state)
        return state.obs, state, next_state.reward, terminated, truncated, next_state.obs


def make_env(args: Args):
    """The environment named by args.env_id (GymnaxEnv or BraxEnv)."""
    if args.env_id in BRAX_ENVS:
        return BraxEnv(args.env_id, args.backend, args.episode_length, args.action_repeat)
    return GymnaxEnv(args.env_id)


# --------------------------------------------------------------------------------------------------
# Observation normalisation: running mean and variance over every observation seen (Welford/Chan).
# --------------------------------------------------------------------------------------------------
class RunningStats(NamedTuple):
    mean: jax.Array  # [obs_dim]
    var: jax.Array  # [obs_dim]
    count: jax.Array  # scalar


def init_running_stats(obs_dim: int) -> RunningStats:
    return RunningStats(jnp.zeros(obs_dim), jnp.ones(obs_dim), jnp.array(1e-4))


def update_running_stats(stats: RunningStats, batch: jax.Array) -> RunningStats:
    """Merge a batch [..., obs_dim] into the running statistics (Chan et al.'s parallel formula)."""
    batch = batch.reshape(-1, batch.shape[-1])
    n = batch.shape[0]
    batch_mean, batch_var = batch.mean(0), batch.var(0)
    total = stats.count + n
    delta = batch_mean - stats.mean
    mean = stats.mean + delta * n / total
    var = (stats.var * stats.count + batch_var * n + delta**2 * stats.count * n / total) / total
    return RunningStats(mean, var, total)


def normalize(obs: jax.Array, stats: RunningStats, enabled: bool) -> jax.Array:
    """(obs - mean) / sqrt(var + 1e-8), clipped to [-10, 10]; identity when not enabled."""
    if not enabled:
        return obs
    return jnp.clip((obs - stats.mean) / jnp.sqrt(stats.var + 1e-8), -10.0, 10.0)


# --------------------------------------------------------------------------------------------------
# Networks and action distributions.
# --------------------------------------------------------------------------------------------------
class Categorical(NamedTuple):
    """Categorical policy over discrete actions; logits [..., num_actions]."""

    logits: jax.Array

    def sample(self, key):
        return jax.random.categorical(key, self.logits)

    def mode(self):
        return jnp.argmax(self.logits, axis=-1)

    def log_prob(self, action):
        log_p = jax.nn.log_softmax(self.logits)
        return jnp.take_along_axis(log_p, action[..., None].astype(jnp.int32), axis=-1)[..., 0]

    def entropy(self):
        log_p = jax.nn.log_softmax(self.logits)
        return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


class DiagGaussian(NamedTuple):
    """Diagonal Gaussian policy; mean [..., action_dim], log_std [action_dim] (state-independent)."""

    mean: jax.Array
    log_std: jax.Array

    def sample(self, key):
        return self.mean + jnp.exp(self.log_std) * jax.random.normal(key, self.mean.shape)

    def mode(self):
        return self.mean

    def log_prob(self, action):
        z = (action - self.mean) / jnp.exp(self.log_std)
        return jnp.sum(-0.5 * z**2 - self.log_std - 0.5 * jnp.log(2 * jnp.pi), axis=-1)

    def entropy(self):
        return jnp.sum(self.log_std + 0.5 * jnp.log(2 * jnp.pi * jnp.e) * jnp.ones_like(self.mean), axis=-1)


class MLP(nn.Module):
    hidden: Tuple[int, ...]
    out_dim: int
    activation: str
    out_scale: float

    @nn.compact
    def __call__(self, x):
        act = {"tanh": nn.tanh, "relu": nn.relu, "swish": nn.swish}[self.activation]
        for width in self.hidden:
            x = act(nn.Dense(width, kernel_init=nn.initializers.orthogonal(np.sqrt(2)))(x))
        return nn.Dense(self.out_dim, kernel_init=nn.initializers.orthogonal(self.out_scale))(x)


class ActorCritic(nn.Module):
    """Separate policy and value MLPs. __call__(obs [..., obs_dim]) -> (distribution, value [...])."""

    action_dim: int
    discrete: bool
    actor_hidden: Tuple[int, ...]
    critic_hidden: Tuple[int, ...]
    activation: str

    def setup(self):
        self.actor = MLP(self.actor_hidden, self.action_dim, self.activation, 0.01)
        self.critic = MLP(self.critic_hidden, 1, self.activation, 1.0)
        if not self.discrete:
            self.log_std = self.param("log_std", nn.initializers.zeros, (self.action_dim,))

    def __call__(self, obs):
        out = self.actor(obs)
        pi = Categorical(out) if self.discrete else DiagGaussian(out, self.log_std)
        return pi, self.value(obs)

    def value(self, obs):
        return self.critic(obs)[..., 0]


def make_network(args: Args, env) -> ActorCritic:
    return ActorCritic(env.action_dim, env.discrete, tuple(args.actor_hidden), tuple(args.critic_hidden),
                       args.activation)


# --------------------------------------------------------------------------------------------------
# The method: drift functions and the Mirror Learning policy objective.
# --------------------------------------------------------------------------------------------------
def ppo_drift(ratio: jax.Array, advantage: jax.Array, clip_eps: float = 0.2) -> jax.Array:
    """PPO's drift, f(r, A) = ReLU((r - clip(r, 1-ε, 1+ε))·A)  (Lu et al. 2022, eq. 6).

    With it the objective r·A - f equals PPO-clip's min(r·A, clip(r, 1-ε, 1+ε)·A).
    Args: ratio and advantage, any broadcastable shapes; ratio > 0. Returns f, same shape, ≥ 0.
    """
    return jax.nn.relu((ratio - jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)) * advantage)


def dpo_drift(ratio: jax.Array, advantage: jax.Array, alpha: float = 2.0, beta: float = 0.6) -> jax.Array:
    """DPO's discovered drift (Lu et al. 2022, eq. 9).

        A ≥ 0:  f = ReLU((r-1)·A - α·tanh((r-1)·A / α))
        A < 0:  f = ReLU(log(r)·A - β·tanh(log(r)·A / β))

    x - c·tanh(x/c) is ≥ 0 for x ≥ 0 and grows like x³/(3c²) near 0, so f = 0 and ∂f/∂r = 0 at r = 1
    (a valid drift, paper Appendix D). Args: ratio (> 0) and advantage, broadcastable shapes.
    Returns f, same shape, ≥ 0.
    """
    positive = (ratio - 1.0) * advantage
    negative = jnp.log(ratio) * advantage
    return jnp.where(
        advantage >= 0,
        jax.nn.relu(positive - alpha * jnp.tanh(positive / alpha)),
        jax.nn.relu(negative - beta * jnp.tanh(negative / beta)),
    )


def actor_loss(ratio: jax.Array, advantage: jax.Array, drift: Callable) -> jax.Array:
    """Mirror Learning policy loss, -mean(r·A - f(r, A))  (Lu et al. 2022, eq. 5).

    Args: ratio π(a|s)/π_old(a|s) [batch], advantage [batch] (already normalised), drift f(r, A).
    Returns a scalar to minimise.
    """
    return -jnp.mean(ratio * advantage - drift(ratio, advantage))


def make_drift(args: Args) -> Callable:
    """The drift f(r, A) chosen by --drift, with its coefficients bound."""
    if args.drift == "ppo":
        return lambda r, a: ppo_drift(r, a, args.clip_coef)
    return lambda r, a: dpo_drift(r, a, args.dpo_alpha, args.dpo_beta)


def compute_gae(rewards, values, next_values, terminated, cuts, gamma: float, gae_lambda: float):
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438, eq. 16), by reverse scan.

        δ_t = r_t + γ·(1 - terminated_t)·V(s'_t) - V(s_t)
        A_t = δ_t + γ·λ·(1 - cut_t)·A_{t+1}

    s'_t is the true next state, so a time-limit truncation bootstraps from the value of the final
    state, and only a real termination drops the bootstrap. `cut_t` is 1 where the trace stops: at
    episode ends (terminated or truncated) and at the last step of an unroll.
    Args: all arrays [T, num_envs]. Returns (advantages, returns = advantages + values), both [T, num_envs].
    """
    def backward(next_advantage, step):
        reward, value, next_value, term, cut = step
        delta = reward + gamma * (1.0 - term) * next_value - value
        advantage = delta + gamma * gae_lambda * (1.0 - cut) * next_advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(backward, jnp.zeros_like(values[0]),
                                 (rewards, values, next_values, terminated, cuts), reverse=True)
    return advantages, advantages + values


# --------------------------------------------------------------------------------------------------
# Training: make_train(args) returns a pure train(rng) for one seed; jit and vmap it over seeds.
# --------------------------------------------------------------------------------------------------
class Transition(NamedTuple):
    obs: jax.Array  # [num_envs, obs_dim], raw (unnormalised)
    action: jax.Array  # [num_envs] or [num_envs, action_dim], as sampled (before clipping to bounds)
    log_prob: jax.Array  # [num_envs], under the behaviour policy
    value: jax.Array  # [num_envs], V(s_t)
    next_value: jax.Array  # [num_envs], V(s'_t) of the true next state
    reward: jax.Array  # [num_envs], scaled by reward_scaling
    terminated: jax.Array  # [num_envs], 1.0 on a real termination
    done: jax.Array  # [num_envs], 1.0 when the episode ended (terminated or truncated)


class EpisodeStats(NamedTuple):
    episode_return: jax.Array  # [num_envs], unscaled return of the running episode
    last_return: jax.Array  # [num_envs], return of the last finished episode
    finished: jax.Array  # [num_envs], episodes finished so far


class RunnerState(NamedTuple):
    train_state: TrainState
    obs_stats: RunningStats
    env_state: Any
    obs: jax.Array
    episodes: EpisodeStats
    rng: jax.Array


class TrainOutput(NamedTuple):
    params: Any  # network parameters after training
    obs_stats: RunningStats  # observation-normalisation statistics that go with them
    metrics: dict  # name -> [num_updates]


def make_train(args: Args, log_fn: Optional[Callable[[dict], None]] = None) -> Callable:
    """Build the whole training run for one seed as a pure function.

    Args:
        args: resolved arguments (see `resolve_args`).
        log_fn: if given, called on the host after every update with a dict of scalars
            (global_step, episodic_return, policy_loss, value_loss, entropy, approx_kl) through
            jax.debug.callback; under vmap it is called once per seed.
    Returns:
        train(rng) -> TrainOutput, with rng a PRNG key; jit it, and vmap it over keys for seeds.
        metrics hold per update: global_step (env steps), episodic_return (mean over envs of the
        last finished episode's unscaled return, NaN before any finished), policy_loss,
        value_loss, entropy and approx_kl (means over epochs and minibatches).
    """
    env = make_env(args)
    network = make_network(args, env)
    drift = make_drift(args)
    n_updates = num_updates(args)
    n_batch = batch_size(args)
    rollout_len = args.num_steps * args.num_unrolls
    obs_norm = args.normalize_observations

    def clip_action(action):
        return action if env.discrete else jnp.clip(action, env.action_low, env.action_high)

    if args.anneal_lr:
        learning_rate = optax.linear_schedule(
            args.learning_rate, 0.0, n_updates * args.update_epochs * args.num_minibatches)
    else:
        learning_rate = args.learning_rate
    tx = optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.adam(learning_rate, eps=1e-5))

    def env_step(runner: RunnerState, _):
        """One step of every environment under the current policy."""
        rng, key_action, key_env = jax.random.split(runner.rng, 3)
        params = runner.train_state.params
        pi, value = network.apply(params, normalize(runner.obs, runner.obs_stats, obs_norm))
        action = pi.sample(key_action)
        log_prob = pi.log_prob(action)
        env_keys = jax.random.split(key_env, args.num_envs)
        obs, env_state, reward, terminated, truncated, final_obs = jax.vmap(env.step)(
            env_keys, runner.env_state, clip_action(action))
        next_value = network.apply(params, normalize(final_obs, runner.obs_stats, obs_norm),
                                   method=ActorCritic.value)
        done = jnp.maximum(terminated, truncated)
        episode_return = runner.episodes.episode_return + reward
        episodes = EpisodeStats(
            episode_return=episode_return * (1.0 - done),
            last_return=jnp.where(done > 0, episode_return, runner.episodes.last_return),
            finished=runner.episodes.finished + done,
        )
        transition = Transition(runner.obs, action, log_prob, value, next_value,
                                reward * args.reward_scaling, terminated, done)
        return runner._replace(env_state=env_state, obs=obs, episodes=episodes, rng=rng), transition

    def loss_fn(params, obs_stats, minibatch):
        traj, advantages, returns = minibatch
        pi, value = network.apply(params, normalize(traj.obs, obs_stats, obs_norm))
        log_ratio = pi.log_prob(traj.action) - traj.log_prob
        ratio = jnp.exp(log_ratio)
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        policy_loss = actor_loss(ratio, advantages, drift)
        value_loss = 0.5 * jnp.mean((value - returns) ** 2)
        entropy = jnp.mean(pi.entropy())
        total = policy_loss + args.vf_coef * value_loss - args.ent_coef * entropy
        approx_kl = jnp.mean(ratio - 1.0 - log_ratio)  # Schulman's low-variance KL(π_old || π) estimator
        return total, (policy_loss, value_loss, entropy, approx_kl)

    def update_minibatch(train_state, minibatch, obs_stats):
        grads, aux = jax.grad(loss_fn, has_aux=True)(train_state.params, obs_stats, minibatch)
        return train_state.apply_gradients(grads=grads), aux

    def update_epoch(carry, _):
        train_state, obs_stats, batch, rng = carry
        rng, key = jax.random.split(rng)
        permutation = jax.random.permutation(key, n_batch)
        minibatches = jax.tree.map(
            lambda x: jnp.take(x, permutation, axis=0).reshape((args.num_minibatches, -1) + x.shape[1:]), batch)
        train_state, aux = jax.lax.scan(lambda ts, mb: update_minibatch(ts, mb, obs_stats), train_state, minibatches)
        return (train_state, obs_stats, batch, rng), aux

    def update(runner: RunnerState, update_index):
        runner, traj = jax.lax.scan(env_step, runner, None, rollout_len)  # leaves [T, num_envs, ...]
        unroll_end = (jnp.arange(rollout_len) % args.num_steps == args.num_steps - 1).astype(jnp.float32)
        cuts = jnp.maximum(traj.done, unroll_end[:, None])
        advantages, returns = compute_gae(traj.reward, traj.value, traj.next_value, traj.terminated, cuts,
                                          args.gamma, args.gae_lambda)
        batch = jax.tree.map(lambda x: x.reshape((n_batch,) + x.shape[2:]), (traj, advantages, returns))
        rng, key = jax.random.split(runner.rng)
        (train_state, _, _, _), aux = jax.lax.scan(
            update_epoch, (runner.train_state, runner.obs_stats, batch, key), None, args.update_epochs)
        # Statistics change after the epochs, so the ratio is exactly 1 at each update's first step.
        obs_stats = update_running_stats(runner.obs_stats, traj.obs) if obs_norm else runner.obs_stats
        policy_loss, value_loss, entropy, approx_kl = jax.tree.map(jnp.mean, aux)
        eps = runner.episodes
        episodic_return = jnp.where(
            jnp.any(eps.finished > 0),
            jnp.sum(jnp.where(eps.finished > 0, eps.last_return, 0.0)) / jnp.maximum(jnp.sum(eps.finished > 0), 1),
            jnp.nan)
        metrics = dict(global_step=(update_index + 1) * n_batch, episodic_return=episodic_return,
                       policy_loss=policy_loss, value_loss=value_loss, entropy=entropy, approx_kl=approx_kl)
        if log_fn is not None:
            jax.debug.callback(log_fn, metrics)
        return runner._replace(train_state=train_state, obs_stats=obs_stats, rng=rng), metrics

    def train(rng) -> TrainOutput:
        rng, key_init, key_reset = jax.random.split(rng, 3)
        params = network.init(key_init, jnp.zeros((1, env.obs_dim)))
        train_state = TrainState.create(apply_fn=network.apply, params=params, tx=tx)
        obs, env_state = jax.vmap(env.reset)(jax.random.split(key_reset, args.num_envs))
        zeros = jnp.zeros(args.num_envs)
        runner = RunnerState(train_state, init_running_stats(env.obs_dim), env_state, obs,
                             EpisodeStats(zeros, zeros, zeros), rng)
        runner, metrics = jax.lax.scan(update, runner, jnp.arange(n_updates))
        return TrainOutput(runner.train_state.params, runner.obs_stats, metrics)

    return train


def make_evaluate(args: Args) -> Callable:
    """Deterministic evaluation: evaluate(params, obs_stats, rng) -> mean return (scalar).

    Runs --num-eval-episodes episodes in parallel with the policy's mode action, each to its end
    or to the time limit, and averages their unscaled returns. Pure; jit and vmap it over seeds.
    """
    env = make_env(args)
    network = make_network(args, env)
    n = args.num_eval_episodes

    def evaluate(params, obs_stats, rng):
        rng, key_reset = jax.random.split(rng)
        obs, env_state = jax.vmap(env.reset)(jax.random.split(key_reset, n))

        def step(carry, _):
            obs, env_state, episode_return, alive, rng = carry
            rng, key = jax.random.split(rng)
            pi, _ = network.apply(params, normalize(obs, obs_stats, args.normalize_observations))
            action = pi.mode()
            if not env.discrete:
                action = jnp.clip(action, env.action_low, env.action_high)
            obs, env_state, reward, terminated, truncated, _ = jax.vmap(env.step)(
                jax.random.split(key, n), env_state, action)
            episode_return = episode_return + reward * alive
            alive = alive * (1.0 - jnp.maximum(terminated, truncated))
            return (obs, env_state, episode_return, alive, rng), None

        init = (obs, env_state, jnp.zeros(n), jnp.ones(n), rng)
        (_, _, episode_return, _, _), _ = jax.lax.scan(step, init, None, env.max_episode_steps)
        return episode_return.mean()

    return evaluate


# --------------------------------------------------------------------------------------------------
# Running many seeds over every device, logging, saving, loading, plotting.
# --------------------------------------------------------------------------------------------------
def seed_keys(args: Args):
    """(train keys [num_seeds, 2], evaluation keys [num_seeds, 2]) derived from --seed."""
    key_train, key_eval = jax.random.split(jax.random.PRNGKey(args.seed))
    return jax.random.split(key_train, args.num_seeds), jax.random.split(key_eval, args.num_seeds)


def over_devices(fn: Callable, num_seeds: int) -> Callable:
    """jit(vmap(fn)) with the seed axis of every argument and output sharded over the JAX devices.

    Uses the largest number of devices that divides num_seeds (all of them when it divides).
    """
    devices = jax.devices()
    n = math.gcd(num_seeds, len(devices))
    if n == 1:
        return jax.jit(jax.vmap(fn))
    mesh = jax.sharding.Mesh(np.array(devices[:n]), ("seed",))
    spec = jax.sharding.PartitionSpec("seed")
    return jax.jit(jax.shard_map(jax.vmap(fn), mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))


class MetricsLogger:
    """Host-side sink for per-update metrics from inside the compiled loop.

    Gathers one update's values from all seeds, then appends a row (means and stds over seeds,
    steps per second) to metrics.csv, prints a progress line every few percent, and forwards to
    TensorBoard / wandb when enabled.
    """

    FIELDS = ("global_step", "episodic_return_mean", "episodic_return_std", "policy_loss", "value_loss",
              "entropy", "approx_kl", "sps")

    def __init__(self, path: str, num_seeds: int, n_updates: int, batch: int, writer=None, wandb_run=None):
        self.path, self.num_seeds, self.n_updates, self.batch = path, num_seeds, n_updates, batch
        self.writer, self.wandb_run = writer, wandb_run
        self.pending: dict = {}
        self.rows: list = []
        self.print_every = max(1, n_updates // 20)
        with open(path, "w", newline="") as f:
            csv.writer(f).writerow(self.FIELDS)
        self.start()

    def start(self):
        self.t_start = self.t_last = time.time()

    def __call__(self, metrics: dict):
        step = int(metrics["global_step"])
        values = self.pending.setdefault(step, [])
        values.append({k: float(v) for k, v in metrics.items()})
        if len(values) == self.num_seeds:
            self.write(step, self.pending.pop(step))

    def write(self, step: int, per_seed: list):
        now = time.time()
        returns = np.array([m["episodic_return"] for m in per_seed])
        finished = returns[np.isfinite(returns)]
        row = dict(
            global_step=step,
            episodic_return_mean=float(finished.mean()) if finished.size else float("nan"),
            episodic_return_std=float(finished.std()) if finished.size else float("nan"),
            sps=self.batch * self.num_seeds / max(now - self.t_last, 1e-9),
            **{k: float(np.mean([m[k] for m in per_seed])) for k in ("policy_loss", "value_loss", "entropy",
                                                                     "approx_kl")},
        )
        self.t_last = now
        self.rows.append(row)
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([row[k] for k in self.FIELDS])
        update = step // self.batch
        if update % self.print_every == 0 or update == self.n_updates:
            elapsed = now - self.t_start
            print(f"update {update}/{self.n_updates}  step {step:,}  return {row['episodic_return_mean']:.2f}"
                  f" ± {row['episodic_return_std']:.2f}  SPS {step * self.num_seeds / max(elapsed, 1e-9):,.0f}"
                  f"  ({elapsed:.0f}s)", flush=True)
        scalars = {f"charts/{k}": row[k] for k in ("episodic_return_mean", "episodic_return_std", "sps")}
        scalars.update({f"losses/{k}": row[k] for k in ("policy_loss", "value_loss", "entropy", "approx_kl")})
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)


def atomic_write(path: str, data: bytes):
    """Write bytes to path via a temporary file and a rename, so a crash never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, obj: dict):
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def save_params(path: str, params, obs_stats: RunningStats):
    """Save stacked parameters (leading axis: seed) and normalisation statistics as msgpack."""
    state = {"params": flax.serialization.to_state_dict(params), "obs_stats": obs_stats._asdict()}
    state = jax.tree.map(np.asarray, state)
    atomic_write(path, flax.serialization.msgpack_serialize(state))


def args_from_json(path: str) -> Args:
    with open(path) as f:
        saved = json.load(f)
    fields = {f.name for f in dataclasses.fields(Args)}
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields}
    return Args(**saved)


def load_run(path: str) -> Tuple[Args, Any, RunningStats]:
    """Load a saved run: (its resolved Args, stacked params, obs_stats).

    Args: path, a run directory or the params.msgpack inside one.
    Raises: ArgsError when the directory, args.json or params.msgpack is missing or damaged.
    """
    run_dir = path if os.path.isdir(path) else os.path.dirname(path) or "."
    params_path = path if not os.path.isdir(path) else os.path.join(run_dir, "params.msgpack")
    args_path = os.path.join(run_dir, "args.json")
    for p in (params_path, args_path):
        if not os.path.isfile(p):
            raise ArgsError(f"--load {path}: {p} not found (expected a run directory written by dpo.py)")
    try:
        saved_args = resolve_args(dataclasses.replace(args_from_json(args_path), load=None, eval_only=False))
    except (json.JSONDecodeError, TypeError, ArgsError) as e:
        raise ArgsError(f"--load {path}: damaged args.json ({e})") from None
    env = make_env(saved_args)
    template = jax.eval_shape(lambda k: make_network(saved_args, env).init(k, jnp.zeros((1, env.obs_dim))),
                              jax.random.PRNGKey(0))
    try:
        with open(params_path, "rb") as f:
            state = flax.serialization.msgpack_restore(f.read())
        params = flax.serialization.from_state_dict(template, state["params"])
        obs_stats = RunningStats(**{k: jnp.asarray(state["obs_stats"][k]) for k in RunningStats._fields})
        shapes_ok = jax.tree.all(jax.tree.map(lambda t, x: tuple(x.shape[1:]) == tuple(t.shape), template, params))
        if not shapes_ok or obs_stats.mean.shape[-1:] != (env.obs_dim,):
            raise ValueError("parameter shapes do not match the saved arguments")
    except Exception as e:  # msgpack, key and shape errors all mean the same thing to the user
        raise ArgsError(f"--load {path}: damaged or incompatible params.msgpack ({type(e).__name__}: {e})") from None
    params = jax.tree.map(jnp.asarray, params)
    return saved_args, params, obs_stats


def plot_learning_curve(path: str, rows: list, title: str):
    """PNG of the mean episodic return over seeds against env steps, with a ±1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["global_step"] for r in rows], dtype=float)
    mean = np.array([r["episodic_return_mean"] for r in rows])
    std = np.array([r["episodic_return_std"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, mean, label="mean over seeds")
    ax.fill_between(steps, mean - std, mean + std, alpha=0.3, label="± 1 std")
    ax.set_xlabel("environment steps (per seed)")
    ax.set_ylabel("episodic return")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def default_run_dir(args: Args) -> str:
    return os.path.join("runs", f"{args.env_id}__{args.exp_name}__{args.drift}__{args.seed}__{int(time.time())}")


def evaluate_seeds(args: Args, params, obs_stats, eval_keys) -> np.ndarray:
    """Deterministic evaluation return of each seed's policy: [num_seeds]."""
    return np.asarray(over_devices(make_evaluate(args), args.num_seeds)(params, obs_stats, eval_keys))


def run_eval_only(args: Args) -> str:
    saved_args, params, obs_stats = load_run(args.load)
    saved_args = dataclasses.replace(saved_args, num_eval_episodes=args.num_eval_episodes)
    run_dir = args.run_dir or default_run_dir(dataclasses.replace(saved_args, exp_name="eval"))
    os.makedirs(run_dir, exist_ok=True)
    _, eval_keys = seed_keys(saved_args)
    start = time.time()
    returns = evaluate_seeds(saved_args, params, obs_stats, eval_keys)
    summary = dict(loaded_from=os.path.abspath(args.load), env_id=saved_args.env_id, drift=saved_args.drift,
                   num_seeds=saved_args.num_seeds, num_eval_episodes=saved_args.num_eval_episodes,
                   final_return_mean=float(returns.mean()), final_return_std=float(returns.std()),
                   final_returns=returns.tolist(), wall_seconds=time.time() - start)
    write_json(os.path.join(run_dir, "summary.json"), summary)
    print(f"evaluation of {args.load}: return {returns.mean():.2f} ± {returns.std():.2f} over "
          f"{saved_args.num_seeds} seeds")
    return run_dir


def run_training(args: Args) -> str:
    run_dir = args.run_dir or default_run_dir(args)
    os.makedirs(run_dir, exist_ok=True)
    write_json(os.path.join(run_dir, "args.json"), dataclasses.asdict(args))
    writer = wandb_run = None
    if args.tensorboard:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(run_dir)
    if args.track:
        try:
            import wandb
        except ImportError:
            raise ArgsError("--track needs wandb: pip install wandb") from None
        wandb_run = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=dataclasses.asdict(args),
                               name=os.path.basename(run_dir), dir=run_dir)
    n_updates = num_updates(args)
    print(f"{args.env_id} ({'Brax ' + args.backend if args.env_id in BRAX_ENVS else 'gymnax'}), drift {args.drift}, "
          f"{args.num_seeds} seed(s) on {len(jax.devices())} {jax.default_backend()} device(s): {n_updates} updates of "
          f"{batch_size(args):,} steps per seed")
    logger = MetricsLogger(os.path.join(run_dir, "metrics.csv"), args.num_seeds, n_updates, batch_size(args),
                           writer, wandb_run)
    train_keys, eval_keys = seed_keys(args)
    start = time.time()
    train = over_devices(make_train(args, log_fn=logger), args.num_seeds).lower(train_keys).compile()
    print(f"compiled in {time.time() - start:.1f}s", flush=True)
    logger.start()
    out = jax.block_until_ready(train(train_keys))
    train_seconds = time.time() - logger.t_start
    save_params(os.path.join(run_dir, "params.msgpack"), out.params, out.obs_stats)
    returns = evaluate_seeds(args, out.params, out.obs_stats, eval_keys)
    if logger.rows:
        plot_learning_curve(os.path.join(run_dir, "learning_curve.png"), logger.rows,
                            f"{args.env_id}, drift {args.drift}, {args.num_seeds} seed(s)")
    summary = dict(
        env_id=args.env_id, drift=args.drift, total_timesteps=num_updates(args) * batch_size(args),
        num_seeds=args.num_seeds, final_return_mean=float(returns.mean()), final_return_std=float(returns.std()),
        final_returns=returns.tolist(), num_eval_episodes=args.num_eval_episodes,
        final_episodic_return_mean=logger.rows[-1]["episodic_return_mean"] if logger.rows else None,
        train_seconds=train_seconds, sps=num_updates(args) * batch_size(args) * args.num_seeds / train_seconds,
        wall_seconds=time.time() - start, device=f"{len(jax.devices())} x {jax.devices()[0].device_kind}",
    )
    write_json(os.path.join(run_dir, "summary.json"), summary)
    if writer is not None:
        writer.close()
    if wandb_run is not None:
        wandb_run.finish()
    print(f"final deterministic return {returns.mean():.2f} ± {returns.std():.2f} over {args.num_seeds} seed(s)"
          f" ({args.num_eval_episodes} episodes each); {train_seconds:.0f}s training")
    return run_dir


def main(args: Args) -> str:
    """Train (or with --load --eval-only, evaluate) and write the run directory; returns its path."""
    try:
        args = resolve_args(args)
        run_dir = run_eval_only(args) if args.eval_only else run_training(args)
    except ArgsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"run directory: {run_dir}")
    return run_dir


if __name__ == "__main__":
    main(tyro.cli(Args))
