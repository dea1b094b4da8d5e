"""Evolved Policy Gradients (EPG): evolve a loss function with which a fresh agent learns a new task.

A freshly initialised Gaussian policy learns one task, sampled from a family of tasks, by gradient descent
on a learned loss L_φ: a temporal-convolution network that reads the agent's recent experience (a buffer of
its last N steps) together with the policy's own outputs, and returns a scalar. Evolution strategies search
φ, where the fitness of a candidate loss is the return its agent reaches at the end of a whole learning
"lifetime"; the evolved loss then trains fresh agents on tasks it never saw, with no reward shaping or value
function of its own.

Paper: Rein Houthooft, Richard Y. Chen, Phillip Isola, Bradly C. Stadie, Filip Wolski, Jonathan Ho,
Pieter Abbeel, "Evolved Policy Gradients", NeurIPS 2018, arXiv:1802.04821 (sections 3-4, Algorithm 1).
Relative to a policy-gradient method, the hand-written surrogate objective is replaced by L_φ; during the
first part of meta-training it is mixed with a PPO loss, (1 - α)·L_φ + α·L_PPO, α annealed from 1 to 0.

Example:
    python epg.py --task-family goal-ant                                  # the paper's GoalAnt (GPU)
    python epg.py --task-family random-pendulum --num-generations 50      # CPU-sized
    python epg.py --test --load-loss runs/<run> --task-family goal-ant    # left-half goals: EPG vs PPO
"""

import csv
import dataclasses
import functools
import json
import math
import os
import sys
import time
import warnings
from typing import Callable, NamedTuple, Optional, Tuple

# jaxlib 0.10.2 on CPU runs batched LAPACK calls (here: the QR of orthogonal initialisation, batched by
# the vmap over lifetimes) as tasks on XLA's intra-op thread pool, whose size is the number of cores; when
# every pool thread waits inside such a call the run deadlocks at 0% CPU. A pool of at least 16 threads
# leaves spare threads. Must be set before JAX starts its CPU backend; it does nothing on GPU.
os.environ.setdefault("NPROC", "16")

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from jax.flatten_util import ravel_pytree

# task family -> the environment it is built on
TASK_FAMILIES = {
    "random-pendulum": "Pendulum-v1",  # gymnax
    "goal-ant": "ant",  # Brax from here on
    "dir-hopper": "hopper",
    "dir-cheetah": "halfcheetah",
    "random-hopper": "hopper",
    "goal-reacher": "reacher",
}
BRAX_FAMILIES = ("goal-ant", "dir-hopper", "dir-cheetah", "random-hopper", "goal-reacher")
BACKENDS = ("generalized", "positional", "spring", "mjx")
MIN_BUFFER = 21  # the two strided convolutions (kernel 6 stride 5, kernel 4 stride 2) need 21 steps


@dataclasses.dataclass
class Args:
    # ---- run ----
    exp_name: str = "epg"
    """name of this experiment, part of the run name"""
    seed: int = 1
    """seed of the experiment: ES noise, tasks and lifetimes of generation g all derive from (seed, g)"""
    run_dir: Optional[str] = None
    """where to write results (default: runs/{task_family}__{exp_name}__{seed}__{unix time})"""
    resume: Optional[str] = None
    """continue meta-training from the last checkpoint of this run directory (its saved arguments are used;
    --num-generations may extend it)"""
    test: bool = False
    """instead of meta-training: train fresh agents on test-distribution tasks with the loss of --load-loss
    (α = 0) and, same seeds, tasks and steps, with PPO; write both learning curves and summary.json"""
    load_loss: Optional[str] = None
    """--test: the evolved loss, a run directory (meaning its best loss) or a loss .msgpack file"""
    num_seeds: int = 8
    """--test: agents (each on its own test task) per method, vmapped in one run"""
    tensorboard: bool = False
    """also write TensorBoard event files (tensorboardX) into the run directory (per generation)"""

    # ---- task family ----
    task_family: str = "goal-ant"
    """random-pendulum (gymnax Pendulum-v1, random mass, length, gravity; CPU-sized), goal-ant, dir-hopper,
    dir-cheetah, random-hopper, goal-reacher (Brax)"""
    backend: str = "positional"
    """Brax physics backend: generalized, positional, spring or mjx (ignored for gymnax families)"""
    episode_length: Optional[int] = None
    """Brax: environment steps before a time-limit truncation (default 1000; goal-reacher 200)"""

    # ---- the inner loop: one agent's lifetime ----
    lifetime: int = 8192
    """environment steps in one agent's lifetime, across episodes (64 × 128, the reference's)"""
    buffer_size: int = 512
    """N: steps of recent experience the loss's temporal convolutions read"""
    update_every: int = 64
    """M: policy update every this many environment steps, on minibatches of the M newest steps"""
    minibatch_size: int = 32
    """steps per inner minibatch (M / minibatch_size gradient steps per epoch)"""
    update_epochs: int = 1
    """passes over the M newest steps per policy update"""
    inner_learning_rate: float = 1e-3
    """Adam learning rate of the agent (policy, memory units, PPO value function)"""
    policy_hidden: Tuple[int, ...] = (64, 64)
    """policy (and PPO value) MLP hidden sizes, tanh"""
    memory_units: int = 32
    """size of the memory vector: trainable agent parameters that the loss reads and moves (0: none)"""
    num_eval_episodes: int = 3
    """episodes of the final policy averaged into a lifetime's return (the fitness)"""
    gamma: float = 0.99
    """discount factor γ of the PPO auxiliary loss"""
    gae_lambda: float = 0.95
    """GAE λ of the PPO auxiliary loss"""
    clip_coef: float = 0.2
    """PPO clipping ε of the auxiliary loss"""
    kl_coef: float = 1e-3
    """weight of KL(π_old ‖ π) in the auxiliary PPO loss"""

    # ---- the outer loop: evolution strategies on the loss ----
    pop_size: int = 16
    """noise vectors per generation (even: antithetic pairs); must divide over the JAX devices"""
    num_tasks: int = 4
    """tasks each noise vector is evaluated on; its fitness is the mean return over them"""
    num_generations: Optional[int] = None
    """ES generations (default 500; on --resume, the saved run's unless given)"""
    sigma: float = 0.01
    """ES noise standard deviation σ"""
    es_learning_rate: float = 1e-2
    """Adam learning rate of the ES update (divided by 10 after half of the generations, as the reference)"""
    weight_decay: float = 1e-3
    """L2 penalty on the loss parameters in the ES update"""
    ppo_anneal_frac: float = 0.125
    """α of (1-α)·L_EPG + α·L_PPO falls linearly from 1 to 0 over this fraction of the generations (0: α = 0)"""
    eval_every: int = 10
    """evaluate the current loss (mean of the search distribution, α = 0) every this many generations"""
    num_eval_tasks: int = 8
    """training-distribution tasks in that evaluation; the best evaluated loss is saved as best_loss.msgpack"""
    save_every: int = 10
    """write a checkpoint every this many generations, and at the end"""


EPISODE_LENGTHS = {"goal-reacher": 200}  # Brax families not listed here: 1000


class ArgsError(ValueError):
    """A user's mistake in the arguments: reported as one line, before anything is compiled."""


