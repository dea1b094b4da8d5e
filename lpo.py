"""Learned Policy Optimisation (LPO): meta-learn the drift of Mirror Learning with evolution strategies.

Mirror Learning writes the policy objective as r·A - f(r, A), ratio r times advantage A minus a drift
f that is zero, and flat, at r = 1. LPO makes f a small neural network of (r, A) and searches its weights
with OpenAI-ES, where the fitness of a candidate drift is the return an agent reaches after a whole
PPO-style training run that uses it; the learned drift is then used to train agents on unseen
environments, and drawn to see what was learned (which inspired DPO's closed form).

Paper: Chris Lu, Jakub Grudzien Kuba, Alistair Letcher, Luke Metz, Christian Schroeder de Witt,
Jakob Foerster, "Discovered Policy Optimisation", NeurIPS 2022, arXiv:2210.05639 (sections 4-5, App. A.2).
Relative to dpo.py (same inner loop, line for line), the drift is `lpo_drift(params, r, A)`, a network
whose parameters are an input of `train(rng, drift_params)`, and an ES outer loop drives it.

Example:
    python lpo.py --env-id ant                                          # the paper's meta-training (GPUs)
    python lpo.py --env-id CartPole-v1 --pop-size 8 --num-generations 20 --total-timesteps 50000
    python lpo.py --eval-drift runs/<run> --env-id Breakout-MinAtar     # transfer: LPO vs DPO vs PPO
"""

import csv
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from typing import Any, Callable, NamedTuple, Optional, Tuple

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax.training.train_state import TrainState
from jax.flatten_util import ravel_pytree

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
FITNESS_SHAPINGS = ("centered_rank", "z_score")
XI = 1e-6  # ξ of the LPO drift: the ReLU's margin that keeps f = 0 and ∂f/∂r = 0 at r = 1
ACTIVATIONS = ("tanh", "relu", "swish")


