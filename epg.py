"""Evolved Policy Gradients (EPG): evolve a loss function with which a fresh agent learns a new task.

A freshly initialised Gaussian policy learns one task of a family by gradient descent on a learned loss L_φ, a
temporal-convolution network that reads the agent's last N steps of experience and the policy's own outputs. Evolution
strategies search φ: a loss's fitness is the return its agent reaches at the end of a whole learning lifetime; the
evolved loss then trains fresh agents on unseen tasks, with no value function or advantage estimate of its own.

Paper: Rein Houthooft, Richard Y. Chen, Phillip Isola, Bradly C. Stadie, Filip Wolski, Jonathan Ho,
Pieter Abbeel, "Evolved Policy Gradients", NeurIPS 2018, arXiv:1802.04821 (sections 3-4, Algorithm 1).
Relative to a policy-gradient method, the hand-written surrogate objective is replaced by L_φ; during the
first part of meta-training it is mixed with a PPO loss, (1 - α)·L_φ + α·L_PPO, α annealed from 1 to 0.

Example (more in docs/epg.md: --test on held-out goals, the design checks, --resume):
    python epg.py --task-family goal-point --num-generations 200        # meta-train on the CPU family
"""

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable
from typing import Literal, NamedTuple

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats
import tyro
from jax.flatten_util import ravel_pytree
from tqdm import tqdm

LOSS_SIZES = {"small": ((8, 16), 16), "reference": ((16, 32), 32)}  # conv channels, context width
MIN_BUFFER = 21  # the two strided convolutions (kernel 6 stride 5, kernel 4 stride 2) need 21 steps
MEMORY_INPUTS = 64  # memory = tanh(W·1 + b) with W [64, memory_units] (the reference's Memory(64, size))
GENERATION_STREAM, EVAL_STREAM, TEST_STREAM, SWEEP_STREAM, SELECT_STREAM = range(5)  # fold_in(PRNGKey(seed), STREAM)
PPO_GAMMA, PPO_LAMBDA, PPO_CLIP, PPO_KL = 0.99, 0.95, 0.2, 1e-3  # the reference's PPO loss, epg/agents.py:24-27


@dataclasses.dataclass
class Args:
    """epg.py's command line (tyro): meta-training by default, --resume, or --test; resolve_args fills the Nones."""

    exp_name: str = "epg"
    """name of this experiment, part of the run name"""
    seed: int = 1
    """seed of the experiment: ES noise, tasks and lifetimes of generation g all derive from (seed, g)"""
    run_dir: str | None = None
    """where to write results; None: runs/{task_family}__{exp_name}__{seed}__{unix time}"""
    resume: str | None = None
    """continue meta-training from this run directory's checkpoint, with its saved arguments"""
    overwrite: bool = False
    """write a new run into a --run-dir that already holds one (its files are replaced); without it that is refused"""
    # several processes (JAX's multi-controller runtime, docs/distributed.md)
    coordinator_address: str | None = None
    """host:port where process 0 serves the coordinator (give every process the same command), or auto: the
    cluster's launcher says (SLURM, Open MPI, Cloud TPU)"""
    num_processes: int = 1
    """processes in the run, with --coordinator-address host:port"""
    process_id: int = 0
    """this process's index in [0, --num-processes), with --coordinator-address host:port"""
    init_timeout: int = 60
    """seconds to wait for every process to join"""
    task_family: Literal["goal-point"] = "goal-point"
    """the task family (GoalPointEnv; docs/epg.md: adding one), recorded in every loss file"""
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
    """learning rate of the agent's optimiser (policy, memory units, PPO value function)"""
    inner_optimizer: Literal["adam", "sgd"] = "adam"
    """the agent's optimiser: Adam (the reference's, agents.py:208) or SGD, whose step follows the loss's scale"""
    memory_units: int = 0
    """size of the memory vector tanh(W·1 + b) that only the loss reads and moves (0: none; the paper's 32)"""
    loss_form: Literal["epg", "pg-weight"] = "epg"
    """epg: the paper's loss of experience and policy outputs; pg-weight: L = -mean w·log π(a|s), w a function of
    stop-gradient reward features alone (LPG's and MetaGenRL's slot; docs/epg.md)"""
    loss_size: Literal["linear", "small", "reference"] = "small"
    """widths of the loss (or weight) network (LOSS_SIZES): small, the reference's, or linear (pg-weight only: w is a
    linear map of the PG_FEATURES)"""
    goal_split: Literal["sides", "sector", "half"] = "sides"
    """which goals train and which are held out for --test (docs/epg.md); half is the paper's"""
    num_eval_episodes: int = 3
    """fitness: the mean return of this many fresh episodes of the final policy after the lifetime (rollout.py:66)"""
    episode_length: int = 50
    """steps before a time-limit truncation"""
    reward_blind: bool = False
    """zero the reward input of the learned loss (a control: learning from reward, or an imprinted behaviour?)"""
    loss_init: Literal["zero-output", "flax"] = "zero-output"
    """θ₀: flax's init with the output layer's kernel at zero (θ₀ is the zero loss), or all flax's (the reference's)"""
    pop_size: int = 16
    """noise vectors per generation (even: antithetic pairs); must divide over the JAX devices"""
    num_tasks: int = 4
    """tasks of a generation, the same for every member; a member's fitness is its mean return over them"""
    balanced_tasks: bool = False
    """training goals in mirror quartets {g, -g, (-g_x, g_y), (g_x, -g_y)} (with --goal-split sides):
    no fixed point gains within a set, to first order"""
    num_generations: int | None = None
    """ES generations; None: 500 (on --resume, the saved run's unless given)"""
    sigma: float = 0.01
    """ES noise standard deviation σ"""
    es_learning_rate: float | None = None
    """Adam (β1 = 0) learning rate of the ES update, ÷10 at half the generations; None: σ/(2·√num_generations)"""
    weight_decay: float = 1e-3
    """L2 coefficient subtracted in the ES gradient, on the scale of the rank term ranks·ε / n (no 1/σ)"""
    ppo_anneal_frac: float = 0.125
    """α of (1-α)·L_EPG + α·L_PPO falls linearly from 1 to 0 over this fraction of the generations (0: α = 0)"""
    fix_ppo: bool = False
    """the reference's fix_ppo: α falls from 1 to 0.5 over the first sixteenth of the generations and stays at 0.5
    (evolution.py:115-117), instead of falling to 0 over --ppo-anneal-frac"""
    eval_every: int = 10
    """evaluate the current loss (ES mean, α = 0) every this many generations on the fixed evaluation tasks"""
    num_eval_tasks: int = 8
    """training-distribution tasks of that evaluation, drawn once per run (the curve of eval_fitness)"""
    num_select_tasks: int = 32
    """at the end, the evaluated ES mean that scores best on this many fresh training tasks is best_loss.msgpack"""
    save_every: int = 10
    """write a checkpoint every this many generations, and at the end"""
    test: bool = False
    """instead of meta-training: the --load-loss loss against tuned PPO and control losses on held-out tasks"""
    load_loss: str | None = None
    """--test: a loss .msgpack or a run directory (its best loss); the file's inner-loop settings are used"""
    load_reward_blind_loss: str | None = None
    """--test: a loss meta-trained with --reward-blind, run as a fifth trainer"""
    num_seeds: int = 32
    """--test: agents per trainer, each on its own held-out task; every trainer gets the same tasks and seeds"""
    ppo_rollouts: tuple[int, ...] = (64, 256)
    """--test: PPO sweep, rollout lengths (steps between updates)"""
    ppo_epochs: tuple[int, ...] = (1, 4)
    """--test: PPO sweep, epochs per update"""
    ppo_learning_rates: tuple[float, ...] = (1e-3, 3e-3)
    """--test: PPO sweep, Adam learning rates"""
    num_sweep_tasks: int = 8
    """--test: training-distribution tasks (one agent each) on which each PPO setting is scored"""


_NAMES = [f.name for f in dataclasses.fields(Args)]
LOSS_FILE_FIELDS = tuple(_NAMES[_NAMES.index("lifetime") : _NAMES.index("reward_blind") + 1])
"""the settings a loss file records, which --test uses (reward_blind last: a reward-blind loss shares the rest)"""


# ---- The method: the learned loss, its inputs, the auxiliary PPO loss, and the ES update.
class EPGLoss(nn.Module):
    """The learned loss L_φ (paper Fig. 2; Conv1DLoss, epg/losses.py:36-93): (inputs [N, D], index [B]) -> [B],
    `inputs` one row per buffer step (loss_inputs). Context: the whole buffer, features as channels, through
    Conv1d(D→16, kernel 6, stride 5), leaky ReLU, Conv1d(16→32, kernel 4, stride 2), leaky ReLU, mean over time,
    Dense(32). Head, for the B steps `index`: [step features, context] → Dense(16), leaky ReLU, Dense(1), one
    value per step: the loss is their mean (the pg-weight form's weights are the values). Leaky slope 0.2 (chainer's
    default, which the reference uses). `channels` and `context` set the widths (16, 32 and 32 above, the
    reference's; LOSS_SIZES)."""

    channels: tuple[int, int] = (16, 32)
    context: int = 32

    @nn.compact
    def __call__(self, inputs, index):
        leaky = functools.partial(nn.leaky_relu, negative_slope=0.2)
        x = leaky(nn.Conv(self.channels[0], kernel_size=(6,), strides=(5,), padding="VALID")(inputs))
        x = leaky(nn.Conv(self.channels[1], kernel_size=(4,), strides=(2,), padding="VALID")(x))
        context = nn.Dense(self.context)(x.mean(axis=0))
        h = jnp.concatenate([inputs[index], jnp.broadcast_to(context, index.shape + context.shape)], axis=-1)
        return nn.Dense(1, name="output")(leaky(nn.Dense(16)(h)))[..., 0]