def resolve_args(args: Args) -> Args:
    """Fill the None fields with their defaults (episode length per task family) and check every value.

    Raises:
        ArgsError: unknown task family or backend; a non-positive size; a lifetime shorter than the
            buffer or not a multiple of --update-every; M not a multiple of the minibatch; a buffer smaller
            than M or than the convolutions need; an odd population or one that does not divide over the
            devices (meta-training only); --test without --load-loss.
    """
    if args.task_family not in TASK_FAMILIES:
        raise ArgsError(f"unknown --task-family {args.task_family!r}; valid: {', '.join(TASK_FAMILIES)}")
    if args.backend not in BACKENDS:
        raise ArgsError(f"unknown --backend {args.backend!r}; valid: {', '.join(BACKENDS)}")
    if args.num_generations is None:
        args = dataclasses.replace(args, num_generations=500)
    if args.episode_length is None:
        args = dataclasses.replace(args, episode_length=EPISODE_LENGTHS.get(args.task_family, 1000))
    for name in ("lifetime", "buffer_size", "update_every", "minibatch_size", "update_epochs", "num_eval_episodes",
                 "pop_size", "num_tasks", "num_generations", "eval_every", "num_eval_tasks", "save_every",
                 "num_seeds", "episode_length"):
        if getattr(args, name) <= 0:
            raise ArgsError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.memory_units < 0 or any(h <= 0 for h in args.policy_hidden):
        raise ArgsError("--memory-units must be non-negative and --policy-hidden sizes positive")
    for name in ("inner_learning_rate", "sigma", "es_learning_rate", "clip_coef"):
        if not getattr(args, name) > 0:
            raise ArgsError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.weight_decay < 0 or args.kl_coef < 0 or not 0 <= args.ppo_anneal_frac <= 1:
        raise ArgsError("--weight-decay and --kl-coef must be >= 0 and --ppo-anneal-frac in [0, 1]")
    if not (0 <= args.gamma <= 1 and 0 <= args.gae_lambda <= 1):
        raise ArgsError(f"--gamma and --gae-lambda must lie in [0, 1], got {args.gamma} and {args.gae_lambda}")
    if args.update_every % args.minibatch_size:
        raise ArgsError(f"--update-every {args.update_every} is not a multiple of --minibatch-size {args.minibatch_size}")
    if args.buffer_size < max(args.update_every, MIN_BUFFER):
        raise ArgsError(f"--buffer-size {args.buffer_size} is smaller than --update-every {args.update_every} "
                        f"or than the {MIN_BUFFER} steps the loss's convolutions need")
    if args.lifetime < args.buffer_size:
        raise ArgsError(f"--lifetime {args.lifetime} is shorter than the buffer (--buffer-size {args.buffer_size})")
    if args.lifetime % args.update_every:
        raise ArgsError(f"--lifetime {args.lifetime} is not a multiple of --update-every {args.update_every}")
    if args.test:
        if args.load_loss is None:
            raise ArgsError("--test needs --load-loss (a run directory of epg.py or a loss .msgpack file)")
    else:
        if args.pop_size % 2:
            raise ArgsError(f"--pop-size must be even (antithetic pairs), got {args.pop_size}")
        if args.pop_size % jax.device_count():
            raise ArgsError(f"--pop-size {args.pop_size} does not divide over the {jax.device_count()} JAX devices")
    return args


# --------------------------------------------------------------------------------------------------
# Task families. A task is a small pytree of arrays; `sample_tasks(family, key, n, test)` draws n of them
# (a pure function, so tasks vmap like anything else), and the family's environment takes the task as an
# argument of reset and step:
#   reset(key, task)               -> (obs, state)
#   step(key, state, action, task) -> (obs, state, reward, terminated, truncated, final_obs)
# `obs` is already the first observation of the next episode when the episode ended (auto-reset);
# `final_obs` is the true last observation, from which a time-limit truncation is bootstrapped.
# --------------------------------------------------------------------------------------------------
# Ranges of the randomised families, from the reference code's RandomWeightHopperEnv (epg/envs/mujoco/hopper.py):
# every body mass and geom friction scaled by U(0.5, 2), gravity g_z ~ -U(2, 20). The pendulum takes the
# same multipliers on its mass and length and the same gravity range.
SCALE_RANGE = (0.5, 2.0)
GRAVITY_RANGE = (2.0, 20.0)  # magnitude, m/s²
GOAL_RADIUS = {"goal-ant": (1.0, 3.0), "goal-reacher": (0.05, 0.2)}  # metres from the origin
GOAL_HALF_ANGLE = 0.45 * math.pi  # goals within ±81° of +x (training) or of -x (--test): strictly one half


def sample_goal(key: jax.Array, n: int, radius: Tuple[float, float], test: bool) -> jax.Array:
    """n goal positions [n, 2] on the right half-plane (x > 0), or the left (x < 0) when test."""
    key_r, key_a = jax.random.split(key)
    r = jax.random.uniform(key_r, (n,), minval=radius[0], maxval=radius[1])
    angle = jax.random.uniform(key_a, (n,), minval=-GOAL_HALF_ANGLE, maxval=GOAL_HALF_ANGLE) + (math.pi if test else 0.0)
    return jnp.stack([r * jnp.cos(angle), r * jnp.sin(angle)], axis=-1)


def sample_tasks(family: str, key: jax.Array, n: int, test: bool, num_links: int = 0, num_geoms: int = 0) -> dict:
    """n tasks of a family as a dict of arrays with leading axis n.

    goal-ant, goal-reacher: {"goal": [n, 2]}, right half for training, left half for `test`.
    dir-hopper, dir-cheetah: {"direction": [n]}, +1 or -1 with equal probability (the reference's
        randint(0, 1) always gave -1; not reproduced).
    random-hopper: {"mass_scale": [n, num_links], "friction_scale": [n, num_geoms, 3], "gravity": [n]}.
    random-pendulum: {"mass": [n], "length": [n], "gravity": [n]}.
    The randomised and direction families have no train/test split: --test draws unseen tasks of the
    same distribution.
    """
    if family in GOAL_RADIUS:
        return {"goal": sample_goal(key, n, GOAL_RADIUS[family], test)}
    if family in ("dir-hopper", "dir-cheetah"):
        return {"direction": jnp.where(jax.random.bernoulli(key, 0.5, (n,)), 1.0, -1.0)}
    keys = jax.random.split(key, 3)
    uniform = lambda k, shape, bounds: jax.random.uniform(k, shape, minval=bounds[0], maxval=bounds[1])
    if family == "random-hopper":
        return {"mass_scale": uniform(keys[0], (n, num_links), SCALE_RANGE),
                "friction_scale": uniform(keys[1], (n, num_geoms, 3), SCALE_RANGE),
                "gravity": uniform(keys[2], (n,), GRAVITY_RANGE)}
    if family == "random-pendulum":
        return {"mass": uniform(keys[0], (n,), SCALE_RANGE), "length": uniform(keys[1], (n,), SCALE_RANGE),
                "gravity": uniform(keys[2], (n,), GRAVITY_RANGE)}
    raise ValueError(f"unknown task family {family!r}")