@dataclasses.dataclass
class Args:
    # ---- run ----
    exp_name: str = "lpo"
    """name of this experiment, part of the run name"""
    seed: int = 1
    """seed of the experiment; seed i of --num-seeds gets an independent key split from it"""
    num_seeds: int = 10
    """--eval-drift: training runs per drift, vmapped in one process (the paper reports 10)"""
    run_dir: Optional[str] = None
    """where to write results (default: runs/{env_id}__{exp_name}__{seed}__{unix time})"""
    resume: Optional[str] = None
    """continue meta-training from the last checkpoint of this run directory (its saved arguments are used;
    --num-generations may extend it)"""
    eval_drift: Optional[str] = None
    """train fresh agents on --env-id with this learned drift (a run directory, meaning its best drift, or a
    drift .msgpack file), with DPO and with PPO, same seeds, and compare"""
    plot_drift: Optional[str] = None
    """draw this learned drift (run directory or drift file) beside PPO's and DPO's, then exit"""
    track: bool = False
    """log to Weights & Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "lpo"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    tensorboard: bool = False
    """also write TensorBoard event files (tensorboardX) into the run directory (per generation)"""
    num_eval_episodes: int = 10
    """episodes of the deterministic (mode-action) evaluation of a final policy (the fitness, and --eval-drift)"""

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
    ppo_init: bool = True
    """LPO: one hidden layer of 128 tanh units on top of PPO's drift (eq. 8); --no-ppo-init: LPO-Zero, two
    hidden layers of 256 ReLU units and no PPO term"""
    dpo_alpha: float = 2.0
    """DPO drift α, the scale of the positive-advantage branch (eq. 9)"""
    dpo_beta: float = 0.6
    """DPO drift β, the scale of the negative-advantage branch (eq. 9)"""
    clip_coef: float = 0.2
    """PPO clipping ε (PPO's drift, and the PPO term of LPO's)"""

    # ---- evolution strategies (outer loop) ----
    pop_size: int = 32
    """ES population size (even: antithetic pairs); must divide over the JAX devices"""
    num_generations: Optional[int] = None
    """ES generations (default 672, the paper's; on --resume, the saved run's unless given)"""
    num_rollouts: int = 1
    """inner-loop training runs (seeds) averaged into one member's fitness; shared by all members"""
    sigma_init: float = 0.04
    """initial ES noise scale σ"""
    sigma_decay: float = 0.999
    """σ multiplier per generation"""
    sigma_limit: float = 0.01
    """floor of σ"""
    es_learning_rate: float = 0.01
    """Adam learning rate of the ES mean"""
    fitness_shaping: str = "centered_rank"
    """fitness shaping: centered_rank or z_score"""
    save_every: int = 10
    """write a checkpoint (and drift pictures) every this many generations, and at the end"""

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
        ArgsError: unknown env id, backend, fitness shaping or activation; a non-positive size; a batch
            (num_envs × num_steps × num_unrolls) that does not divide into --num-minibatches; fewer
            total timesteps than one batch; an odd population or one that does not divide over the devices.
    """
    if args.env_id not in ENV_IDS:
        raise ArgsError(f"unknown --env-id {args.env_id!r}; valid: {', '.join(ENV_IDS)}")
    if args.backend not in BACKENDS:
        raise ArgsError(f"unknown --backend {args.backend!r}; valid: {', '.join(BACKENDS)}")
    if args.fitness_shaping not in FITNESS_SHAPINGS:
        raise ArgsError(f"unknown --fitness-shaping {args.fitness_shaping!r}; valid: {', '.join(FITNESS_SHAPINGS)}")
    if args.pop_size <= 0 or args.pop_size % 2:
        raise ArgsError(f"--pop-size must be positive and even (antithetic pairs), got {args.pop_size}")
    if args.eval_drift is None and args.pop_size % jax.device_count():  # only meta-training shards the population
        raise ArgsError(f"--pop-size {args.pop_size} does not divide over the {jax.device_count()} JAX devices")
    if args.num_generations is None:
        args = dataclasses.replace(args, num_generations=672)
    filled = {k: v for k, v in ENV_DEFAULTS[args.env_id].items() if getattr(args, k, None) is None}
    filled.setdefault("episode_length", args.episode_length or 1000)
    filled.setdefault("action_repeat", args.action_repeat or 1)
    args = dataclasses.replace(args, **filled)
    if args.activation not in ACTIVATIONS:
        raise ArgsError(f"unknown --activation {args.activation!r}; valid: {', '.join(ACTIVATIONS)}")
    for name in ("num_seeds", "num_eval_episodes", "num_generations", "num_rollouts", "save_every", "total_timesteps", "num_envs", "num_steps", "num_unrolls",
                 "num_minibatches", "update_epochs", "episode_length", "action_repeat"):
        if getattr(args, name) <= 0:
            raise ArgsError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("learning_rate", "max_grad_norm", "reward_scaling", "dpo_alpha", "dpo_beta", "clip_coef",
                 "sigma_init", "sigma_decay", "sigma_limit", "es_learning_rate"):
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
    if args.resume is None and sum(x is not None for x in (args.eval_drift, args.plot_drift)) > 1:
        raise ArgsError("give one of --eval-drift and --plot-drift")
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


def orthogonal(scale: float):
    """Flax's orthogonal initialiser with its QR written as Gram-Schmidt in plain jnp operations.

    Here parameters are initialised inside the vmap over seeds and members, and jaxlib 0.10.2 on CPU can deadlock
    when batched LAPACK calls (a vmapped QR) fill XLA's intra-op thread pool. Gram-Schmidt gives the Q of the QR
    with a positive diagonal of R, which is the Q that flax returns after its sign correction.
    """
    def init(key, shape, dtype=jnp.float32):
        n_rows, n_cols = int(np.prod(shape[:-1])), shape[-1]
        a = jax.random.normal(key, (max(n_rows, n_cols), min(n_rows, n_cols)), dtype)

        def column(i, q):  # q's columns from i on are still zero; project twice for accuracy
            v = a[:, i] - q @ (q.T @ a[:, i])
            v = v - q @ (q.T @ v)
            return q.at[:, i].set(v / jnp.linalg.norm(v))

        q = jax.lax.fori_loop(0, a.shape[1], column, jnp.zeros_like(a))
        return scale * (q.T if n_rows < n_cols else q).reshape(shape)

    return init


class MLP(nn.Module):
    hidden: Tuple[int, ...]
    out_dim: int
    activation: str
    out_scale: float

    @nn.compact
    def __call__(self, x):
        act = {"tanh": nn.tanh, "relu": nn.relu, "swish": nn.swish}[self.activation]
        for width in self.hidden:
            x = act(nn.Dense(width, kernel_init=orthogonal(np.sqrt(2)))(x))
        return nn.Dense(self.out_dim, kernel_init=orthogonal(self.out_scale))(x)


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


def lpo_features(ratio: jax.Array, advantage: jax.Array) -> jax.Array:
    """The drift network's input x(r, A) (Lu et al. 2022, section 4.1): 8 features, all 0 at r = 1.

    [1-r, (1-r)², (1-r)·A, (1-r)²·A, log r, (log r)², log(r)·A, (log r)²·A].
    Args: ratio (> 0) and advantage, broadcastable shapes [...]. Returns [..., 8].
    """
    ratio, advantage = jnp.broadcast_arrays(ratio, advantage)
    u, v = 1.0 - ratio, jnp.log(ratio)
    return jnp.stack([u, u**2, u * advantage, u**2 * advantage, v, v**2, v * advantage, v**2 * advantage], axis=-1)


def drift_layer_sizes(ppo_init: bool) -> Tuple[int, ...]:
    """LPO: 8 → 128 → 1 (tanh); LPO-Zero: 8 → 256 → 256 → 1 (ReLU) (paper sections 5.1-5.2)."""
    return (8, 128, 1) if ppo_init else (8, 256, 256, 1)


def init_drift_params(key: jax.Array, ppo_init: bool = True) -> list:
    """Random weights of the drift network: a list of matrices [in, out], no biases (LeCun normal).

    The ES search starts instead from all zeros with ppo_init (which is exactly PPO, eq. 8) and from
    these random weights for LPO-Zero.
    """
    sizes = drift_layer_sizes(ppo_init)
    keys = jax.random.split(key, len(sizes) - 1)
    return [jax.random.normal(k, (n_in, n_out)) / jnp.sqrt(n_in) for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:])]


def lpo_drift(params: list, ratio: jax.Array, advantage: jax.Array, clip_eps: float = 0.2,
              ppo_init: bool = True) -> jax.Array:
    """LPO's learned drift (Lu et al. 2022, eq. 8 and section 5.1).

        LPO:       f = ReLU(f̃(x) - ξ + ReLU((r - clip(r, 1±ε))·A))
        LPO-Zero:  f = ReLU(f̃(x) - ξ)

    f̃ is a bias-free MLP of x = lpo_features(r, A) (tanh for LPO, ReLU for LPO-Zero), so f̃ = 0 at
    r = 1, and the margin ξ = 1e-6 keeps f = 0 and ∂f/∂r = 0 there for any weights: a valid drift.
    With all weights zero, LPO's f is PPO's drift less ξ where that exceeds ξ: PPO's gradients exactly.
    Args: params from `init_drift_params`; ratio (> 0), advantage: broadcastable [...]. Returns f [...] ≥ 0.
    """
    activation = jnp.tanh if ppo_init else jax.nn.relu
    h = lpo_features(ratio, advantage)
    for w in params[:-1]:
        h = activation(h @ w)
    f_tilde = (h @ params[-1])[..., 0]
    if ppo_init:
        return jax.nn.relu(f_tilde - XI + ppo_drift(ratio, advantage, clip_eps))
    return jax.nn.relu(f_tilde - XI)


class DriftParams(NamedTuple):
    net: list  # the LPO network's weights (ignored by DPO and PPO)
    drift_id: jax.Array  # int: 0 lpo, 1 dpo, 2 ppo (an array, so that one vmapped run can compare drifts)


def make_drift(args: Args) -> Callable:
    """drift(drift_params, r, A): the drift selected by drift_params.drift_id, coefficients bound."""
    branches = [
        lambda net, r, a: lpo_drift(net, r, a, args.clip_coef, args.ppo_init),
        lambda net, r, a: dpo_drift(r, a, args.dpo_alpha, args.dpo_beta),
        lambda net, r, a: ppo_drift(r, a, args.clip_coef),
    ]
    return lambda drift_params, r, a: jax.lax.switch(drift_params.drift_id, branches, drift_params.net, r, a)


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
    drift_params: DriftParams
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
        train(rng, drift_params) -> TrainOutput, with rng a PRNG key and drift_params a DriftParams;
        jit it, and vmap it over keys for seeds (and over drift parameters for a population).
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

    def loss_fn(params, obs_stats, drift_params, minibatch):
        traj, advantages, returns = minibatch
        pi, value = network.apply(params, normalize(traj.obs, obs_stats, obs_norm))
        log_ratio = pi.log_prob(traj.action) - traj.log_prob
        ratio = jnp.exp(log_ratio)
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        policy_loss = actor_loss(ratio, advantages, lambda r, a: drift(drift_params, r, a))
        value_loss = 0.5 * jnp.mean((value - returns) ** 2)
        entropy = jnp.mean(pi.entropy())
        total = policy_loss + args.vf_coef * value_loss - args.ent_coef * entropy
        approx_kl = jnp.mean(ratio - 1.0 - log_ratio)  # Schulman's low-variance KL(π_old || π) estimator
        return total, (policy_loss, value_loss, entropy, approx_kl)

    def update_minibatch(train_state, minibatch, obs_stats, drift_params):
        grads, aux = jax.grad(loss_fn, has_aux=True)(train_state.params, obs_stats, drift_params, minibatch)
        return train_state.apply_gradients(grads=grads), aux

    def update_epoch(carry, _):
        train_state, obs_stats, drift_params, batch, rng = carry
        rng, key = jax.random.split(rng)
        permutation = jax.random.permutation(key, n_batch)
        minibatches = jax.tree.map(
            lambda x: jnp.take(x, permutation, axis=0).reshape((args.num_minibatches, -1) + x.shape[1:]), batch)
        train_state, aux = jax.lax.scan(lambda ts, mb: update_minibatch(ts, mb, obs_stats, drift_params), train_state,
                                        minibatches)
        return (train_state, obs_stats, drift_params, batch, rng), aux

    def update(runner: RunnerState, update_index):
        runner, traj = jax.lax.scan(env_step, runner, None, rollout_len)  # leaves [T, num_envs, ...]
        unroll_end = (jnp.arange(rollout_len) % args.num_steps == args.num_steps - 1).astype(jnp.float32)
        cuts = jnp.maximum(traj.done, unroll_end[:, None])
        advantages, returns = compute_gae(traj.reward, traj.value, traj.next_value, traj.terminated, cuts,
                                          args.gamma, args.gae_lambda)
        batch = jax.tree.map(lambda x: x.reshape((n_batch,) + x.shape[2:]), (traj, advantages, returns))
        rng, key = jax.random.split(runner.rng)
        (train_state, _, _, _, _), aux = jax.lax.scan(
            update_epoch, (runner.train_state, runner.obs_stats, runner.drift_params, batch, key), None,
            args.update_epochs)
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

    def train(rng, drift_params: DriftParams) -> TrainOutput:
        rng, key_init, key_reset = jax.random.split(rng, 3)
        params = network.init(key_init, jnp.zeros((1, env.obs_dim)))
        train_state = TrainState.create(apply_fn=network.apply, params=params, tx=tx)
        obs, env_state = jax.vmap(env.reset)(jax.random.split(key_reset, args.num_envs))
        zeros = jnp.zeros(args.num_envs)
        runner = RunnerState(train_state, init_running_stats(env.obs_dim), env_state, obs,
                             EpisodeStats(zeros, zeros, zeros), drift_params, rng)
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
# The ES outer loop, checkpoints, drift files, pictures, and the transfer experiment.
# --------------------------------------------------------------------------------------------------
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


def generation_key(args: Args, generation: int) -> jax.Array:
    """The PRNG key of one generation, from --seed and the generation index alone.

    The ES noise and the inner-loop seeds of generation g depend on nothing else, so a resumed run
    redraws exactly what an uninterrupted one would; all members of a generation share its inner-loop
    seeds (common random numbers), and the seeds change every generation.
    """
    return jax.random.fold_in(jax.random.PRNGKey(args.seed), generation)


def drift_template(args: Args) -> list:
    """The drift network's parameter pytree (shapes only matter): zeros for LPO, random for LPO-Zero."""
    params = init_drift_params(jax.random.PRNGKey(args.seed), args.ppo_init)
    return jax.tree.map(jnp.zeros_like, params) if args.ppo_init else params