class Buffer(NamedTuple):
    """The last N steps of experience, oldest first; rows not yet filled are zero and `valid` 0."""

    obs: jax.Array  # [N, obs_dim], raw
    action: jax.Array  # [N, action_dim], as sampled (before clipping to the action bounds)
    reward: jax.Array  # [N]
    done: jax.Array  # [N], 1 where the episode ended (terminated or truncated) at this step
    terminated: jax.Array  # [N]
    final_obs: jax.Array  # [N, obs_dim], the true next observation (for bootstrapping)
    valid: jax.Array  # [N]
    episode_step: jax.Array  # [N], steps taken in the episode before this one (0 at its first)


def loss_network(args: Args) -> EPGLoss | None:
    """The EPGLoss of --loss-size (None for linear, which has no network)."""
    return EPGLoss(*LOSS_SIZES[args.loss_size]) if args.loss_size in LOSS_SIZES else None


def loss_template(args: Args, env) -> dict:
    """The loss's parameters for the environment's sizes: the generation-0 loss θ₀, flax's default init from --seed,
    with the output layer's kernel at zero for --loss-init zero-output. pg-weight: the weight network reads the
    normalised observation and the PG_FEATURES; linear: {"weight": [6]}, zeros."""
    if args.loss_form == "pg-weight" and args.loss_size == "linear":
        return {"weight": jnp.zeros(len(PG_FEATURES))}
    dim = env.obs_dim + env.action_dim + 2 + 2 * env.action_dim + args.memory_units  # D, as in loss_inputs
    if args.loss_form == "pg-weight":
        dim = env.obs_dim + len(PG_FEATURES)
    inputs = jnp.zeros((args.buffer_size, dim))
    params = loss_network(args).init(jax.random.PRNGKey(args.seed), inputs, jnp.arange(args.minibatch_size))
    if args.loss_init == "zero-output":
        params["params"]["output"]["kernel"] = jnp.zeros_like(params["params"]["output"]["kernel"])
    return params


def loss_inputs(
    agent: dict, buffer: Buffer, obs_stats: "Normalizer", action_stats: "Normalizer", reward_blind=False
) -> jax.Array:
    """The loss's inputs [N, D]: normalised observation and action (each by its running statistics, as the
    reference's trajectory normaliser, agents.py:131-134), reward, done, policy mean and log-std, memory units
    (epg/agents.py:90-104), zero on unfilled rows. Policy outputs and memory units [memory_units] = tanh(W·1 + b) are
    recomputed from `agent`, so L_φ's gradient reaches the policy (also through the context) and W, b, which only L_φ
    reads (section 3.2; networks.py:51-70). Reward: raw (agents.py:142), or zero if `reward_blind` (agents.py:123)."""
    obs = obs_stats.normalize(buffer.obs)
    pi = policy_distribution(agent, obs)
    memory = jnp.tanh(jnp.ones(MEMORY_INPUTS) @ agent["memory"]["kernel"] + agent["memory"]["bias"])
    return (
        jnp.concatenate(
            [
                obs,
                action_stats.normalize(buffer.action),
                jnp.where(reward_blind, 0.0, buffer.reward)[:, None],
                buffer.done[:, None],
                pi.mean,
                jnp.broadcast_to(pi.log_std, pi.mean.shape),
                jnp.broadcast_to(memory, (obs.shape[0], memory.shape[0])),
            ],
            axis=-1,
        )
        * buffer.valid[:, None]
    )


PG_FEATURES = ("reward_to_go_0.9", "reward_to_go_0.99", "reward", "done", "step_in_episode", "constant")
REINFORCE = {"reinforce-0.9": 0, "reinforce-0.99": 1}  # hand-set linear weights: w = the z-scored reward-to-go


def pg_features(buffer: Buffer, episode_length: int, reward_blind=False) -> jax.Array:
    """The pg-weight form's inputs [N, 6] (PG_FEATURES), none a function of the policy: the reward-to-go within the
    buffer at γ 0.9 and 0.99 (summed to the episode's end or the buffer's, no bootstrap) and the reward, each
    z-scored over the filled rows; done; the step in the episode / episode_length; 1. Zero on unfilled rows. With
    `reward_blind` the reward is zero, so the three reward features are zero (this project's form, docs/epg.md)."""
    valid = buffer.valid
    reward = jnp.where(reward_blind, 0.0, buffer.reward) * valid

    def reward_to_go(gamma):
        def backward(following, step):
            r, done = step
            value = r + gamma * (1.0 - done) * following
            return value, value

        return jax.lax.scan(backward, jnp.float32(0.0), (reward, buffer.done), reverse=True)[1]

    def z_score(x):
        count = jnp.maximum(valid.sum(), 1.0)
        mean = (x * valid).sum() / count
        std = jnp.sqrt((((x - mean) * valid) ** 2).sum() / count)
        return (x - mean) / (std + 1e-8)

    columns = [z_score(reward_to_go(0.9)), z_score(reward_to_go(0.99)), z_score(reward)]
    columns += [buffer.done, buffer.episode_step / episode_length, jnp.ones_like(reward)]
    return jnp.stack(columns, axis=-1) * valid[:, None]


def pg_weight_loss(
    loss_params, agent: dict, buffer: Buffer, obs_stats: "Normalizer", index: jax.Array, args: Args, reward_blind=False
) -> jax.Array:
    """The pg-weight form, L = -1/B Σ_b w_b·log π(a_b|s_b) over the buffer rows `index` [B], the weights w [B] held
    fixed (stop-gradient): a linear map of pg_features (--loss-size linear), or the EPGLoss network of the
    normalised observations and pg_features, one output per row. Its gradient is -1/B Σ_b w_b·∇log π(a_b|s_b), the
    score-function estimator with learned weights (LPG, Oh et al. 2020, arXiv:2007.08794; this project's form in
    EPG's setting, docs/epg.md). Hand-set w = the z-scored reward-to-go is REINFORCE (Williams 1992)."""
    features = pg_features(buffer, args.episode_length, reward_blind)
    if args.loss_size == "linear":
        weight = features[index] @ loss_params["weight"]
    else:
        obs = obs_stats.normalize(buffer.obs) * buffer.valid[:, None]
        weight = loss_network(args).apply(loss_params, jnp.concatenate([obs, features], axis=-1), index)
    log_prob = policy_distribution(agent, obs_stats.normalize(buffer.obs[index])).log_prob(buffer.action[index])
    return -jnp.mean(jax.lax.stop_gradient(weight) * log_prob)


def window_gae(rewards, values, next_values, terminated, cuts):
    """GAE (Schulman et al. 2016, arXiv:1506.02438, eq. 16) by reverse scan, all arrays [T], γ = PPO_GAMMA,
    λ = PPO_LAMBDA: δ_t = r_t + γ·(1 - terminated_t)·V(s'_t) - V(s_t), A_t = δ_t + γ·λ·(1 - cut_t)·A_{t+1}, s'_t the
    true next state (a truncation bootstraps), cut_t = 1 at episode ends and the window's last step. Returns
    (A, A + V)."""

    def backward(next_advantage, step):
        reward, value, next_value, term, cut = step
        delta = reward + PPO_GAMMA * (1.0 - term) * next_value - value
        advantage = delta + PPO_GAMMA * PPO_LAMBDA * (1.0 - cut) * next_advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(
        backward, jnp.zeros_like(values[0]), (rewards, values, next_values, terminated, cuts), reverse=True
    )
    return advantages, advantages + values


def ppo_loss(agent: dict, obs, action, old_pi: "DiagGaussian", advantage, target) -> jax.Array:
    """The reference's PPO loss on a minibatch (epg/agents.py:106-117): obs [B, obs_dim] normalised, action
    [B, action_dim], old_pi the policy before the update, advantage [B] normalised over the M steps, value target [B].
    -mean(min(r·A, clip(r, 1±ε)·A)) + 0.001·mean(KL(π_old ‖ π)) + mean((V - V_target)²), ε = 0.2
    (Schulman et al. 2017, arXiv:1707.06347, eq. 7, plus the value error and a small KL penalty)."""
    pi = policy_distribution(agent, obs)
    ratio = jnp.exp(pi.log_prob(action) - old_pi.log_prob(action))
    clipped = jnp.clip(ratio, 1 - PPO_CLIP, 1 + PPO_CLIP)
    policy = -jnp.mean(jnp.minimum(ratio * advantage, clipped * advantage))
    value = jnp.mean((value_fn(agent, obs) - target) ** 2)
    return policy + PPO_KL * jnp.mean(old_pi.kl(pi)) + value