class PendulumTaskEnv:
    """random-pendulum: gymnax Pendulum-v1 whose mass, length and gravity are the task's."""

    def __init__(self):
        import gymnax

        self.env, self.params = gymnax.make("Pendulum-v1")
        self.obs_dim, self.action_dim = 3, 1
        self.action_low, self.action_high = -float(self.params.max_torque), float(self.params.max_torque)
        self.max_episode_steps = int(self.params.max_steps_in_episode)
        self.num_links = self.num_geoms = 0

    def _params(self, task):
        return self.params.replace(m=task["mass"], l=task["length"], g=task["gravity"])

    def reset(self, key, task):
        obs, state = self.env.reset(key, self._params(task))
        return obs.astype(jnp.float32), state

    def step(self, key, state, action, task):
        obs, state, reward, terminated, truncated, info = self.env.step(key, state, action, self._params(task))
        return (obs.astype(jnp.float32), state, jnp.squeeze(reward).astype(jnp.float32), terminated.astype(jnp.float32),
                truncated.astype(jnp.float32), info["final_observation"].astype(jnp.float32))


class BraxTaskEnv:
    """A Brax family: the base env with a time limit, its reward or physics changed by the task.

    goal-ant: the forward reward is replaced by progress towards the goal, (|g - p_before| - |g - p_after|)/dt
    of the torso's (x, y); the goal is not in the observation (Brax's ant already hides x, y), only the
    reward reveals it. dir-hopper / dir-cheetah: the forward reward is multiplied by the direction.
    random-hopper: link masses, geom frictions and gravity of the physics system are the task's.
    goal-reacher: the target is placed at the task's goal at every reset, instead of at random.
    """

    def __init__(self, family: str, backend: str, episode_length: int):
        from brax import envs
        from brax.envs.wrappers.training import EpisodeWrapper

        self.family = family
        self.base = envs.get_environment(TASK_FAMILIES[family], backend=backend)
        self.env = EpisodeWrapper(self.base, episode_length, 1)
        self.obs_dim, self.action_dim = int(self.base.observation_size), int(self.base.action_size)
        self.action_low, self.action_high = -1.0, 1.0
        self.max_episode_steps = episode_length
        self.sys = self.base.sys
        self.num_links = int(self.sys.link.inertia.mass.shape[0])
        self.num_geoms = int(np.asarray(self.sys.geom_friction).shape[0])

    def _with_task(self, task, fn):
        """Run fn() with the physics system of the task (random-hopper) swapped into the env."""
        if self.family != "random-hopper":
            return fn()
        sys = self.sys.tree_replace({
            "link.inertia.mass": self.sys.link.inertia.mass * task["mass_scale"],
            "geom_friction": jnp.asarray(self.sys.geom_friction) * task["friction_scale"],
            "gravity": jnp.array([0.0, 0.0, -1.0]) * task["gravity"],
        })
        self.base.sys = sys
        try:
            return fn()
        finally:
            self.base.sys = self.sys

    def _reset_state(self, key, task):
        state = self._with_task(task, lambda: self.env.reset(key))
        if self.family == "goal-reacher":  # move the target (joints 2:) to the goal, at rest
            ps = state.pipeline_state
            ps = self.base.pipeline_init(ps.q.at[2:].set(task["goal"]), ps.qd.at[2:].set(0.0))
            state = state.replace(pipeline_state=ps, obs=self.base._get_obs(ps))
        return state

    def _task_reward(self, state, task):
        m = state.metrics
        if self.family == "goal-ant":
            position = jnp.stack([m["x_position"], m["y_position"]])
            velocity = jnp.stack([m["x_velocity"], m["y_velocity"]])
            before = position - velocity * self.base.dt
            progress = (jnp.linalg.norm(task["goal"] - before) - jnp.linalg.norm(task["goal"] - position)) / self.base.dt
            return state.reward - m["forward_reward"] + progress
        if self.family in ("dir-hopper", "dir-cheetah"):
            forward = m["reward_forward"] if self.family == "dir-hopper" else m["reward_run"]
            return state.reward + (task["direction"] - 1.0) * forward
        return state.reward

    def reset(self, key, task):
        state = self._reset_state(key, task)
        return state.obs, state

    def step(self, key, state, action, task):
        next_state = self._with_task(task, lambda: self.env.step(state, action))
        reward = self._task_reward(next_state, task)
        truncated = next_state.info["truncation"]
        terminated = next_state.done * (1.0 - truncated)
        reset_state = self._reset_state(key, task)
        state = jax.tree.map(lambda r, n: jnp.where(next_state.done > 0, r, n), reset_state, next_state)
        return state.obs, state, reward, terminated, truncated, next_state.obs


def make_env(args: Args):
    """The environment of args.task_family (PendulumTaskEnv or BraxTaskEnv), built once per setting."""
    return cached_env(args.task_family, args.backend, args.episode_length)


@functools.lru_cache(maxsize=None)
def cached_env(task_family: str, backend: str, episode_length: int):
    if task_family in BRAX_FAMILIES:
        return BraxTaskEnv(task_family, backend, episode_length)
    return PendulumTaskEnv()


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


def normalize(obs: jax.Array, stats: RunningStats) -> jax.Array:
    """(obs - mean) / sqrt(var + 1e-8), clipped to [-10, 10]."""
    return jnp.clip((obs - stats.mean) / jnp.sqrt(stats.var + 1e-8), -10.0, 10.0)


# --------------------------------------------------------------------------------------------------
# Networks: the agent (Gaussian policy, memory units, PPO's value function) and the learned loss.
# --------------------------------------------------------------------------------------------------
class DiagGaussian(NamedTuple):
    """Diagonal Gaussian policy; mean [..., action_dim], log_std [action_dim] (state-independent)."""

    mean: jax.Array
    log_std: jax.Array

    def sample(self, key):
        return self.mean + jnp.exp(self.log_std) * jax.random.normal(key, self.mean.shape)

    def log_prob(self, action):
        z = (action - self.mean) / jnp.exp(self.log_std)
        return jnp.sum(-0.5 * z**2 - self.log_std - 0.5 * jnp.log(2 * jnp.pi), axis=-1)


def gaussian_kl(p: DiagGaussian, q: DiagGaussian) -> jax.Array:
    """KL(p ‖ q) of diagonal Gaussians, summed over action dimensions: [...]."""
    var_p, var_q = jnp.exp(2 * p.log_std), jnp.exp(2 * q.log_std)
    return jnp.sum(q.log_std - p.log_std + (var_p + (p.mean - q.mean) ** 2) / (2 * var_q) - 0.5, axis=-1)


class MLP(nn.Module):
    hidden: Tuple[int, ...]
    out_dim: int
    out_scale: float

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = nn.tanh(nn.Dense(width, kernel_init=nn.initializers.orthogonal(np.sqrt(2)))(x))
        return nn.Dense(self.out_dim, kernel_init=nn.initializers.orthogonal(self.out_scale))(x)


def init_agent(key: jax.Array, args: Args, obs_dim: int, action_dim: int) -> dict:
    """A fresh agent: {"policy": MLP params, "log_std": [action_dim], "memory": [memory_units], "value": MLP params}.

    The policy maps a normalised observation to the Gaussian's mean (64-64 tanh in the reference); the
    memory units are parameters the policy does not use: only the learned loss reads them and, through its
    gradient, moves them, which lets it keep state across updates (paper section 3.2). The value function
    serves only the auxiliary PPO loss.
    """
    key_pi, key_v = jax.random.split(key)
    dummy = jnp.zeros((1, obs_dim))
    return {"policy": MLP(tuple(args.policy_hidden), action_dim, 0.01).init(key_pi, dummy),
            "log_std": jnp.zeros(action_dim), "memory": jnp.zeros(args.memory_units),
            "value": MLP(tuple(args.policy_hidden), 1, 1.0).init(key_v, dummy)}