def make_es(args: Args):
    """evosax OpenAI-ES over the drift network (antithetic, Adam, σ decaying to a floor; Table 1)."""
    from evosax.algorithms import Open_ES
    from evosax.core.fitness_shaping import centered_rank_fitness_shaping_fn, standardize_fitness_shaping_fn

    shaping = {"centered_rank": centered_rank_fitness_shaping_fn, "z_score": standardize_fitness_shaping_fn}
    return Open_ES(
        population_size=args.pop_size,
        solution=drift_template(args),
        use_antithetic_sampling=True,
        optimizer=optax.adam(args.es_learning_rate),
        std_schedule=optax.exponential_decay(args.sigma_init, 1, args.sigma_decay, end_value=args.sigma_limit),
        fitness_shaping_fn=shaping[args.fitness_shaping],
    )


def make_member_fitness(args: Args) -> Callable:
    """fitness(net, keys [num_rollouts, 2]) -> mean final evaluation return of training runs with drift `net`."""
    train, evaluate = make_train(args), make_evaluate(args)

    def fitness(net, keys):
        def one_run(key):
            key_train, key_eval = jax.random.split(key)
            out = train(key_train, DriftParams(net, jnp.int32(0)))
            return evaluate(out.params, out.obs_stats, key_eval)

        return jax.vmap(one_run)(keys).mean()

    return fitness