def ppo_alpha(args: Args, g: int) -> float:
    """α of generation g (0-based): 1 at g = 0, linear to 0 at ppo_anneal_frac·num_generations (evolution.py:119);
    with --fix-ppo linear to 0.5 at ⌊num_generations/16⌋ and 0.5 from there on (evolution.py:115-117)."""
    if args.fix_ppo:
        return max(0.5, 1.0 - 0.5 * g / max(1, args.num_generations // 16))
    return max(0.0, 1.0 - g / (args.ppo_anneal_frac * args.num_generations)) if args.ppo_anneal_frac > 0 else 0.0


def centered_ranks(fitness: jax.Array) -> jax.Array:
    """Centered ranks, Salimans et al.'s fitness shaping (arXiv:1703.03864, section 2.2): [n] -> [n] in [-0.5, 0.5],
    rank k (0 = lowest) -> k / (n - 1) - 0.5. Ties share the mean of their ranks, so members of equal fitness get
    equal weights and a generation without spread gives all zeros (no step); NaN and ±inf count as lowest."""
    fitness = jnp.where(jnp.isfinite(fitness), fitness, -jnp.inf)
    ordered = jnp.sort(fitness)
    below = jnp.searchsorted(ordered, fitness, side="left")  # members strictly lower
    up_to = jnp.searchsorted(ordered, fitness, side="right")  # members lower or equal
    ranks = (below + up_to - 1) / 2.0
    return ranks / (fitness.shape[0] - 1) - 0.5


def mirrored_noise(key: jax.Array, pop_size: int, dim: int) -> jax.Array:
    """ε [pop_size, dim]: pop_size/2 standard normal vectors, drawn in one call, followed by their negatives
    (mirrored or antithetic sampling; es_basics.py's antithetic_noise draws member i's from fold_in(key, i))."""
    eps = jax.random.normal(key, (pop_size // 2, dim))
    return jnp.concatenate([eps, -eps])


def es_ascent_direction(theta: jax.Array, eps: jax.Array, fitness: jax.Array, weight_decay: float) -> jax.Array:
    """The ES ascent direction [dim] for θ [dim], as the reference computes it (epg/evolution.py:216-217;
    Salimans et al. 2017, eq. 1 without its 1/σ): g = 1/n Σ_i rank(F_i)·ε_i - weight_decay·θ, with ε [n, dim]
    the members' noise and F [n] their fitnesses. Without 1/σ, the decay weighs 1/σ times more (es_basics.py's
    es_gradient is the textbook estimate, with 1/σ and no decay)."""
    return centered_ranks(fitness) @ eps / eps.shape[0] - weight_decay * theta


def make_es_optimizer(args: Args) -> optax.GradientTransformation:
    """Adam, β1 = 0, on the negated ES direction; learning rate ÷10 at half the generations (evolution.py:122-147)."""
    schedule = optax.piecewise_constant_schedule(args.es_learning_rate, {args.num_generations // 2: 0.1})
    return optax.adam(schedule, b1=0.0)


# ---- Defaults for the Args fields left at None, and the checks tyro cannot make.
class ArgsError(ValueError):
    """A user's mistake in the arguments or files: main prints it as one line and exits with code 2 (as tyro)."""


RANGES = (  # every numeric flag's valid values (a tuple flag: each entry), checked by resolve_args; None: unset
    (("seed", "process_id", "memory_units", "weight_decay"), lambda x: x >= 0, ">= 0"),
    (("ppo_anneal_frac",), lambda x: 0 <= x <= 1, "in [0, 1]"),
    (
        ("num_processes", "init_timeout", "lifetime", "buffer_size", "update_every", "minibatch_size")
        + ("update_epochs", "inner_learning_rate", "num_eval_episodes", "episode_length", "pop_size", "num_tasks")
        + ("num_generations", "sigma", "es_learning_rate", "eval_every", "num_eval_tasks", "num_select_tasks")
        + ("save_every", "num_seeds", "ppo_rollouts", "ppo_epochs", "ppo_learning_rates", "num_sweep_tasks"),
        lambda x: x > 0,
        "> 0",
    ),
)


def resolve_args(args: Args) -> Args:
    """args with the None fields at their defaults (--num-generations 500, the ES learning rate
    σ/(2·√num_generations), the run directory), checked for what tyro cannot check. Raises ArgsError naming the
    problem."""
    if args.num_generations is None:
        args = dataclasses.replace(args, num_generations=500)
    if args.run_dir is None:
        name = f"{args.task_family}__{args.exp_name}__{args.seed}__{int(time.time())}"
        args = dataclasses.replace(args, run_dir=os.path.join("runs", name))
    if args.es_learning_rate is None and args.num_generations > 0:
        args = dataclasses.replace(args, es_learning_rate=args.sigma / (2.0 * math.sqrt(args.num_generations)))
    for names, valid, text in RANGES:
        for name in names:
            value = getattr(args, name)
            entries = value if isinstance(value, tuple) else () if value is None else (value,)
            if not all(math.isfinite(v) and valid(v) for v in entries):
                raise ArgsError(f"--{name.replace('_', '-')} {value} must be finite and {text}")
    for rollout in (args.update_every,) + (args.ppo_rollouts if args.test else ()):
        if rollout % args.minibatch_size or args.lifetime % rollout:
            raise ArgsError(f"a rollout of {rollout} must be a multiple of --minibatch-size and divide --lifetime")
    if args.buffer_size < max(args.update_every, MIN_BUFFER):
        raise ArgsError(f"--buffer-size must be at least --update-every and {MIN_BUFFER} (the convolutions' span)")
    if args.lifetime < args.buffer_size:
        raise ArgsError(f"--lifetime {args.lifetime} is shorter than the buffer (--buffer-size {args.buffer_size})")
    if args.loss_size == "linear" and args.loss_form != "pg-weight":
        raise ArgsError("--loss-size linear is a size of --loss-form pg-weight only")
    if args.balanced_tasks:
        counts = (args.num_tasks, args.num_eval_tasks, args.num_select_tasks, args.num_sweep_tasks)
        if args.goal_split != "sides" or any(c % 4 for c in counts):
            raise ArgsError(
                "--balanced-tasks needs --goal-split sides and task counts that are multiples of 4 "
                f"(--num-tasks, --num-eval-tasks, --num-select-tasks, --num-sweep-tasks: {counts})"
            )
    if args.test and args.load_loss is None:
        raise ArgsError("--test needs --load-loss (a run directory of epg.py or a loss .msgpack file)")
    if not args.test and args.pop_size % 2:
        raise ArgsError(f"--pop-size must be even (antithetic pairs), got {args.pop_size}")
    if not args.test and args.pop_size % jax.device_count():
        raise ArgsError(f"--pop-size {args.pop_size} does not divide over the {jax.device_count()} JAX devices")
    return args


# ---- Task families. A task is a small pytree of arrays drawn by the pure `sample_tasks`, so tasks vmap; the
# family's environment takes it as an argument: reset(key, task) -> (obs, state) and step(key, state, action, task)
# -> (obs, state, reward, terminated, truncated, final_obs), `obs` already the next episode's first when the episode
# ended (auto-reset), `final_obs` the true last one, from which a time-limit truncation is bootstrapped.
GOAL_RADIUS = {"goal-point": (0.5, 1.5)}  # metres
GOAL_HALF_ANGLE = 0.45 * math.pi  # --goal-split half: goals within ±81° of +x (training) or of -x (--test)
QUADRANT = 0.25 * math.pi  # half-width of a 90° sector


def goal_angles(key: jax.Array, n: int, test: bool, split: str) -> jax.Array:
    """Goal angles [n] (radians) of a --goal-split. sides: training goals within ±45° of +y or of -y, equally
    likely, so their mean direction is zero and no goal-agnostic movement gains in expectation (docs/epg.md);
    sector: within ±135° of +x; both test within ±45° of -x. half: within ±81° of +x, test of -x."""
    u = jax.random.uniform(key, (n,), minval=-1.0, maxval=1.0)
    if test:
        return math.pi + u * (GOAL_HALF_ANGLE if split == "half" else QUADRANT)
    if split == "sides":
        return jnp.where(u > 0, 1.0, -1.0) * (0.5 * math.pi + (2.0 * jnp.abs(u) - 1.0) * QUADRANT)
    return u * (GOAL_HALF_ANGLE if split == "half" else 3.0 * QUADRANT)


def sample_tasks(family: str, key: jax.Array, n: int, test: bool, split: str = "sides", balanced: bool = False) -> dict:
    """n tasks of a family, {"goal": [n, 2]} (m): radius uniform in GOAL_RADIUS[family], angle from
    goal_angles(`split`) (training or `test` goals). `balanced` (training goals, n a multiple of 4): n/4 goals g
    drawn, then -g, (-g_x, g_y) and (g_x, -g_y), each a block of n/4 (this project's, docs/epg.md). KeyError if the
    family is unknown."""
    key_radius, key_angle = jax.random.split(key)
    low, high = GOAL_RADIUS[family]
    drawn = n // 4 if balanced and not test else n
    r = jax.random.uniform(key_radius, (drawn,), minval=low, maxval=high)
    angle = goal_angles(key_angle, drawn, test, split)
    goal = jnp.stack([r * jnp.cos(angle), r * jnp.sin(angle)], axis=-1)
    if drawn < n:
        goal = jnp.concatenate([goal, -goal, goal * jnp.array([-1.0, 1.0]), goal * jnp.array([1.0, -1.0])])
    return {"goal": goal}


@dataclasses.dataclass(frozen=True)
class GoalPointEnv:
    """goal-point, a miniature GoalAnt (this project's): a 2-D point mass, p [2] (m) from U(-0.1, 0.1)², v [2]
    (m/s) from 0; action a force [2] clipped to ±1; per step (dt = 0.1 s) v ← 0.9·v + dt·force, p ← p + dt·v
    (top speed 1 m/s). Observation (p, v) [4]: the goal is not observed. Reward: progress towards the goal,
    (|g - p_before| - |g - p_after|)/dt (m/s), so a return is at most 10·|g - p_0|. Time limit only."""

    episode_length: int
    family, obs_dim, action_dim, action_low, action_high = "goal-point", 4, 2, -1.0, 1.0
    DT, DAMPING = 0.1, 0.1

    def reset(self, key, task):
        """(obs [4], state) of a new episode; the task does not change the start."""
        state = {"pos": jax.random.uniform(key, (2,), minval=-0.1, maxval=0.1), "vel": jnp.zeros(2), "t": jnp.int32(0)}
        return jnp.concatenate([state["pos"], state["vel"]]), state

    def step(self, key, state, action, task):
        """(obs, state, reward, terminated, truncated, final_obs) of one step, as the task families' interface."""
        vel = (1.0 - self.DAMPING) * state["vel"] + self.DT * jnp.clip(action, -1.0, 1.0)
        pos = state["pos"] + self.DT * vel
        reward = (jnp.linalg.norm(task["goal"] - state["pos"]) - jnp.linalg.norm(task["goal"] - pos)) / self.DT
        truncated = (state["t"] + 1 >= self.episode_length).astype(jnp.float32)
        final_obs = jnp.concatenate([pos, vel])
        reset_obs, reset_state = self.reset(key, task)
        state = jax.tree.map(
            lambda r, s: jnp.where(truncated > 0, r, s), reset_state, {"pos": pos, "vel": vel, "t": state["t"] + 1}
        )
        return jnp.where(truncated > 0, reset_obs, final_obs), state, reward, jnp.float32(0.0), truncated, final_obs


def make_task_env(args: Args):
    """The environment of --task-family, whose reset and step take a task; build it once and pass it to the
    functions that need it."""
    return GoalPointEnv(args.episode_length)


# ---- Observation normalisation and the agent: Gaussian policy, memory units, PPO's value function.
class Normalizer(NamedTuple):
    """Running mean and variance [dim] of every observation (or action) seen, and the normalisation by them (the
    reference's trajectory normaliser, agents.py:131-134; dpo.py's RunningStats clips otherwise)."""

    mean: jax.Array
    var: jax.Array
    count: jax.Array  # scalar

    @staticmethod
    def init(obs_dim: int) -> "Normalizer":
        """Mean 0, variance 1, a negligible count (1e-4)."""
        return Normalizer(jnp.zeros(obs_dim), jnp.ones(obs_dim), jnp.array(1e-4))

    def update(self, batch: jax.Array) -> "Normalizer":
        """Merge a batch [..., obs_dim] into the statistics (Chan et al.'s parallel formula)."""
        batch = batch.reshape(-1, batch.shape[-1])
        n = batch.shape[0]
        batch_mean, batch_var = batch.mean(0), batch.var(0)
        total = self.count + n
        delta = batch_mean - self.mean
        var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        return Normalizer(self.mean + delta * n / total, var, total)

    def normalize(self, obs: jax.Array) -> jax.Array:
        """(obs - mean) / sqrt(var + 1e-8), clipped to [-10, 10]."""
        return jnp.clip((obs - self.mean) / jnp.sqrt(self.var + 1e-8), -10.0, 10.0)


class DiagGaussian(NamedTuple):
    """Diagonal Gaussian policy; mean [..., action_dim], log_std [action_dim] (state-independent)."""

    mean: jax.Array
    log_std: jax.Array

    def log_prob(self, action):
        """log π(action) [...] of actions [..., action_dim], summed over action dimensions."""
        z = (action - self.mean) / jnp.exp(self.log_std)
        return jnp.sum(-0.5 * z**2 - self.log_std - 0.5 * jnp.log(2 * jnp.pi), axis=-1)

    def kl(self, q: "DiagGaussian") -> jax.Array:
        """KL(self ‖ q), summed over action dimensions: [...]."""
        var_p, var_q = jnp.exp(2 * self.log_std), jnp.exp(2 * q.log_std)
        return jnp.sum(q.log_std - self.log_std + (var_p + (self.mean - q.mean) ** 2) / (2 * var_q) - 0.5, axis=-1)


def normc(scale: float) -> Callable:
    """The reference's initialisation (epg/networks.py:20-22): a normal matrix [in, out], each input's row of
    norm `scale`; no QR (batched LAPACK calls inside a vmap deadlock jaxlib 0.10.2's CPU thread pool)."""

    def init(key, shape, dtype=jnp.float32):
        w = jax.random.normal(key, shape, dtype)
        return w * scale / jnp.sqrt(jnp.sum(w**2, axis=-1, keepdims=True))

    return init


class TanhMLP(nn.Module):
    """64-64 tanh MLP, normc(1) hidden layers, normc(0.01) output layer (epg/networks.py:6-33, agents.py:206)."""

    out_dim: int

    @nn.compact
    def __call__(self, x):
        for width in (64, 64):
            x = nn.tanh(nn.Dense(width, kernel_init=normc(1.0))(x))
        return nn.Dense(self.out_dim, kernel_init=normc(0.01))(x)


def init_agent(key: jax.Array, args: Args, obs_dim: int, action_dim: int) -> dict:
    """A fresh agent (epg/agents.py:28, 39, 206-207): {"policy": TanhMLP params, "log_std": [action_dim] zeros,
    "memory": {"kernel": [64, memory_units], "bias": [memory_units]}, "value": TanhMLP params (for PPO only)}."""
    key_pi, key_mem, key_v = jax.random.split(key, 3)
    dummy = jnp.zeros((1, obs_dim))
    return {
        "policy": TanhMLP(action_dim).init(key_pi, dummy),
        "log_std": jnp.zeros(action_dim),
        "memory": {
            "kernel": normc(0.01)(key_mem, (MEMORY_INPUTS, args.memory_units)),
            "bias": jnp.zeros(args.memory_units),
        },
        "value": TanhMLP(1).init(key_v, dummy),
    }


def policy_distribution(agent: dict, obs: jax.Array) -> DiagGaussian:
    """π(·|obs) for normalised observations [..., obs_dim]."""
    return DiagGaussian(TanhMLP(agent["log_std"].shape[0]).apply(agent["policy"], obs), agent["log_std"])


def value_fn(agent: dict, obs: jax.Array) -> jax.Array:
    """V(obs) [...] for normalised observations [..., obs_dim]."""
    return TanhMLP(1).apply(agent["value"], obs)[..., 0]


def inner_optimizer(args: Args, learning_rate) -> optax.GradientTransformation:
    """The agent's optimiser of --inner-optimizer at this learning rate (a traced scalar inside the lifetime)."""
    return optax.adam(learning_rate) if args.inner_optimizer == "adam" else optax.sgd(learning_rate)


# ---- The inner loop: make_lifetime(args, env) returns a pure lifetime(theta, task, key, settings).
class InnerSettings(NamedTuple):
    """The lifetime's settings that are passed as arrays, not compiled in, so that --test's trainers (evolved,
    zero, reward-blind, and every PPO setting of one rollout length) share one compilation."""

    alpha: jax.Array  # weight of L_PPO in (1 - α)·L_φ + α·L_PPO, in [0, 1]
    learning_rate: jax.Array  # the agent's Adam learning rate
    update_epochs: jax.Array  # passes per update, at most max(--update-epochs, --ppo-epochs)
    reward_blind: jax.Array  # bool: zero the reward input of L_φ

    @staticmethod
    def of(args: Args, alpha) -> "InnerSettings":
        """The settings of args (--inner-learning-rate, --update-epochs, --reward-blind) at this α."""
        return InnerSettings(
            jnp.float32(alpha),
            jnp.float32(args.inner_learning_rate),
            jnp.int32(args.update_epochs),
            jnp.bool_(args.reward_blind),
        )


class LifetimeState(NamedTuple):
    """The carry of a lifetime's lax.scan: the agent, its optimiser and statistics, the buffer, the env."""

    agent: dict
    opt_state: optax.OptState
    obs_stats: Normalizer
    action_stats: Normalizer  # of the sampled actions, for the loss's inputs only
    buffer: Buffer
    env_state: object = None  # this and the rest: set by a reset (new_episodes)
    obs: jax.Array = None
    episode_return: jax.Array = None  # return of the running episode so far
    recent_returns: jax.Array = None  # [num_eval_episodes]: returns of the last finished episodes, newest last
    key: jax.Array = None
    episode_step: jax.Array = None  # steps taken in the running episode


class LifetimeOutput(NamedTuple):
    """What a lifetime returns (a leading axis per vmap)."""

    final_return: jax.Array  # scalar: mean return of --num-eval-episodes fresh episodes of the final policy (fitness)
    curve: jax.Array  # [lifetime / M]: return of the last finished episode at each policy update (NaN before)
    agent: dict  # the final agent parameters (init_agent's structure)


def make_lifetime(args: Args, env) -> Callable:
    """lifetime(theta [dim], task, key, settings) -> LifetimeOutput: one agent learning one task (Algorithm 1), theta
    the flattened EPGLoss. A fresh agent acts for --lifetime steps, across episodes. Every M = --update-every steps the
    buffer (last N steps) is refreshed and the agent takes settings.update_epochs passes over the M newest steps in
    minibatches, each an Adam step on (1 - α)·L_φ + α·L_PPO, L_φ's context the whole buffer (epg/agents.py:119-199);
    a term of weight 0 is not computed, a non-finite gradient is skipped (agents.py:190). Fitness: the mean return of
    --num-eval-episodes fresh episodes that the final policy (sampled actions, statistics frozen) runs after the
    lifetime (evolution.py:178, rollout.py:66-77). One lax.scan; jit and vmap freely."""
    obs_dim, action_dim, n, m = env.obs_dim, env.action_dim, args.buffer_size, args.update_every
    unravel = ravel_pytree(loss_template(args, env))[1]
    network = loss_network(args)
    max_epochs = max(args.update_epochs, *args.ppo_epochs)  # split(key, k)[:e] does not depend on k

    def env_step(state: LifetimeState, task):  # a ~ π(·|obs); the environment gets a clipped to its bounds
        key, key_action, key_env = jax.random.split(state.key, 3)
        pi = policy_distribution(state.agent, state.obs_stats.normalize(state.obs))
        action = pi.mean + jnp.exp(pi.log_std) * jax.random.normal(key_action, pi.mean.shape)
        obs, env_state, reward, terminated, truncated, final_obs = env.step(
            key_env, state.env_state, jnp.clip(action, env.action_low, env.action_high), task
        )
        done = jnp.maximum(terminated, truncated)
        episode_return = state.episode_return + reward
        recent = jnp.where(done > 0, jnp.append(state.recent_returns[1:], episode_return), state.recent_returns)
        step = Buffer(state.obs, action, reward, done, terminated, final_obs, jnp.float32(1.0), state.episode_step)
        state = state._replace(
            env_state=env_state,
            obs=obs,
            key=key,
            episode_return=episode_return * (1.0 - done),
            recent_returns=recent,
            episode_step=(state.episode_step + 1.0) * (1.0 - done),
        )
        return state, step

    def interval(state: LifetimeState, loss_params, task, settings: InnerSettings):
        state, steps = jax.lax.scan(lambda s, _: env_step(s, task), state, None, m)
        obs_stats, action_stats = state.obs_stats.update(steps.obs), state.action_stats.update(steps.action)
        buffer = jax.tree.map(lambda old, new: jnp.concatenate([old[m:], new]), state.buffer, steps)
        # PPO's batch, fixed before the update: the M newest steps, their GAE advantages and the policy as it was
        recent = jax.tree.map(lambda x: x[n - m :], buffer)
        obs, final_obs = obs_stats.normalize(recent.obs), obs_stats.normalize(recent.final_obs)
        values, next_values = value_fn(state.agent, obs), value_fn(state.agent, final_obs)
        cuts = recent.done.at[-1].set(1.0)  # episode ends and the window's last step
        advantage, target = window_gae(recent.reward, values, next_values, recent.terminated, cuts)
        advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
        pi = policy_distribution(state.agent, obs)
        old_pi = DiagGaussian(pi.mean, jnp.broadcast_to(pi.log_std, pi.mean.shape))  # per row, for minibatching
        batch = (obs, recent.action, old_pi, advantage, target)  # ppo_loss's arguments, [M, ...]
        optimizer, alpha = inner_optimizer(args, settings.learning_rate), settings.alpha

        def total_loss(agent, index):
            """(1 - α)·L_EPG + α·L_PPO on the minibatch rows `index`; each term computed only when its weight is > 0."""

            def epg():
                if args.loss_form == "pg-weight":
                    return pg_weight_loss(
                        loss_params, agent, buffer, obs_stats, n - m + index, args, settings.reward_blind
                    )
                inputs = loss_inputs(agent, buffer, obs_stats, action_stats, settings.reward_blind)
                return network.apply(loss_params, inputs, n - m + index).mean()

            def ppo():
                return ppo_loss(agent, *jax.tree.map(lambda x: x[index], batch))

            def zero():
                return jnp.float32(0.0)

            return (1.0 - alpha) * jax.lax.cond(alpha < 1.0, epg, zero) + alpha * jax.lax.cond(alpha > 0.0, ppo, zero)

        def minibatch_step(carry, index):
            agent, opt_state = carry
            grads = jax.grad(total_loss)(agent, index)
            finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
            grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
            updates, opt_state = optimizer.update(grads, opt_state, agent)
            return (optax.apply_updates(agent, updates), opt_state), None

        key, key_epochs = jax.random.split(state.key)
        epoch_keys = jax.random.split(key_epochs, max_epochs)

        def epoch(i, carry):
            indices = jax.random.permutation(epoch_keys[i], m).reshape(-1, args.minibatch_size)
            return jax.lax.scan(minibatch_step, carry, indices)[0]

        agent, opt_state = jax.lax.fori_loop(0, settings.update_epochs, epoch, (state.agent, state.opt_state))
        state = state._replace(
            agent=agent, opt_state=opt_state, obs_stats=obs_stats, action_stats=action_stats, buffer=buffer, key=key
        )
        return state, state.recent_returns[-1]

    def new_episodes(state: LifetimeState, task, key_reset, key_run) -> LifetimeState:  # none finished yet
        obs, env_state = env.reset(key_reset, task)
        unfinished = jnp.full(args.num_eval_episodes, jnp.nan)
        return state._replace(
            obs=obs,
            env_state=env_state,
            episode_return=jnp.float32(0.0),
            recent_returns=unfinished,
            key=key_run,
            episode_step=jnp.float32(0.0),
        )

    def fresh_episodes(state: LifetimeState, task, key):  # from a reset, no learning; at least k episodes end
        state = new_episodes(state, task, *jax.random.split(key))
        steps = args.num_eval_episodes * args.episode_length
        state = jax.lax.scan(lambda s, _: (env_step(s, task)[0], None), state, None, steps)[0]
        return jnp.nanmean(state.recent_returns)

    def lifetime(theta, task, key, settings: InnerSettings):
        key_agent, key_reset, key_run, key_eval = jax.random.split(key, 4)
        agent = init_agent(key_agent, args, obs_dim, action_dim)
        vectors = jnp.zeros((n, obs_dim))
        scalars = jnp.zeros(n)
        buffer = Buffer(vectors, jnp.zeros((n, action_dim)), scalars, scalars, scalars, vectors, scalars, scalars)
        opt_state = inner_optimizer(args, settings.learning_rate).init(agent)
        state = LifetimeState(agent, opt_state, Normalizer.init(obs_dim), Normalizer.init(action_dim), buffer)
        state = new_episodes(state, task, key_reset, key_run)
        loss_params = unravel(theta)
        state, curve = jax.lax.scan(
            lambda s, _: interval(s, loss_params, task, settings), state, None, args.lifetime // m
        )
        return LifetimeOutput(fresh_episodes(state, task, key_eval), curve, state.agent)

    return lifetime


# ---- Meta-training: generations of ES over the loss, lifetimes sharded over the devices.
def generation_key(args: Args, generation: int) -> jax.Array:
    """The key of generation g, from (--seed, g) alone: --resume redraws what an uninterrupted run would."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(args.seed), GENERATION_STREAM), generation)


def fixed_tasks(args: Args, env, stream: int, n: int, test: bool):
    """(tasks [n, ...], lifetime keys [n, 2]) drawn from one stream of --seed: the same on every call."""
    key_tasks, key_lives = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(args.seed), stream))
    tasks = sample_tasks(env.family, key_tasks, n, test, args.goal_split, args.balanced_tasks)
    return tasks, jax.random.split(key_lives, n)


def make_population(args: Args, env) -> Callable:
    """returns(members [m, dim], tasks [num_tasks, ...], keys [num_tasks, 2], settings) -> final returns [m,
    num_tasks]: every member (a flattened loss) on every task, the same tasks and lifetime seeds for all. Not jitted,
    not sharded (make_generation does both)."""
    lifetimes = jax.vmap(make_lifetime(args, env), (None, 0, 0, None))  # one member on every task
    return jax.vmap(lambda *a: lifetimes(*a).final_return, (0, None, None, None))


def make_generation(args: Args, env) -> Callable:
    """generation(theta, opt_state, key, alpha) -> (theta, opt_state, fitness [pop], returns [pop, num_tasks]),
    jitted. Members are θ + σ·ε_i (θ [dim] the flattened loss, antithetic ε). Every member meets the same --num-tasks
    tasks and lifetime seeds (common random numbers), so ranks compare losses, not the luck of the tasks; fitness is
    the mean final return over them.

    Over D devices (shard_map on a 1-D mesh; resolve_args makes --pop-size divide over them all) each device holds θ
    and the Adam state, draws every member's noise from the generation key (shared seeds, Salimans et al. Alg. 2),
    runs its own pop/D members, all-gathers the returns f32[pop, num_tasks], which is all it exchanges, and applies
    the identical update."""
    population = make_population(args, env)
    optimizer = make_es_optimizer(args)
    num_devices = math.gcd(args.pop_size, jax.device_count())
    per_device = args.pop_size // num_devices

    def generation(theta, opt_state, key, alpha):
        key_noise, key_tasks, key_lives = jax.random.split(key, 3)
        eps = mirrored_noise(key_noise, args.pop_size, theta.shape[0])
        tasks = sample_tasks(env.family, key_tasks, args.num_tasks, False, args.goal_split, args.balanced_tasks)
        mine = jax.lax.dynamic_slice_in_dim(eps, jax.lax.axis_index("d") * per_device, per_device)
        keys = jax.random.split(key_lives, args.num_tasks)
        returns = population(theta + args.sigma * mine, tasks, keys, InnerSettings.of(args, alpha))
        returns = jax.lax.all_gather(returns, "d", tiled=True)  # [pop, num_tasks], every device's members
        fitness = returns.mean(axis=1)
        direction = es_ascent_direction(theta, eps, fitness, args.weight_decay)
        updates, opt_state = optimizer.update(-direction, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state, fitness, returns

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:num_devices]), ("d",))
    replicated = jax.sharding.PartitionSpec()
    return jax.jit(jax.shard_map(generation, mesh=mesh, in_specs=replicated, out_specs=replicated, check_vma=False))


def make_runner(args: Args, env) -> Callable:
    """run(theta [dim], tasks [n, ...], keys [n, 2], settings) -> LifetimeOutput with leading axis n: n lifetimes
    of one flattened loss θ, on their own tasks and seeds, jit compiled (once per n) on one device; every process
    of a multi-process run computes all n, the same numbers."""
    return jax.jit(jax.vmap(make_lifetime(args, env), (None, 0, 0, None)))


def make_scorer(args: Args, env, stream: int, n: int) -> Callable:
    """score(theta [dim]) -> float: the mean final return (NaN ignored) of loss θ at α = 0, as at test time, on n
    training tasks and lifetime seeds drawn once from `stream` of --seed."""
    run = make_runner(args, env)
    tasks = fixed_tasks(args, env, stream, n, False) + (InnerSettings.of(args, 0.0),)

    def score(theta) -> float:
        return float(np.nanmean(run(theta, *tasks).final_return))

    return score


def run_meta_training(args: Args) -> str:
    """ES over the loss (Algorithm 1, outer loop) for --num-generations, from the checkpoint with --resume. Every
    --eval-every generations the ES mean is scored on fixed tasks (eval_fitness); at the end the shipped loss,
    best_loss.msgpack, is the evaluated ES mean that scores best on --num-select-tasks tasks drawn for this choice
    alone. Writes the run directory (checkpoints every --save-every generations and on Ctrl-C) and returns it."""
    run_dir = args.run_dir
    refuse_occupied(run_dir, args)
    env = make_task_env(args)
    theta = ravel_pytree(loss_template(args, env))[0]
    candidates = np.zeros((0, theta.shape[0]), np.float32)  # the ES mean at each evaluation
    opt_state, rows = make_es_optimizer(args).init(theta), []
    if args.resume is not None:
        theta, opt_state, rows, candidates = restore_checkpoint(run_dir, theta, opt_state, candidates)
    write_json(os.path.join(run_dir, "args.json"), dataclasses.asdict(args))
    print(
        f"meta-training a loss of {theta.shape[0]:,} parameters on {args.task_family}"
        f"{' (reward-blind)' if args.reward_blind else ''}: population {args.pop_size} × {args.num_tasks} shared "
        f"task(s), lifetimes of {args.lifetime:,} steps, on {jax.device_count()} {jax.default_backend()} "
        f"device(s), generations {len(rows)}..{args.num_generations}"
    )
    start = time.time()
    generation = make_generation(args, env).lower(theta, opt_state, generation_key(args, 0), 1.0).compile()
    evaluate = make_scorer(args, env, EVAL_STREAM, args.num_eval_tasks)  # the curve of eval_fitness
    print(f"compiled in {time.time() - start:.1f}s", flush=True)

    bar = tqdm(range(len(rows), args.num_generations), initial=len(rows), total=args.num_generations, file=sys.stdout)
    try:
        for g in bar:
            t0, alpha = time.time(), ppo_alpha(args, g)
            new_theta, new_opt_state, fitness, _ = generation(theta, opt_state, generation_key(args, g), alpha)
            fitness = np.where(np.isfinite(fitness), fitness, np.nan)
            if np.isnan(fitness).all() or not np.isfinite(np.asarray(new_theta)).all():
                what = "every member's fitness" if np.isnan(fitness).all() else "the ES mean"
                raise ArgsError(
                    f"generation {g + 1}: {what} became non-finite (the run diverges); checkpoint.msgpack keeps "
                    f"generation {len(rows) - len(rows) % args.save_every}"
                )
            seconds = time.time() - t0  # the generation alone, without the evaluation below
            eval_fitness, new_candidates = float("nan"), candidates
            if (g + 1) % args.eval_every == 0 or g + 1 == args.num_generations:
                eval_fitness = evaluate(new_theta)
                new_candidates = np.concatenate([candidates, np.asarray(new_theta)[None]])
            row = dict(
                generation=g + 1,
                alpha=alpha,
                best_fitness=float(np.nanmax(fitness)),
                mean_fitness=float(np.nanmean(fitness)),
                eval_fitness=eval_fitness,
                seconds=seconds,
            )
            # commit the generation in one assignment, so an interruption sees it whole or not at all
            theta, opt_state, rows, candidates = new_theta, new_opt_state, rows + [row], new_candidates
            bar.set_postfix(mean=f"{row['mean_fitness']:.2f}", eval=f"{eval_fitness:.2f}", alpha=f"{alpha:.2f}")
            if (g + 1) % args.save_every == 0 or g + 1 == args.num_generations:
                save_checkpoint(run_dir, args, theta, opt_state, rows, candidates)
    except KeyboardInterrupt:
        save_checkpoint(run_dir, args, theta, opt_state, rows, candidates)
        print(f"interrupted after generation {len(rows)}; resume: python epg.py --resume {run_dir}", file=sys.stderr)
        sys.exit(130)
    seconds = np.median([r["seconds"] for r in rows[-max(1, len(rows) // 2) :]])
    select = make_scorer(args, env, SELECT_STREAM, args.num_select_tasks)
    scores = [select(c) for c in candidates]
    chosen = int(np.nanargmax(scores))
    save_loss(os.path.join(run_dir, "best_loss.msgpack"), candidates[chosen], args)
    evaluated = [r["generation"] for r in rows if np.isfinite(r["eval_fitness"])]
    summary = dict(
        task_family=args.task_family,
        reward_blind=args.reward_blind,
        num_generations=len(rows),
        best_eval_fitness=float(np.nanmax([r["eval_fitness"] for r in rows])),
        selected_generation=evaluated[chosen],
        selected_fitness=scores[chosen],
        selection_scores=dict(zip(evaluated, scores)),
        final_mean_fitness=rows[-1]["mean_fitness"],
        lifetimes_per_minute=60.0 * args.pop_size * args.num_tasks / float(seconds),
        wall_seconds=time.time() - start,
        device=f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    )
    write_json(os.path.join(run_dir, "summary.json"), summary)
    plot_fitness(run_dir, args, rows)  # after the results: a failing plot loses nothing
    print(f"best_loss.msgpack: the ES mean of generation {evaluated[chosen]}, {scores[chosen]:.2f} on fresh tasks")
    return run_dir


# ---- The test: the evolved loss against its reward-ablated self, tuned PPO and the zero loss, on held-out tasks.
def run_test(args: Args) -> str:
    """The paper's test on held-out tasks (the held-out goals of --goal-split), the same tasks and seeds for every
    trainer: the evolved loss (α = 0), the same loss with its reward input zeroed (evolved-no-reward: does it learn
    from the reward?), a zero loss (the initial policy), the reward-blind loss if given, and tuned PPO (α = 1): the
    best of the --ppo-* grid on --num-sweep-tasks training tasks. Writes summary.json, test_curves.csv and
    test_curves.png; returns the run directory."""
    theta, args = load_loss(args.load_loss, args)
    env = make_task_env(args)
    size = ravel_pytree(loss_template(args, env))[0].shape[0]
    if theta.shape[0] != size:  # a damaged file, or one of an earlier epg.py whose settings had no --loss-size
        raise ArgsError(f"{args.load_loss}: a loss of {theta.shape[0]:,} parameters, its settings give {size:,}")
    run_dir = args.run_dir
    refuse_occupied(run_dir, args)
    write_json(os.path.join(run_dir, "args.json"), dataclasses.asdict(args))
    tasks = fixed_tasks(args, env, TEST_STREAM, args.num_seeds, True)
    start = time.time()

    @functools.cache
    def runner(every: int, size: int, optimizer: str, form: str, loss_size: str) -> Callable:  # once per shape
        cfg = dataclasses.replace(
            args, update_every=every, buffer_size=size, inner_optimizer=optimizer, loss_form=form, loss_size=loss_size
        )
        return make_runner(cfg, env)

    def run(cfg: Args, theta, alpha: float, tasks=tasks):
        """Lifetimes of cfg's inner loop with loss theta on tasks: a LifetimeOutput with leading axis len(tasks)."""
        shape = (cfg.update_every, cfg.buffer_size, cfg.inner_optimizer, cfg.loss_form, cfg.loss_size)
        return runner(*shape)(theta, *tasks, InnerSettings.of(cfg, alpha))

    outputs = {
        "evolved": run(args, theta, 0.0),
        "evolved-no-reward": run(dataclasses.replace(args, reward_blind=True), theta, 0.0),
        "zero": run(args, 0 * theta, 0.0),
    }
    if args.load_reward_blind_loss is not None:
        blind_theta, blind = load_loss(args.load_reward_blind_loss, args)
        if not blind.reward_blind or any(getattr(blind, k) != getattr(args, k) for k in LOSS_FILE_FIELDS[:-1]):
            raise ArgsError("--load-reward-blind-loss: not a --reward-blind loss with the evolved loss's settings")
        outputs["reward-blind"] = run(blind, blind_theta, 0.0)
    linear = dataclasses.replace(args, loss_form="pg-weight", loss_size="linear", reward_blind=False)
    for name, feature in REINFORCE.items():  # textbook REINFORCE in the pg-weight form, the same inner loop
        outputs[name] = run(linear, jnp.zeros(len(PG_FEATURES)).at[feature].set(1.0), 0.0)
    sweep, configs, sweep_tasks = [], [], fixed_tasks(args, env, SWEEP_STREAM, args.num_sweep_tasks, False)
    for rollout, epochs, lr in itertools.product(args.ppo_rollouts, args.ppo_epochs, args.ppo_learning_rates):
        cfg = dataclasses.replace(
            args,
            update_every=rollout,
            update_epochs=epochs,
            inner_learning_rate=lr,
            buffer_size=max(args.buffer_size, rollout),
            reward_blind=False,
            inner_optimizer="adam",
        )
        configs.append(cfg)
        score = float(np.mean(np.asarray(run(cfg, 0 * theta, 1.0, sweep_tasks).final_return)))
        sweep.append(dict(rollout=rollout, epochs=epochs, learning_rate=lr, final_return_mean=score))
        print(f"PPO sweep, training tasks: rollout {rollout:4d}, epochs {epochs}, lr {lr:g}: {score:9.3f}", flush=True)
    ppo = configs[max(range(len(sweep)), key=lambda i: sweep[i]["final_return_mean"])]  # the first of the best
    outputs["ppo"] = run(ppo, 0 * theta, 1.0)
    trainers, curves = compare_trainers(outputs, args.lifetime)
    split = "goals in the -x half" if args.goal_split == "half" else "goals in the -x quadrant"
    summary = dict(
        task_family=args.task_family,
        split=f"test: {split}",
        lifetime=args.lifetime,
        num_seeds=args.num_seeds,
        trainers=trainers,
        loss_file=os.path.abspath(args.load_loss),
        ppo_sweep=sweep,
        ppo_choice={k: getattr(ppo, k) for k in ("update_every", "update_epochs", "inner_learning_rate")},
        wall_seconds=time.time() - start,
        tasks={k: np.asarray(v).tolist() for k, v in tasks[0].items()},
    )
    write_json(os.path.join(run_dir, "summary.json"), summary)
    save_curves(run_dir, args, curves, split)
    return run_dir


# ---- Plumbing: run directories, resume, logs, plots, reports, launch. Nothing below changes a number.
LAUNCH_FIELDS = ("coordinator_address", "num_processes", "process_id", "init_timeout")


def start_processes(args: Args):
    """Join the other processes of a multi-process run (JAX's multi-controller runtime, docs/distributed.md): with
    --coordinator-address host:port as process --process-id of --num-processes, or with --coordinator-address auto
    as the cluster's launcher says (SLURM, Open MPI, Cloud TPU). Afterwards jax.devices() lists every process's
    devices and only process 0 prints. One process (no --coordinator-address) needs nothing and this does nothing.

    Raises ArgsError within about --init-timeout seconds when no coordinator answers (the runtime itself would abort
    the process without a Python error) or when the processes were launched with different flags (they would take
    different branches and wait for each other for ever).
    """
    if args.coordinator_address is None:
        return
    auto = args.coordinator_address == "auto"
    host, _, port = args.coordinator_address.rpartition(":")
    deadline = time.time() + args.init_timeout
    while not auto and args.process_id > 0:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            break
        except (OSError, ValueError):
            if time.time() > deadline:
                raise ArgsError(f"no coordinator at {args.coordinator_address} after {args.init_timeout} s") from None
            time.sleep(0.2)
    jax.distributed.initialize(
        None if auto else args.coordinator_address,
        None if auto else args.num_processes,
        None if auto else args.process_id,
        initialization_timeout=args.init_timeout,
    )
    from jax.experimental import multihost_utils

    flags = json.dumps({k: v for k, v in dataclasses.asdict(args).items() if k != "process_id"}, sort_keys=True)
    digest = np.frombuffer(hashlib.sha256(flags.encode()).digest()[:8], np.int32)
    digests = multihost_utils.process_allgather(digest)  # [processes, 2]: the one exchange before the run
    differ = np.flatnonzero((digests != digests[0]).any(1))
    if differ.size:
        raise ArgsError(f"process {differ[0]} was launched with other flags than process 0 (--process-id aside)")
    if jax.process_index() > 0:
        sys.stdout = open(os.devnull, "w")


def refuse_occupied(run_dir: str, args: Args):
    """Raises ArgsError if run_dir already holds a run (an args.json, a summary.json or a checkpoint) and this
    command neither continues it (--resume) nor asks to replace it (--overwrite): a repeated command must not mix
    its files into another run, or destroy a finished one."""
    if args.resume or args.overwrite or not os.path.isdir(run_dir):
        return
    held = sorted(f for f in os.listdir(run_dir) if f in ("args.json", "summary.json") or "checkpoint" in f)
    if held:
        raise ArgsError(
            f"--run-dir {run_dir} holds a run ({held[0]}): continue it with --resume {run_dir}, or add --overwrite"
        )


def resumed_args(args: Args) -> Args:
    """The Args saved in the run directory --resume names (its args.json: lists back to tuples, keys this version
    does not know dropped), with this command's LAUNCH_FIELDS, resume and run_dir set to --resume, and this
    command's --num-generations where given (to extend the run). Raises ArgsError if args.json is missing or
    damaged."""
    try:
        with open(os.path.join(args.resume, "args.json")) as f:
            saved = json.load(f)
        names = {field.name for field in dataclasses.fields(Args)}
        saved = Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in names})
    except (OSError, ValueError, TypeError) as e:
        raise ArgsError(f"--resume {args.resume}: no readable args.json ({type(e).__name__})") from None
    launch = {k: getattr(args, k) for k in LAUNCH_FIELDS}  # this command's, not the saved run's
    extend = {} if args.num_generations is None else dict(num_generations=args.num_generations)
    return dataclasses.replace(saved, **launch, **extend, resume=args.resume, run_dir=args.resume)


def atomic_write(path: str, data: bytes):
    """Write bytes to path (its directory created) via a temporary file, fsync and a rename: neither a kill nor a
    power cut leaves half a file. Does nothing on processes other than 0."""
    if jax.process_index():
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def write_json(path: str, obj: dict):
    """obj as indented JSON, written atomically."""
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_table(path: str, header, rows):
    """A CSV table, header [k] then rows [n, k] of numbers (each written as str writes it), written atomically."""
    lines = [",".join(header)] + [",".join(str(x) for x in row) for row in rows]
    atomic_write(path, ("\n".join(lines) + "\n").encode())


def read_file(path: str, what: str, parse: Callable):
    """parse(the bytes of path); ArgsError, one line starting with `what`, if the file is missing or damaged."""
    if not os.path.isfile(path):
        raise ArgsError(f"{what}: {path} not found (give a run directory of epg.py or a loss .msgpack)")
    try:
        with open(path, "rb") as f:
            return parse(f.read())
    except Exception as e:
        raise ArgsError(f"{what}: damaged {os.path.basename(path)} ({type(e).__name__}: {e})") from None


def save_checkpoint(run_dir: str, args: Args, theta, opt_state, rows: list, candidates):
    """All atomic: checkpoint.msgpack (θ, Adam state, generation rows, the ES mean of every evaluation so far
    [k, dim]), generations.csv and loss.msgpack (θ)."""
    state = dict(theta=theta, opt_state=opt_state, rows=json.dumps(rows), candidates=candidates)
    atomic_write(os.path.join(run_dir, "checkpoint.msgpack"), flax.serialization.to_bytes(state))
    fields = ("generation", "alpha", "best_fitness", "mean_fitness", "eval_fitness", "seconds")
    write_table(os.path.join(run_dir, "generations.csv"), fields, [[r[k] for k in fields] for r in rows])
    save_loss(os.path.join(run_dir, "loss.msgpack"), theta, args)


def restore_checkpoint(run_dir: str, theta, opt_state, candidates):
    """(theta, opt_state, rows, candidates) of save_checkpoint's file, restored into the given templates;
    ArgsError if it is missing or damaged."""

    def parse(data):
        template = dict(theta=theta, opt_state=opt_state, rows="", candidates=candidates)
        state = flax.serialization.from_bytes(template, data)
        if state["theta"].shape != theta.shape or state["candidates"].shape[1:] != theta.shape:
            raise ValueError(f"a loss of {state['theta'].size} parameters, the arguments need {theta.size}")
        return state["theta"], state["opt_state"], json.loads(state["rows"]), state["candidates"]

    return read_file(os.path.join(run_dir, "checkpoint.msgpack"), f"--resume {run_dir}", parse)


def save_loss(path: str, theta, args: Args):
    """A loss file (atomic msgpack): the flattened EPGLoss θ, the family, and the LOSS_FILE_FIELDS it was evolved
    with."""
    state = {
        "theta": np.asarray(theta),
        "task_family": args.task_family,
        "inner": json.dumps({k: getattr(args, k) for k in LOSS_FILE_FIELDS}),
    }
    atomic_write(path, flax.serialization.msgpack_serialize(state))


def load_loss(path: str, args: Args) -> tuple[jax.Array, Args]:
    """(θ [dim], args with the file's inner-loop settings) of a loss file or a run directory's best_loss.msgpack.
    Raises ArgsError when the file is missing or damaged, or was evolved on another family than --task-family."""

    def parse(data):
        state = flax.serialization.msgpack_restore(data)
        return jnp.asarray(state["theta"], dtype=jnp.float32), state["task_family"], json.loads(state["inner"])

    file = os.path.join(path, "best_loss.msgpack") if os.path.isdir(path) else path
    theta, family, inner = read_file(file, path, parse)
    if family != args.task_family:
        raise ArgsError(f"{path}: a loss evolved on {family}, not on --task-family {args.task_family}")
    return theta, resolve_args(dataclasses.replace(args, **inner))


def seed_statistics(x, prefix: str) -> dict:
    """Statistics over seeds of x [num_seeds]: {prefix}_mean, _std (sample std, ddof 1; 0 for one seed), _iqm (the
    interquartile mean, rliable's IQM) and _iqm_ci (its percentile-bootstrap 95% interval, 2,000 resamples drawn
    with a fixed generator, so a summary is reproducible; the IQM itself for one seed), and {prefix}s, the values."""
    x = np.asarray(x, dtype=float)
    iqm = float(scipy.stats.trim_mean(x, 0.25))
    ci = [iqm, iqm]
    if len(x) > 1:
        boot = scipy.stats.bootstrap(
            (x,),
            functools.partial(scipy.stats.trim_mean, proportiontocut=0.25),
            n_resamples=2000,
            method="percentile",
            rng=np.random.default_rng(0),
        )
        ci = [float(boot.confidence_interval.low), float(boot.confidence_interval.high)]
    return {
        f"{prefix}_mean": float(x.mean()),
        f"{prefix}_std": float(x.std(ddof=1)) if len(x) > 1 else 0.0,
        f"{prefix}_iqm": iqm,
        f"{prefix}_iqm_ci": ci,
        f"{prefix}s": x.tolist(),
    }


def compare_trainers(outputs: dict, lifetime: int) -> tuple[dict, dict]:
    """--test's table: for each trainer's LifetimeOutput [num_seeds], seed_statistics of the final return and of the
    AUC (the mean of an agent's curve), and Welch's p against the evolved loss (the first trainer), printed one line
    per trainer. Returns (the summary's trainers, {name: (lifetime steps [T], curves [num_seeds, T])})."""
    trainers, series = {}, {}
    for name, out in outputs.items():
        final, curve = np.asarray(out.final_return), np.asarray(out.curve)
        with warnings.catch_warnings(action="ignore", category=RuntimeWarning):  # NaN before any episode ended
            auc = np.nanmean(curve, axis=1)
        trainers[name] = stats = {**seed_statistics(final, "final_return"), **seed_statistics(auc, "auc")}
        series[name] = ((np.arange(curve.shape[1]) + 1) * lifetime / curve.shape[1], curve)
        line = f"{name:17s}"
        for what in ("final_return", "auc"):
            low, high = stats[f"{what}_iqm_ci"]
            line += f"  {what} {stats[f'{what}_mean']:8.3f} ± {stats[f'{what}_std']:.3f} (IQM "
            line += f"{stats[f'{what}_iqm']:.3f}, 95% CI {low:.3f} to {high:.3f})"
            if name != "evolved":
                evolved = trainers["evolved"][f"{what}s"]
                p = float(scipy.stats.ttest_ind(evolved, stats[f"{what}s"], equal_var=False).pvalue)
                stats[f"{what}_welch_p_vs_evolved"] = p
                line += f" p {p:.3g}"
        print(line)
    return trainers, series


def save_curves(run_dir: str, args: Args, series: dict, split: str):
    """test_curves.csv (each trainer's mean curve over its agents at the evolved loss's update steps) and
    test_curves.png (mean ± std)."""
    grid = (np.arange(args.lifetime // args.update_every) + 1) * args.update_every
    columns = {}
    for name, (steps, curve) in series.items():
        with warnings.catch_warnings(action="ignore", category=RuntimeWarning):
            columns[f"{name}_mean"] = np.interp(grid, steps, np.nanmean(curve, axis=0))
    rows = np.column_stack([grid, *columns.values()]).tolist()
    write_table(os.path.join(run_dir, "test_curves.csv"), ["lifetime_step", *columns], rows)
    title = f"{args.task_family}, {split}, {args.num_seeds} agents per trainer"
    save_plot(
        os.path.join(run_dir, "test_curves.png"), series, "lifetime step", "return of the last finished episode", title
    )


def plot_fitness(run_dir: str, args: Args, rows: list):
    """fitness_curve.png of the generation rows: mean and best fitness, and the evaluations of the ES mean."""
    evaluated = [r for r in rows if np.isfinite(r["eval_fitness"])]
    series = {
        label: ([r["generation"] for r in some], [r[k] for r in some])
        for label, k, some in [
            ("mean fitness", "mean_fitness", rows),
            ("best fitness", "best_fitness", rows),
            ("current loss, α = 0, fixed evaluation tasks", "eval_fitness", evaluated),
        ]
    }
    path = os.path.join(run_dir, "fitness_curve.png")
    save_plot(path, series, "generation", "final return (mean over tasks)", f"EPG on {args.task_family}")


def save_plot(path: str, series: dict, xlabel: str, ylabel: str, title: str):
    """PNG of named curves {name: (x [T], y [k, T])}: the mean over the k rows (NaN ignored), ± std shaded.
    Process 0 only."""
    if jax.process_index():
        return
    from matplotlib.figure import Figure

    ax = Figure(figsize=(6.5, 4), layout="tight").add_subplot(xlabel=xlabel, ylabel=ylabel, title=title)
    for name, (x, y) in series.items():
        with warnings.catch_warnings(action="ignore", category=RuntimeWarning):  # all-NaN before any episode ended
            mean, std = np.nanmean(np.atleast_2d(y), axis=0), np.nanstd(np.atleast_2d(y), axis=0)
        ax.plot(x, mean, ".-" if len(x) < 30 else "-", label=name)
        ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    ax.legend(fontsize=8)
    ax.figure.savefig(path + ".tmp.png", dpi=120)
    os.replace(path + ".tmp.png", path)


def main(args: Args) -> str:
    """Meta-train (default), --resume, or --test; returns the run directory."""
    try:
        start_processes(args)
        args = resolve_args(args if args.resume is None else resumed_args(args))
        run_dir = run_test(args) if args.test else run_meta_training(args)
    except ArgsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"run directory: {run_dir}")
    return run_dir


if __name__ == "__main__":
    main(tyro.cli(Args))