def policy_distribution(args: Args, agent: dict, obs: jax.Array) -> DiagGaussian:
    """π(·|obs) for normalised observations [..., obs_dim]."""
    mean = MLP(tuple(args.policy_hidden), agent["log_std"].shape[0], 0.01).apply(agent["policy"], obs)
    return DiagGaussian(mean, agent["log_std"])


def value_fn(args: Args, agent: dict, obs: jax.Array) -> jax.Array:
    """V(obs) [...] for normalised observations [..., obs_dim]."""
    return MLP(tuple(args.policy_hidden), 1, 1.0).apply(agent["value"], obs)[..., 0]


class EPGLoss(nn.Module):
    """The learned loss L_φ (paper Fig. 2; reference code's Conv1DLoss).

    __call__(inputs [N, D], index [B]) -> scalar. `inputs` holds one row per step of the buffer of the last
    N steps, D features: normalised observation, action, reward, done, the policy's mean and log-std at that
    observation, and the memory units. Context branch: the whole buffer, features as channels, through
    Conv1d(D→16, kernel 6, stride 5), leaky ReLU, Conv1d(16→32, kernel 4, stride 2), leaky ReLU, the mean over
    time, Dense(32→32). Loss head, for the B steps of the minibatch `index`: [step features, context] →
    Dense(16), leaky ReLU, Dense(1); the loss is the mean over the minibatch.
    """

    @nn.compact
    def __call__(self, inputs, index):
        x = nn.leaky_relu(nn.Conv(16, kernel_size=(6,), strides=(5,), padding="VALID")(inputs))
        x = nn.leaky_relu(nn.Conv(32, kernel_size=(4,), strides=(2,), padding="VALID")(x))
        context = nn.Dense(32)(x.mean(axis=0))
        steps = inputs[index]
        h = jnp.concatenate([steps, jnp.broadcast_to(context, (steps.shape[0], context.shape[0]))], axis=-1)
        return nn.Dense(1)(nn.leaky_relu(nn.Dense(16)(h))).mean()


def loss_input_dim(obs_dim: int, action_dim: int, memory_units: int) -> int:
    """D: observation, action, reward, done, policy mean and log-std, memory units."""
    return obs_dim + action_dim + 2 + 2 * action_dim + memory_units


def init_loss_params(key: jax.Array, args: Args, obs_dim: int, action_dim: int) -> dict:
    """Parameters φ of EPGLoss for this task family's dimensions (flax default initialisation)."""
    n = args.buffer_size
    return EPGLoss().init(key, jnp.zeros((n, loss_input_dim(obs_dim, action_dim, args.memory_units))),
                          jnp.arange(args.minibatch_size))


# --------------------------------------------------------------------------------------------------
# The method's pure functions: the loss inputs, the two inner losses, GAE, and the ES update.
# --------------------------------------------------------------------------------------------------
class Buffer(NamedTuple):
    """The last N steps of experience, oldest first; rows not yet filled are zero and `valid` 0."""

    obs: jax.Array  # [N, obs_dim], raw
    action: jax.Array  # [N, action_dim], as sampled (before clipping to the action bounds)
    reward: jax.Array  # [N]
    done: jax.Array  # [N], 1 where the episode ended (terminated or truncated) at this step
    terminated: jax.Array  # [N]
    final_obs: jax.Array  # [N, obs_dim], the true next observation (for bootstrapping)
    valid: jax.Array  # [N]


def loss_inputs(args: Args, agent: dict, buffer: Buffer, obs_stats: RunningStats) -> jax.Array:
    """The learned loss's per-step inputs [N, D], zero on the buffer's unfilled rows.

    The policy outputs are recomputed from `agent`, so the gradient of L_φ reaches the policy through
    them (in every row, hence also through the context) and reaches the memory units directly.
    """
    obs = normalize(buffer.obs, obs_stats)
    pi = policy_distribution(args, agent, obs)
    n = obs.shape[0]
    x = jnp.concatenate([obs, buffer.action, buffer.reward[:, None], buffer.done[:, None], pi.mean,
                         jnp.broadcast_to(pi.log_std, pi.mean.shape), jnp.broadcast_to(agent["memory"], (n, args.memory_units))],
                        axis=-1)
    return x * buffer.valid[:, None]