def make_generation(args: Args, es) -> Callable:
    """generation(es_state, key) -> (es_state, population, fitness [pop_size]): ask, train every member, tell.

    The population axis is sharded over all JAX devices (jax.shard_map); each device trains its
    members, and only the fitnesses come back. Non-finite fitness (a diverged inner run) is ranked
    as the worst member. evosax minimises, so it is told the negated return.
    """
    member_fitness = jax.vmap(make_member_fitness(args), in_axes=(0, None))
    devices = jax.devices()
    if len(devices) > 1:
        mesh = jax.sharding.Mesh(np.array(devices), ("pop",))
        P = jax.sharding.PartitionSpec
        member_fitness = jax.shard_map(member_fitness, mesh=mesh, in_specs=(P("pop"), P()), out_specs=P("pop"),
                                       check_vma=False)

    def generation(es_state, key):
        key_ask, key_runs, key_tell = jax.random.split(key, 3)
        population, es_state = es.ask(key_ask, es_state, es.default_params)
        fitness = member_fitness(population, jax.random.split(key_runs, args.num_rollouts))
        loss = jnp.where(jnp.isfinite(fitness), -fitness, jnp.inf)
        es_state, _ = es.tell(key_tell, population, loss, es_state, es.default_params)
        return es_state, population, fitness

    return jax.jit(generation)


GEN_FIELDS = ("generation", "best_fitness", "mean_fitness", "sigma", "seconds")


def save_checkpoint(run_dir: str, es_state, rows: list, best: dict):
    """checkpoint.msgpack: ES state, generations done, log rows, best member so far (atomic)."""
    state = {"es_state": flax.serialization.to_state_dict(es_state), "generation": len(rows),
             "rows": {k: np.array([r[k] for r in rows], dtype=np.float64) for k in GEN_FIELDS},
             "best_fitness": np.float64(best["fitness"]),
             "best_net": flax.serialization.to_state_dict(best["net"])}
    atomic_write(os.path.join(run_dir, "checkpoint.msgpack"),
                 flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, state)))


def load_checkpoint(run_dir: str, es_template, net_template):
    """(es_state, rows, best) from run_dir/checkpoint.msgpack. Raises ArgsError if missing or damaged."""
    path = os.path.join(run_dir, "checkpoint.msgpack")
    if not os.path.isfile(path):
        raise ArgsError(f"--resume {run_dir}: {path} not found (expected a run directory written by lpo.py)")
    try:
        with open(path, "rb") as f:
            state = flax.serialization.msgpack_restore(f.read())
        es_state = flax.serialization.from_state_dict(es_template, state["es_state"])
        n = int(state["generation"])
        rows = [{k: (int if k == "generation" else float)(state["rows"][k][i]) for k in GEN_FIELDS} for i in range(n)]
        net = flax.serialization.from_state_dict(net_template, state["best_net"])
        if jax.tree.structure(net) != jax.tree.structure(net_template) or any(
                a.shape != b.shape for a, b in zip(jax.tree.leaves(net), jax.tree.leaves(net_template))):
            raise ValueError("drift network shapes do not match the saved arguments")
        best = {"fitness": float(state["best_fitness"]), "net": jax.tree.map(jnp.asarray, net)}
    except Exception as e:
        raise ArgsError(f"--resume {run_dir}: damaged checkpoint.msgpack ({type(e).__name__}: {e})") from None
    return jax.tree.map(jnp.asarray, es_state), rows, best


def save_drift(path: str, net, args: Args):
    """A drift file: the network's weights and the flags that define its form (atomic msgpack)."""
    state = {"net": jax.tree.map(np.asarray, flax.serialization.to_state_dict(list(net))), "ppo_init": bool(args.ppo_init),
             "clip_coef": args.clip_coef}
    atomic_write(path, flax.serialization.msgpack_serialize(state))