def compute_gae(rewards, values, next_values, terminated, cuts, gamma: float, gae_lambda: float):
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438, eq. 16), by reverse scan.

        δ_t = r_t + γ·(1 - terminated_t)·V(s'_t) - V(s_t)
        A_t = δ_t + γ·λ·(1 - cut_t)·A_{t+1}

    s'_t is the true next state, so a time-limit truncation bootstraps from the value of the final
    state, and only a real termination drops the bootstrap. `cut_t` is 1 where the trace stops: at
    episode ends (terminated or truncated) and at the last step of the window.
    Args: all arrays [T]. Returns (advantages, returns = advantages + values), both [T].
    """
    def backward(next_advantage, step):
        reward, value, next_value, term, cut = step
        delta = reward + gamma * (1.0 - term) * next_value - value
        advantage = delta + gamma * gae_lambda * (1.0 - cut) * next_advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(backward, jnp.zeros_like(values[0]),
                                 (rewards, values, next_values, terminated, cuts), reverse=True)
    return advantages, advantages + values


class PPOBatch(NamedTuple):
    """The M newest steps, prepared for the auxiliary PPO loss before the update starts: [M, ...]."""

    obs: jax.Array  # normalised
    action: jax.Array
    old_pi: DiagGaussian
    advantage: jax.Array  # normalised over the M steps
    target: jax.Array  # value target (GAE return)


def ppo_loss(args: Args, agent: dict, batch: PPOBatch) -> jax.Array:
    """The reference's auxiliary PPO loss on a minibatch [B, ...]:
    -mean(min(r·A, clip(r, 1±ε)·A)) + kl_coef·mean(KL(π_old ‖ π)) + mean((V - V_target)²)
    (Schulman et al. 2017, arXiv:1707.06347, eq. 7, plus the value error and a small KL penalty)."""
    pi = policy_distribution(args, agent, batch.obs)
    ratio = jnp.exp(pi.log_prob(batch.action) - batch.old_pi.log_prob(batch.action))
    clipped = jnp.clip(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
    policy = -jnp.mean(jnp.minimum(ratio * batch.advantage, clipped * batch.advantage))
    value = jnp.mean((value_fn(args, agent, batch.obs) - batch.target) ** 2)
    return policy + args.kl_coef * jnp.mean(gaussian_kl(batch.old_pi, pi)) + value


def centered_ranks(fitness: jax.Array) -> jax.Array:
    """Centered-rank fitness shaping (Salimans et al. 2017, arXiv:1703.03864, section 2.2): [pop] -> [pop].

    The member of rank k (0 = lowest fitness) gets k / (pop - 1) - 0.5, in [-0.5, 0.5]; non-finite
    fitness counts as the lowest.
    """
    fitness = jnp.where(jnp.isfinite(fitness), fitness, -jnp.inf)
    ranks = jnp.argsort(jnp.argsort(fitness))
    return ranks / (fitness.shape[0] - 1) - 0.5


def antithetic_noise(key: jax.Array, pop_size: int, dim: int) -> jax.Array:
    """ε [pop_size, dim]: pop_size/2 standard normal vectors followed by their negatives."""
    eps = jax.random.normal(key, (pop_size // 2, dim))
    return jnp.concatenate([eps, -eps])


def es_gradient(theta: jax.Array, eps: jax.Array, fitness: jax.Array, sigma: float, weight_decay: float) -> jax.Array:
    """The ES ascent direction for the loss parameters θ [dim] (Salimans et al. 2017, eq. 1 with section 2.2):

        g = 1/(n·σ) Σ_i rank(F_i)·ε_i  -  weight_decay·θ

    ε [n, dim] is the noise of the n members θ + σ·ε_i and F [n] their fitnesses (mean return over their tasks).
    """
    return centered_ranks(fitness) @ eps / (eps.shape[0] * sigma) - weight_decay * theta


# --------------------------------------------------------------------------------------------------
# The inner loop: make_lifetime(args) returns a pure lifetime(loss_params, task, key, alpha).
# --------------------------------------------------------------------------------------------------
class Step(NamedTuple):
    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    done: jax.Array
    terminated: jax.Array
    final_obs: jax.Array


class LifetimeState(NamedTuple):
    agent: dict
    opt_state: optax.OptState
    obs_stats: RunningStats
    buffer: Buffer
    env_state: object
    obs: jax.Array
    episode_return: jax.Array  # return of the running episode so far
    last_return: jax.Array  # return of the last finished episode (NaN before the first)
    key: jax.Array


class LifetimeOutput(NamedTuple):
    final_return: jax.Array  # scalar: mean return of the final policy over --num-eval-episodes (the fitness)
    curve: jax.Array  # [lifetime / M]: return of the last finished episode at each policy update (NaN before)
    agent: dict  # the final agent parameters (init_agent's structure)


def num_policy_updates(args: Args) -> int:
    return args.lifetime // args.update_every


def make_lifetime(args: Args) -> Callable:
    """lifetime(loss_params, task, key, alpha) -> LifetimeOutput: one agent learning one task (Algorithm 1, inner loop).

    A fresh agent acts for --lifetime steps in a single environment, across episodes (auto-reset on done).
    Every M = --update-every steps, the buffer (last N steps) is refreshed and the agent takes
    --update-epochs passes over the M newest steps in minibatches of --minibatch-size, each an Adam step on
    (1 - α)·L_φ + α·L_PPO, where L_φ's context is computed from the whole buffer with the current policy.
    Non-finite gradients are skipped. The return: the final stochastic policy's mean episode return over
    --num-eval-episodes fresh episodes. The whole lifetime is one lax.scan; jit and vmap freely
    (loss_params: the EPGLoss pytree; task: one task of the family; alpha: scalar in [0, 1]).
    """
    env = make_env(args)
    obs_dim, action_dim, n, m = env.obs_dim, env.action_dim, args.buffer_size, args.update_every
    loss_net = EPGLoss()
    optimizer = optax.adam(args.inner_learning_rate)
    num_minibatches = m // args.minibatch_size

    def act(agent, obs_stats, obs, env_state, task, key_action, key_env):
        """Sample a ~ π(·|obs) and step the env with a clipped to the action bounds: (a, env.step's outputs)."""
        action = policy_distribution(args, agent, normalize(obs, obs_stats)).sample(key_action)
        return action, env.step(key_env, env_state, jnp.clip(action, env.action_low, env.action_high), task)

    def env_step(state: LifetimeState, task):
        key, key_action, key_env = jax.random.split(state.key, 3)
        action, (obs, env_state, reward, terminated, truncated, final_obs) = act(
            state.agent, state.obs_stats, state.obs, state.env_state, task, key_action, key_env)
        done = jnp.maximum(terminated, truncated)
        episode_return = state.episode_return + reward
        step = Step(state.obs, action, reward, done, terminated, final_obs)
        state = state._replace(
            env_state=env_state, obs=obs, key=key, episode_return=episode_return * (1.0 - done),
            last_return=jnp.where(done > 0, episode_return, state.last_return))
        return state, step

    def prepare_ppo(agent, buffer, obs_stats) -> PPOBatch:
        recent = jax.tree.map(lambda x: x[n - m:], buffer)
        obs, final_obs = normalize(recent.obs, obs_stats), normalize(recent.final_obs, obs_stats)
        values, next_values = value_fn(args, agent, obs), value_fn(args, agent, final_obs)
        cuts = recent.done.at[-1].set(1.0)
        advantage, target = compute_gae(recent.reward, values, next_values, recent.terminated, cuts,
                                        args.gamma, args.gae_lambda)
        advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
        pi = policy_distribution(args, agent, obs)
        old_pi = DiagGaussian(pi.mean, jnp.broadcast_to(pi.log_std, pi.mean.shape))  # per row, for minibatching
        return PPOBatch(obs, recent.action, old_pi, advantage, target)

    def update(state: LifetimeState, loss_params, alpha):
        batch = prepare_ppo(state.agent, state.buffer, state.obs_stats)

        def total_loss(agent, index):
            epg = loss_net.apply(loss_params, loss_inputs(args, agent, state.buffer, state.obs_stats), n - m + index)
            ppo = ppo_loss(args, agent, jax.tree.map(lambda x: x[index], batch))
            return (1.0 - alpha) * epg + alpha * ppo

        def minibatch_step(carry, index):
            agent, opt_state = carry
            grads = jax.grad(total_loss)(agent, index)
            finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
            grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
            updates, opt_state = optimizer.update(grads, opt_state, agent)
            return (optax.apply_updates(agent, updates), opt_state), None

        def epoch(carry, key):
            indices = jax.random.permutation(key, m).reshape(num_minibatches, args.minibatch_size)
            return jax.lax.scan(minibatch_step, carry, indices)

        key, key_epochs = jax.random.split(state.key)
        (agent, opt_state), _ = jax.lax.scan(epoch, (state.agent, state.opt_state),
                                             jax.random.split(key_epochs, args.update_epochs))
        return state._replace(agent=agent, opt_state=opt_state, key=key)

    def interval(state: LifetimeState, loss_params, task, alpha):
        """M environment steps, then one policy update; returns (state, last finished episode's return)."""
        state, steps = jax.lax.scan(lambda s, _: env_step(s, task), state, None, m)
        obs_stats = update_running_stats(state.obs_stats, steps.obs)
        roll = lambda old, new: jnp.concatenate([old[m:], new])
        buffer = Buffer(*(roll(getattr(state.buffer, f), getattr(steps, f)) for f in Step._fields),
                        valid=roll(state.buffer.valid, jnp.ones(m)))
        state = update(state._replace(obs_stats=obs_stats, buffer=buffer), loss_params, alpha)
        return state, state.last_return

    def evaluate(agent, obs_stats, task, key):
        """Mean return of --num-eval-episodes fresh episodes of the stochastic policy."""
        def episode(key):
            key_reset, key_run = jax.random.split(key)
            obs, env_state = env.reset(key_reset, task)

            def step(carry, key):
                obs, env_state, total, alive = carry
                _, (obs, env_state, reward, terminated, truncated, _) = act(agent, obs_stats, obs, env_state, task,
                                                                            *jax.random.split(key))
                total = total + alive * reward
                return (obs, env_state, total, alive * (1.0 - jnp.maximum(terminated, truncated))), None

            (_, _, total, _), _ = jax.lax.scan(step, (obs, env_state, 0.0, 1.0),
                                               jax.random.split(key_run, env.max_episode_steps))
            return total

        return jax.vmap(episode)(jax.random.split(key, args.num_eval_episodes)).mean()

    def lifetime(loss_params, task, key, alpha):
        key_agent, key_reset, key_run, key_eval = jax.random.split(key, 4)
        agent = init_agent(key_agent, args, obs_dim, action_dim)
        obs, env_state = env.reset(key_reset, task)
        zeros = lambda *shape: jnp.zeros((n,) + shape)
        buffer = Buffer(zeros(obs_dim), zeros(action_dim), zeros(), zeros(), zeros(), zeros(obs_dim), zeros())
        state = LifetimeState(agent, optimizer.init(agent), init_running_stats(obs_dim), buffer, env_state, obs,
                              jnp.float32(0.0), jnp.float32(jnp.nan), key_run)
        state, curve = jax.lax.scan(lambda s, _: interval(s, loss_params, task, alpha), state, None,
                                    num_policy_updates(args))
        return LifetimeOutput(evaluate(state.agent, state.obs_stats, task, key_eval), curve, state.agent)

    return lifetime


def loss_template(args: Args) -> dict:
    """EPGLoss parameters for args' task family (the generation-0 loss, flax default init from --seed)."""
    env = make_env(args)
    return init_loss_params(jax.random.PRNGKey(args.seed), args, env.obs_dim, env.action_dim)


def env_sizes(args: Args) -> Tuple[int, int]:
    """(num_links, num_geoms) that random-hopper tasks need; (0, 0) for the other families."""
    if args.task_family != "random-hopper":
        return 0, 0
    env = make_env(args)
    return env.num_links, env.num_geoms


def ppo_alpha(args: Args, generation: int) -> float:
    """α of generation g (0-based): linear from 1 at g = 0 to 0 at g = ppo_anneal_frac·num_generations, then 0."""
    horizon = args.ppo_anneal_frac * args.num_generations
    return 0.0 if horizon <= 0 else max(0.0, 1.0 - generation / horizon)


# --------------------------------------------------------------------------------------------------
# The outer loop: one compiled ES generation, sharded over the devices.
# --------------------------------------------------------------------------------------------------
def generation_key(args: Args, generation: int) -> jax.Array:
    """The PRNG key of one generation, from --seed and the generation index alone (so --resume redraws
    exactly the noise, tasks and lifetimes an uninterrupted run would)."""
    return jax.random.fold_in(jax.random.PRNGKey(args.seed), generation)


def make_es_optimizer(args: Args) -> optax.GradientTransformation:
    """Adam on the negated ES direction; learning rate ÷10 after half of the generations (the reference's)."""
    schedule = optax.piecewise_constant_schedule(args.es_learning_rate, {args.num_generations // 2: 0.1})
    return optax.adam(schedule)


def make_generation(args: Args) -> Callable:
    """generation(theta, opt_state, key, alpha) -> (theta, opt_state, fitness [pop], task_returns [pop, num_tasks]).

    θ [dim] is the flattened loss; members are θ + σ·ε_i with antithetic ε. Each antithetic pair shares
    its --num-tasks tasks and lifetime seeds (common random numbers); a member's fitness is its mean
    final return over them, so an easy task cannot favour one vector. The member axis is sharded over all
    JAX devices (shard_map): each device runs its members' lifetimes and only returns come back.
    """
    unravel = ravel_pytree(loss_template(args))[1]
    lifetime = make_lifetime(args)
    num_links, num_geoms = env_sizes(args)
    optimizer = make_es_optimizer(args)
    half, t = args.pop_size // 2, args.num_tasks

    def member_returns(theta, tasks, keys, alpha):
        """theta [dim], tasks [t, ...], keys [t, 2] -> final returns [t]."""
        run = lambda task, key: lifetime(unravel(theta), task, key, alpha).final_return
        return jax.vmap(run)(tasks, keys)

    population_returns = jax.vmap(member_returns, in_axes=(0, 0, 0, None))
    devices = jax.devices()
    if len(devices) > 1:
        mesh = jax.sharding.Mesh(np.array(devices), ("pop",))
        P = jax.sharding.PartitionSpec
        population_returns = jax.shard_map(population_returns, mesh=mesh, in_specs=(P("pop"), P("pop"), P("pop"), P()),
                                           out_specs=P("pop"), check_vma=False)

    def generation(theta, opt_state, key, alpha):
        key_noise, key_tasks, key_lives = jax.random.split(key, 3)
        eps = antithetic_noise(key_noise, args.pop_size, theta.shape[0])
        pair_tasks = sample_tasks(args.task_family, key_tasks, half * t, False, num_links, num_geoms)
        pair_tasks = jax.tree.map(lambda x: x.reshape((half, t) + x.shape[1:]), pair_tasks)
        tasks = jax.tree.map(lambda x: jnp.concatenate([x, x]), pair_tasks)
        keys = jax.random.split(key_lives, half * t).reshape(half, t, -1)
        returns = population_returns(theta + args.sigma * eps, tasks, jnp.concatenate([keys, keys]), alpha)
        fitness = returns.mean(axis=1)
        grad = es_gradient(theta, eps, fitness, args.sigma, args.weight_decay)
        updates, opt_state = optimizer.update(-grad, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state, fitness, returns

    return jax.jit(generation)


def over_devices(fn: Callable, n: int) -> Callable:
    """jit(vmap(fn)) with axis 0 of every argument and output sharded over the largest number of JAX
    devices that divides n."""
    devices = jax.devices()
    k = math.gcd(n, len(devices))
    if k == 1:
        return jax.jit(jax.vmap(fn))
    mesh = jax.sharding.Mesh(np.array(devices[:k]), ("run",))
    spec = jax.sharding.PartitionSpec("run")
    return jax.jit(jax.shard_map(jax.vmap(fn), mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))


def make_evaluate_loss(args: Args) -> Callable:
    """evaluate(theta, key) -> final returns [num_eval_tasks]: the loss θ alone (α = 0) on fresh
    training-distribution tasks, one lifetime each."""
    unravel = ravel_pytree(loss_template(args))[1]
    lifetime = make_lifetime(args)
    num_links, num_geoms = env_sizes(args)
    runs = over_devices(lambda theta, task, key: lifetime(unravel(theta), task, key, 0.0).final_return,
                        args.num_eval_tasks)

    def evaluate(theta, key):
        key_tasks, key_lives = jax.random.split(key)
        tasks = sample_tasks(args.task_family, key_tasks, args.num_eval_tasks, False, num_links, num_geoms)
        thetas = jnp.broadcast_to(theta, (args.num_eval_tasks,) + theta.shape)
        return runs(thetas, tasks, jax.random.split(key_lives, args.num_eval_tasks))

    return evaluate


# --------------------------------------------------------------------------------------------------
# Files: atomic writes, checkpoints, loss files, plots.
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


GEN_FIELDS = ("generation", "alpha", "best_fitness", "mean_fitness", "eval_fitness", "seconds")


def save_checkpoint(run_dir: str, theta, opt_state, rows: list, best: dict):
    """checkpoint.msgpack: loss parameters θ, Adam state, log rows, best evaluated loss so far (atomic)."""
    state = {"theta": np.asarray(theta), "opt_state": flax.serialization.to_state_dict(opt_state),
             "generation": len(rows),
             "rows": {k: np.array([r[k] for r in rows], dtype=np.float64) for k in GEN_FIELDS},
             "best_fitness": np.float64(best["fitness"]), "best_theta": np.asarray(best["theta"])}
    atomic_write(os.path.join(run_dir, "checkpoint.msgpack"),
                 flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, state)))


def load_checkpoint(run_dir: str, theta_template, opt_template):
    """(theta, opt_state, rows, best) from run_dir/checkpoint.msgpack. Raises ArgsError if missing or damaged."""
    path = os.path.join(run_dir, "checkpoint.msgpack")
    if not os.path.isfile(path):
        raise ArgsError(f"--resume {run_dir}: {path} not found (expected a run directory written by epg.py)")
    try:
        with open(path, "rb") as f:
            state = flax.serialization.msgpack_restore(f.read())
        theta, best_theta = jnp.asarray(state["theta"]), jnp.asarray(state["best_theta"])
        if theta.shape != theta_template.shape or best_theta.shape != theta_template.shape:
            raise ValueError(f"loss of {theta.shape[0]} parameters, the arguments need {theta_template.shape[0]}")
        opt_state = jax.tree.map(jnp.asarray, flax.serialization.from_state_dict(opt_template, state["opt_state"]))
        n = int(state["generation"])
        rows = [{k: (int if k == "generation" else float)(state["rows"][k][i]) for k in GEN_FIELDS} for i in range(n)]
        best = {"fitness": float(state["best_fitness"]), "theta": best_theta}
    except Exception as e:
        raise ArgsError(f"--resume {run_dir}: damaged checkpoint.msgpack ({type(e).__name__}: {e})") from None
    return theta, opt_state, rows, best


def save_loss(path: str, theta, args: Args):
    """A loss file: the flattened EPGLoss parameters and the settings that fix their shapes (atomic msgpack)."""
    state = {"theta": np.asarray(theta), "task_family": args.task_family, "buffer_size": args.buffer_size,
             "memory_units": args.memory_units, "minibatch_size": args.minibatch_size}
    atomic_write(path, flax.serialization.msgpack_serialize(state))


def load_loss(path: str, args: Args) -> Tuple[jax.Array, int]:
    """(θ [dim], memory_units) of a loss file, or of a run directory's best_loss.msgpack.

    Raises: ArgsError when the file is missing, damaged, or its size does not fit args' task family.
    """
    file = os.path.join(path, "best_loss.msgpack") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ArgsError(f"--load-loss {path}: {file} not found (give a run directory of epg.py or a loss .msgpack)")
    try:
        with open(file, "rb") as f:
            state = flax.serialization.msgpack_restore(f.read())
        theta = jnp.asarray(state["theta"], dtype=jnp.float32)
        memory_units = int(state["memory_units"])
    except Exception as e:
        raise ArgsError(f"--load-loss {path}: damaged loss file {file} ({type(e).__name__}: {e})") from None
    expected = ravel_pytree(loss_template(dataclasses.replace(args, memory_units=memory_units)))[0].shape
    if theta.shape != expected:
        raise ArgsError(f"--load-loss {path}: a loss of {theta.shape} parameters (trained on {state['task_family']}) "
                        f"does not fit --task-family {args.task_family}, which needs {expected}")
    if memory_units != args.memory_units:
        print(f"using the loss file's --memory-units {memory_units}")
    return theta, memory_units


def plot_fitness_curve(path: str, rows: list, title: str):
    """PNG of the mean and best member fitness per generation, the evaluated loss, and α."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = [r["generation"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(g, [r["mean_fitness"] for r in rows], label="population mean")
    ax.plot(g, [r["best_fitness"] for r in rows], label="best member", alpha=0.6)
    evaluated = [(r["generation"], r["eval_fitness"]) for r in rows if np.isfinite(r["eval_fitness"])]
    if evaluated:
        ax.plot(*zip(*evaluated), "o-", label="current loss, α = 0")
    ax.set(xlabel="generation", ylabel="final return (mean over tasks)", title=title)
    twin = ax.twinx()
    twin.plot(g, [r["alpha"] for r in rows], color="grey", ls=":", label="α (PPO weight)")
    twin.set(ylabel="α", ylim=(-0.02, 1.02))
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, [h.get_label() for h in lines], fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def plot_test_curves(path: str, steps: np.ndarray, curves: dict, title: str):
    """PNG of return against lifetime step, mean ± std over agents, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        with warnings.catch_warnings():  # updates before any episode ended are NaN for every agent
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, std = np.nanmean(curve, axis=0), np.nanstd(curve, axis=0)
        ax.plot(steps, mean, label=name)
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.set(xlabel="lifetime step", ylabel="return of the last finished episode", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


# --------------------------------------------------------------------------------------------------
# Meta-training, test, main.
# --------------------------------------------------------------------------------------------------
def args_from_json(path: str) -> Args:
    with open(path) as f:
        saved = json.load(f)
    fields = {f.name for f in dataclasses.fields(Args)}
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields}
    return Args(**saved)


def default_run_dir(args: Args) -> str:
    return os.path.join("runs", f"{args.task_family}__{args.exp_name}__{args.seed}__{int(time.time())}")


def run_meta_training(args: Args) -> str:
    """ES over the loss; writes the run directory and checkpoints as it goes."""
    from tqdm import tqdm

    if args.resume is not None:
        run_dir = args.resume
        if not os.path.isfile(os.path.join(run_dir, "args.json")):
            raise ArgsError(f"--resume {run_dir}: args.json not found (expected a run directory written by epg.py)")
        try:
            saved = args_from_json(os.path.join(run_dir, "args.json"))
        except (json.JSONDecodeError, TypeError) as e:
            raise ArgsError(f"--resume {run_dir}: damaged args.json ({e})") from None
        extend = args.num_generations if args.num_generations is not None else saved.num_generations
        args = resolve_args(dataclasses.replace(saved, resume=run_dir, num_generations=extend))
    else:
        run_dir = args.run_dir or default_run_dir(args)
        os.makedirs(run_dir, exist_ok=True)
    theta = ravel_pytree(loss_template(args))[0]
    optimizer = make_es_optimizer(args)
    opt_state = optimizer.init(theta)
    rows, best = [], {"fitness": -np.inf, "theta": theta}
    if args.resume is not None:
        theta, opt_state, rows, best = load_checkpoint(run_dir, theta, opt_state)
    write_json(os.path.join(run_dir, "args.json"), dataclasses.asdict(dataclasses.replace(args, resume=None)))
    csv_path = os.path.join(run_dir, "generations.csv")
    with open(csv_path + ".tmp", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(GEN_FIELDS)
        writer.writerows([[r[k] for k in GEN_FIELDS] for r in rows])
    os.replace(csv_path + ".tmp", csv_path)

    lifetimes = args.pop_size * args.num_tasks
    print(f"meta-training a loss of {theta.shape[0]:,} parameters on {args.task_family}: population {args.pop_size} × "
          f"{args.num_tasks} task(s) = {lifetimes} lifetimes of {args.lifetime:,} steps per generation on "
          f"{jax.device_count()} {jax.default_backend()} device(s), generations {len(rows)}..{args.num_generations}")
    start = time.time()
    generation = make_generation(args).lower(theta, opt_state, generation_key(args, 0), 1.0).compile()
    evaluate = jax.jit(make_evaluate_loss(args))  # compiled at its first use, outside the timed generation
    print(f"compiled in {time.time() - start:.1f}s", flush=True)

    def checkpoint():
        save_checkpoint(run_dir, theta, opt_state, rows, best)
        save_loss(os.path.join(run_dir, "loss.msgpack"), theta, args)
        save_loss(os.path.join(run_dir, "best_loss.msgpack"), best["theta"], args)
        plot_fitness_curve(os.path.join(run_dir, "fitness_curve.png"), rows, f"EPG on {args.task_family}")

    writer = None
    if args.tensorboard:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(run_dir)
    bar = tqdm(range(len(rows), args.num_generations), initial=len(rows), total=args.num_generations,
               desc="generations", file=sys.stdout, mininterval=0)
    try:
        for g in bar:
            t0 = time.time()
            alpha = ppo_alpha(args, g)
            new_theta, new_opt_state, fitness, _ = generation(theta, opt_state, generation_key(args, g), alpha)
            fitness = np.asarray(fitness)
            seconds = time.time() - t0  # the generation alone, without the evaluation below
            eval_fitness, new_best = float("nan"), best
            if (g + 1) % args.eval_every == 0 or g + 1 == args.num_generations:
                # the loss as it will be used at test time: α = 0, fresh tasks and agents
                key = jax.random.fold_in(generation_key(args, g), 1_000_003)
                eval_fitness = float(np.nanmean(np.asarray(evaluate(new_theta, key))))
                if eval_fitness > best["fitness"]:
                    new_best = {"fitness": eval_fitness, "theta": new_theta}
            finite = np.where(np.isfinite(fitness), fitness, -np.inf)
            row = dict(generation=g + 1, alpha=alpha, best_fitness=float(finite.max()),
                       mean_fitness=float(np.nanmean(np.where(np.isfinite(fitness), fitness, np.nan))),
                       eval_fitness=eval_fitness, seconds=seconds)
            # commit the generation in one assignment, so an interruption sees it whole or not at all
            theta, opt_state, rows, best = new_theta, new_opt_state, rows + [row], new_best
            with open(csv_path, "a", newline="") as f:
                csv.writer(f).writerow([row[k] for k in GEN_FIELDS])
            bar.set_postfix(mean=f"{row['mean_fitness']:.1f}", best=f"{row['best_fitness']:.1f}", alpha=f"{alpha:.2f}",
                            sec=f"{row['seconds']:.1f}")
            if writer is not None:
                for k in GEN_FIELDS[1:]:
                    writer.add_scalar(f"es/{k}", row[k], g + 1)
            if (g + 1) % args.save_every == 0 or g + 1 == args.num_generations:
                checkpoint()
    except KeyboardInterrupt:
        bar.close()
        checkpoint()
        print(f"interrupted after generation {len(rows)}; checkpoint saved; continue with: python epg.py --resume {run_dir}",
              file=sys.stderr)
        sys.exit(130)
    bar.close()
    if writer is not None:
        writer.close()
    seconds = [r["seconds"] for r in rows[-max(1, len(rows) // 2):]]
    summary = dict(task_family=args.task_family, num_generations=len(rows), pop_size=args.pop_size,
                   num_tasks=args.num_tasks, lifetime=args.lifetime, best_eval_fitness=best["fitness"],
                   final_mean_fitness=rows[-1]["mean_fitness"] if rows else None,
                   lifetimes_per_minute=60.0 * lifetimes / float(np.median(seconds)) if rows else None,
                   wall_seconds=time.time() - start, device=f"{jax.device_count()} x {jax.devices()[0].device_kind}")
    write_json(os.path.join(run_dir, "summary.json"), summary)
    print(f"best evaluated loss: {best['fitness']:.2f}; last generation mean {summary['final_mean_fitness']:.2f}")
    return run_dir


def run_test(args: Args) -> str:
    """The paper's test: fresh agents on test-distribution tasks, with the evolved loss (α = 0) and with PPO
    (α = 1), same tasks, seeds and steps, in one vmapped run; curves, CSV and summary.json."""
    theta, memory_units = load_loss(args.load_loss, args)
    args = dataclasses.replace(args, memory_units=memory_units)
    run_dir = args.run_dir or default_run_dir(dataclasses.replace(args, exp_name="epg_test"))
    os.makedirs(run_dir, exist_ok=True)
    write_json(os.path.join(run_dir, "args.json"), dataclasses.asdict(args))
    unravel = ravel_pytree(loss_template(args))[1]
    lifetime = make_lifetime(args)
    num_links, num_geoms = env_sizes(args)
    key_tasks, key_lives = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(args.seed), 2**20))
    tasks = sample_tasks(args.task_family, key_tasks, args.num_seeds, True, num_links, num_geoms)
    keys = jax.random.split(key_lives, args.num_seeds)
    one = lambda alpha, task, key: lifetime(unravel(theta), task, key, alpha)
    # methods × agents in one compiled run; both methods see the same tasks and seeds
    run_all = over_devices(lambda alpha: jax.vmap(one, in_axes=(None, 0, 0))(alpha, tasks, keys), 2)
    print(f"training {args.num_seeds} agent(s) on test tasks of {args.task_family} with the evolved loss and with "
          f"PPO, {args.lifetime:,} steps each", flush=True)
    start = time.time()
    out = jax.block_until_ready(run_all(jnp.array([0.0, 1.0])))
    returns, curves = np.asarray(out.final_return), np.asarray(out.curve)
    names = ["EPG", "PPO"]
    summary = dict(task_family=args.task_family, loss_file=os.path.abspath(args.load_loss), num_seeds=args.num_seeds,
                   lifetime=args.lifetime, wall_seconds=time.time() - start,
                   tasks={k: np.asarray(v).tolist() for k, v in tasks.items()})
    steps = (np.arange(curves.shape[-1]) + 1) * args.update_every
    with open(os.path.join(run_dir, "test_curves.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["lifetime_step"] + [f"{name}_mean" for name in names])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            writer.writerows(np.column_stack([steps] + [np.nanmean(c, axis=0) for c in curves]).tolist())
    for name, r in zip(names, returns):
        summary[name] = dict(final_return_mean=float(r.mean()), final_return_std=float(r.std()), final_returns=r.tolist())
        print(f"{name:4s} {r.mean():10.2f} ± {r.std():.2f}")
    write_json(os.path.join(run_dir, "summary.json"), summary)
    plot_test_curves(os.path.join(run_dir, "test_curves.png"), steps, dict(zip(names, curves)),
                     f"{args.task_family} test tasks, {args.num_seeds} agents")
    return run_dir


def main(args: Args) -> str:
    """Meta-train (default), --resume, or --test; returns the run directory."""
    try:
        args = resolve_args(args) if args.resume is None else args
        run_dir = run_test(args) if args.test else run_meta_training(args)
    except ArgsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"run directory: {run_dir}")
    return run_dir


if __name__ == "__main__":
    main(tyro.cli(Args))