def load_drift(path: str) -> Tuple[list, bool, float]:
    """(net, ppo_init, clip_coef) from a drift file, or from a run directory's best_drift.msgpack.

    Raises: ArgsError when the file is missing or damaged.
    """
    file = os.path.join(path, "best_drift.msgpack") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ArgsError(f"drift {path}: {file} not found (give a run directory of lpo.py or a drift .msgpack)")
    try:
        with open(file, "rb") as f:
            state = flax.serialization.msgpack_restore(f.read())
        ppo_init = bool(state["ppo_init"])
        net = [jnp.asarray(state["net"][str(i)]) for i in range(len(state["net"]))]
        sizes = drift_layer_sizes(ppo_init)
        if [w.shape for w in net] != list(zip(sizes[:-1], sizes[1:])):
            raise ValueError(f"weight shapes {[w.shape for w in net]} do not fit the drift network")
        return net, ppo_init, float(state["clip_coef"])
    except Exception as e:
        raise ArgsError(f"drift {path}: damaged drift file {file} ({type(e).__name__}: {e})") from None


def plot_fitness_curve(path: str, rows: list, title: str):
    """PNG of the best and mean member fitness per generation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    generations = [r["generation"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(generations, [r["mean_fitness"] for r in rows], label="population mean")
    ax.plot(generations, [r["best_fitness"] for r in rows], label="best member")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (final evaluation return)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def objective_gradient(drift: Callable, ratios: jax.Array, advantages: jax.Array) -> jax.Array:
    """∂/∂r of the objective r·A - f(r, A) on a grid: [len(advantages), len(ratios)]."""
    objective = lambda r, a: r * a - drift(r, a)
    grad = jax.vmap(jax.vmap(jax.grad(objective), in_axes=(0, None)), in_axes=(None, 0))
    return grad(ratios, advantages)


def plot_drifts(path: str, drifts: dict):
    """The paper's drift pictures (Fig. 1, 3, 5) for each named drift f(r, A), side by side.

    Top row: heat map of ∂/∂r (r·A - f(r, A)) over r ∈ [0, 2], A ∈ [-2, 2]. Bottom row: the objective
    r·A - f(r, A) against r at A = 1 and A = -1 (slices).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios, advantages = jnp.linspace(0.01, 2.0, 200), jnp.linspace(-2.0, 2.0, 161)
    fig, axes = plt.subplots(2, len(drifts), figsize=(4.2 * len(drifts), 7.5), squeeze=False)
    for col, (name, drift) in enumerate(drifts.items()):
        grad = np.asarray(objective_gradient(drift, ratios, advantages))
        bound = max(float(np.percentile(np.abs(grad), 98)), 1e-6)  # log r's blow-up near r = 0 would swamp the scale
        image = axes[0, col].imshow(grad, origin="lower", aspect="auto", cmap="RdBu", vmin=-bound, vmax=bound,
                                    extent=(float(ratios[0]), float(ratios[-1]), -2.0, 2.0))
        axes[0, col].set(title=f"{name}: ∂/∂r (r·A - f)", xlabel="ratio r", ylabel="advantage A")
        fig.colorbar(image, ax=axes[0, col])
        for a in (1.0, -1.0):
            values = ratios * a - drift(ratios, jnp.full_like(ratios, a))
            axes[1, col].plot(ratios, values, label=f"A = {a:+g}")
        axes[1, col].set(title=f"{name}: r·A - f(r, A)", xlabel="ratio r")
        axes[1, col].axvline(1.0, color="grey", lw=0.5)
        axes[1, col].legend()
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def named_drifts(args: Args, net, ppo_init: bool, clip_coef: float) -> dict:
    """{"PPO": f, "DPO": f, "learned": f}, each f(r, A), for the pictures."""
    learned = "LPO" if ppo_init else "LPO-Zero"
    return {"PPO": lambda r, a: ppo_drift(r, a, clip_coef),
            "DPO": lambda r, a: dpo_drift(r, a, args.dpo_alpha, args.dpo_beta),
            learned: lambda r, a: lpo_drift(net, r, a, clip_coef, ppo_init)}


def args_from_json(path: str) -> Args:
    with open(path) as f:
        saved = json.load(f)
    fields = {f.name for f in dataclasses.fields(Args)}
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields}
    return Args(**saved)


def default_run_dir(args: Args) -> str:
    return os.path.join("runs", f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}")


def run_meta_training(args: Args) -> str:
    """ES over the drift network; writes the run directory and checkpoints as it goes."""
    from tqdm import tqdm

    if args.resume is not None:
        run_dir = args.resume
        if not os.path.isfile(os.path.join(run_dir, "args.json")):
            raise ArgsError(f"--resume {run_dir}: args.json not found (expected a run directory written by lpo.py)")
        try:
            saved = args_from_json(os.path.join(run_dir, "args.json"))
        except (json.JSONDecodeError, TypeError) as e:
            raise ArgsError(f"--resume {run_dir}: damaged args.json ({e})") from None
        extend = args.num_generations if args.num_generations is not None else saved.num_generations
        args = resolve_args(dataclasses.replace(saved, resume=run_dir, num_generations=extend))
    else:
        run_dir = args.run_dir or default_run_dir(args)
        os.makedirs(run_dir, exist_ok=True)
    es = make_es(args)
    es_state = es.init(jax.random.PRNGKey(args.seed), drift_template(args), es.default_params)
    rows, best = [], {"fitness": -np.inf, "net": drift_template(args)}
    if args.resume is not None:
        es_state, rows, best = load_checkpoint(run_dir, es_state, best["net"])
    write_json(os.path.join(run_dir, "args.json"), dataclasses.asdict(dataclasses.replace(args, resume=None)))
    csv_path = os.path.join(run_dir, "generations.csv")
    with open(csv_path + ".tmp", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(GEN_FIELDS)
        writer.writerows([[r[k] for k in GEN_FIELDS] for r in rows])
    os.replace(csv_path + ".tmp", csv_path)

    unravel = ravel_pytree(drift_template(args))[1]
    print(f"meta-training the {'LPO' if args.ppo_init else 'LPO-Zero'} drift on {args.env_id}: population "
          f"{args.pop_size} on {jax.device_count()} {jax.default_backend()} device(s), {args.num_rollouts} inner run(s) "
          f"of {num_updates(args) * batch_size(args):,} steps per member, generations {len(rows)}..{args.num_generations}")
    start = time.time()
    generation = make_generation(args, es).lower(es_state, generation_key(args, 0)).compile()
    print(f"compiled in {time.time() - start:.1f}s", flush=True)

    def checkpoint():
        save_checkpoint(run_dir, es_state, rows, best)
        save_drift(os.path.join(run_dir, "mean_drift.msgpack"), unravel(es_state.mean), args)
        save_drift(os.path.join(run_dir, "best_drift.msgpack"), best["net"], args)
        plot_fitness_curve(os.path.join(run_dir, "fitness_curve.png"), rows, f"LPO on {args.env_id}")
        plot_drifts(os.path.join(run_dir, "drift.png"), named_drifts(args, best["net"], args.ppo_init, args.clip_coef))

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
                               name=os.path.basename(os.path.normpath(run_dir)), dir=run_dir, resume="allow")
    bar = tqdm(range(len(rows), args.num_generations), initial=len(rows), total=args.num_generations,
               desc="generations", file=sys.stdout, mininterval=0)
    for g in bar:
        t0 = time.time()
        sigma = float(es_state.std)
        es_state, population, fitness = generation(es_state, generation_key(args, g))
        fitness = np.asarray(fitness)
        finite = np.where(np.isfinite(fitness), fitness, -np.inf)
        if finite.max() > best["fitness"]:
            best = {"fitness": float(finite.max()), "net": jax.tree.map(lambda x: x[int(finite.argmax())], population)}
        row = dict(generation=g + 1, best_fitness=float(finite.max()), mean_fitness=float(np.nanmean(fitness)),
                   sigma=sigma, seconds=time.time() - t0)
        rows.append(row)
        with open(csv_path, "a", newline="") as f:
            csv.writer(f).writerow([row[k] for k in GEN_FIELDS])
        bar.set_postfix(best=f"{row['best_fitness']:.1f}", mean=f"{row['mean_fitness']:.1f}", sigma=f"{sigma:.4f}",
                        sec=f"{row['seconds']:.1f}")
        scalars = {f"es/{k}": row[k] for k in GEN_FIELDS[1:]}
        if writer is not None:
            for name, value in scalars.items():
                writer.add_scalar(name, value, g + 1)
        if wandb_run is not None:
            wandb_run.log(scalars, step=g + 1)
        if (g + 1) % args.save_every == 0 or g + 1 == args.num_generations:
            checkpoint()
    bar.close()
    if writer is not None:
        writer.close()
    if wandb_run is not None:
        wandb_run.finish()
    summary = dict(env_id=args.env_id, drift="lpo" if args.ppo_init else "lpo-zero", num_generations=len(rows),
                   pop_size=args.pop_size, best_fitness=best["fitness"],
                   final_mean_fitness=rows[-1]["mean_fitness"] if rows else None,
                   inner_total_timesteps=num_updates(args) * batch_size(args), wall_seconds=time.time() - start,
                   device=f"{jax.device_count()} x {jax.devices()[0].device_kind}")
    write_json(os.path.join(run_dir, "summary.json"), summary)
    print(f"best fitness {best['fitness']:.2f}; last generation mean {summary['final_mean_fitness']:.2f}")
    return run_dir


def run_eval_drift(args: Args) -> str:
    """The transfer experiment: train agents on --env-id with the learned drift, DPO and PPO, same seeds."""
    net, ppo_init, clip_coef = load_drift(args.eval_drift)
    args = dataclasses.replace(args, ppo_init=ppo_init, clip_coef=clip_coef)
    run_dir = args.run_dir or default_run_dir(dataclasses.replace(args, exp_name="lpo_eval"))
    os.makedirs(run_dir, exist_ok=True)
    write_json(os.path.join(run_dir, "args.json"), dataclasses.asdict(args))
    train, evaluate = make_train(args), make_evaluate(args)
    key_train, key_eval = jax.random.split(jax.random.PRNGKey(args.seed))
    train_keys, eval_keys = jax.random.split(key_train, args.num_seeds), jax.random.split(key_eval, args.num_seeds)

    def one(drift_id, key_t, key_e):
        out = train(key_t, DriftParams(net, drift_id))
        return evaluate(out.params, out.obs_stats, key_e), out.metrics["episodic_return"]

    # drifts × seeds in one compiled, vmapped run; every drift sees the same seeds
    run_all = jax.jit(jax.vmap(jax.vmap(one, in_axes=(None, 0, 0)), in_axes=(0, None, None)))
    print(f"training {args.num_seeds} seed(s) each with the learned drift, DPO and PPO on {args.env_id}, "
          f"{num_updates(args) * batch_size(args):,} steps per run", flush=True)
    start = time.time()
    returns, curves = jax.block_until_ready(run_all(jnp.arange(3), train_keys, eval_keys))
    returns, curves = np.asarray(returns), np.asarray(curves)
    names = ["LPO" if ppo_init else "LPO-Zero", "DPO", "PPO"]
    summary = dict(env_id=args.env_id, drift_file=os.path.abspath(args.eval_drift), num_seeds=args.num_seeds,
                   total_timesteps=num_updates(args) * batch_size(args), wall_seconds=time.time() - start)
    for name, r in zip(names, returns):
        summary[name] = dict(final_return_mean=float(r.mean()), final_return_std=float(r.std()),
                             final_returns=r.tolist())
        print(f"{name:9s} {r.mean():10.2f} ± {r.std():.2f}")
    write_json(os.path.join(run_dir, "summary.json"), summary)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = (np.arange(curves.shape[-1]) + 1) * batch_size(args)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in zip(names, curves):
        with warnings.catch_warnings():  # updates before any episode ended are NaN for every seed
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, std = np.nanmean(curve, axis=0), np.nanstd(curve, axis=0)
        ax.plot(steps, mean, label=name)
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.set(xlabel="environment steps (per seed)", ylabel="episodic return", title=f"{args.env_id}, {args.num_seeds} seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "learning_curves.png"), dpi=120)
    plt.close(fig)
    return run_dir


def main(args: Args) -> str:
    """Meta-train (default), --resume, --eval-drift or --plot-drift; returns the run directory."""
    try:
        if args.plot_drift is not None and args.resume is None and args.eval_drift is None:
            net, ppo_init, clip_coef = load_drift(args.plot_drift)
            run_dir = os.path.dirname(os.path.abspath(args.plot_drift)) if not os.path.isdir(args.plot_drift) \
                else args.plot_drift
            run_dir = args.run_dir or run_dir
            os.makedirs(run_dir, exist_ok=True)
            plot_drifts(os.path.join(run_dir, "drift.png"), named_drifts(args, net, ppo_init, clip_coef))
        else:
            args = resolve_args(args) if args.resume is None else args
            run_dir = run_eval_drift(args) if args.eval_drift is not None else run_meta_training(args)
    except ArgsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"run directory: {run_dir}")
    return run_dir


if __name__ == "__main__":
    main(tyro.cli(Args))
