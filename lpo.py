"""Learned Policy Optimisation (LPO): a drift network meta-trained by evolution strategies, end to end in one file.

Mirror Learning writes the policy objective as r·A - f(r, A): the importance ratio r times the advantage A,
minus a "drift" f that is zero, and flat, at r = 1. LPO makes f a small network of (r, A) whose weights OpenAI-ES
searches, scoring each candidate by the return of an agent after a whole PPO run with it. The loop is dpo.py's, line
for line (`diff dpo.py lpo.py` shows LPO): the drift is a closure, so a population of runs is one compiled vmap.

Paper: Chris Lu, Jakub Grudzien Kuba, Alistair Letcher, Luke Metz, Christian Schroeder de Witt, Jakob Foerster,
"Discovered Policy Optimisation", NeurIPS 2022, arXiv:2210.05639, sections 4-5 (LPO), eq. 8 and Appendix A.
The ES and the drift network follow the authors' dpo/main_drift_brax.py and dpo/brax_drift.py (commit c412884).

Training is a compiled function that advances every seed (vmapped, sharded over the JAX devices) by a chunk of
updates, called from a short host loop that logs, checkpoints and prints between chunks.

Example:
    python lpo.py --env-ids CartPole-v1 Acrobot-v1 --total-timesteps 65536 --num-generations 150  # CPU, docs/lpo.md
    python lpo.py --eval-drift drifts/lpo_classic.msgpack --env-id Breakout-MinAtar --num-seeds 10
"""

import csv
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import socket
import sys
import time
import typing
import warnings
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats
import tyro
from flax.training.train_state import TrainState

EnvId = Literal[
    "ant",
    "halfcheetah",
    "hopper",
    "humanoid",
    "humanoidstandup",
    "inverted_pendulum",
    "inverted_double_pendulum",
    "pusher",
    "reacher",
    "swimmer",
    "walker2d",
    "CartPole-v1",
    "Acrobot-v1",
    "MountainCar-v0",
    "Pendulum-v1",
    "MountainCarContinuous-v0",
    "Breakout-MinAtar",
    "Asterix-MinAtar",
    "Freeway-MinAtar",
    "SpaceInvaders-MinAtar",
    "Seaquest-MinAtar",
]
BRAX_ENVS = typing.get_args(EnvId)[:11]


@dataclasses.dataclass
class Args:
    """Meta-train an LPO drift, compare one with DPO and PPO (--eval-drift), or draw one.

    A field left at None takes its env family's default: the tables ENV_DEFAULTS, after the method;
    resolve_args(Args(env_id=ENV)) gives every resolved value of one env."""

    # ---- run ----
    exp_name: str = os.path.splitext(os.path.basename(__file__))[0]
    """name of this experiment, part of the run name"""
    seed: int = 1
    """seed of the experiment; seed i of --num-seeds gets an independent key split from it"""
    num_seeds: int = 1
    """independent training runs, vmapped in one process and sharded over the devices (the paper reports 10)"""
    num_cpu_devices: int | None = 1
    """CPU: JAX devices to split the cores into, each training its share of the seeds; 1 gives the same numbers on
    any core count, more can be faster but changes the float rounding (see use_cpu_cores)"""
    run_dir: str | None = None
    """where to write results; None: runs/{env_id}__{exp_name}__{drift}__{seed}__{unix time}"""
    resume: str | None = None
    """a run directory whose checkpoint to continue; its args.json is used (other flags are ignored)"""
    overwrite: bool = False
    """write a new run into a --run-dir that already holds one (its files are replaced); without it that is refused"""
    num_eval_envs: int = 128
    """evaluation episodes per seed, run in parallel, each to its end or the time limit (Brax PPO: 128)"""

    # ---- environment ----
    env_id: EnvId = "ant"
    """a Brax env (physics by --backend) or a gymnax classic-control or MinAtar env"""
    backend: Literal["generalized", "positional", "spring", "mjx"] = "spring"
    """Brax physics backend (ignored for gymnax envs); spring is the fastest on CPU, generalized the most accurate"""
    episode_length: int = 1000
    """Brax: physics steps before a time-limit truncation"""
    action_repeat: int | None = None
    """Brax: physics steps per agent step; None: the env family's"""

    # ---- the method ----
    clip_coef: float | None = None
    """PPO clipping ε of --drift ppo (the purejaxrl loop also clips the value loss by it); None: the env family's"""
    drift: Literal["lpo", "dpo", "ppo"] = "lpo"
    """drift f in r·A - f(r, A) of an agent run: lpo (the network in --eval-drift), dpo (eq. 9), ppo (eq. 6)"""
    compare: tuple[Literal["lpo", "dpo", "ppo"], ...] = ("lpo", "dpo", "ppo")
    """train each of these drifts with the same seeds and flags, one run directory each, and compare them"""

    # ---- LPO: --eval-drift, else meta-training (the authors' main_drift_brax.py, evosax 0.0.4) ----
    eval_drift: str | None = None
    """a learned drift: a .msgpack written by lpo.py (drifts/ ships one) or a meta-training run directory; train fresh
    agents on --env-id with it and with --compare's drifts"""
    env_ids: tuple[EnvId, ...] = ()
    """meta-train on these envs jointly, fitness shaped per env (--fitness-shaping) and averaged; empty: --env-id"""
    env_flags: tuple[str, ...] = ()
    """meta-training: an inner-loop flag for one env only, as ENV:FLAG=VALUE (Pendulum-v1:learning-rate=1e-3); the
    command's other flags apply to every env, and flags left unset take each env's family defaults"""
    ppo_init: bool = True
    """LPO: the network adds to PPO's drift and the ES mean starts at zero (PPO); --no-ppo-init: LPO-Zero"""
    drift_start: Literal["zero", "hidden"] = "zero"
    """LPO's ES mean at generation 0: zero (the authors', every weight 0) or hidden (hidden layers at flax's
    LeCun-normal init, output layer 0); both are PPO, but only at hidden are an antithetic pair's drifts opposite"""
    drift_hidden: tuple[int, ...] | None = None
    """drift network hidden sizes (None: see drift_layer_sizes); the flag alone: the linear sign-split drift"""
    pop_size: int = 32
    """ES population (antithetic pairs)"""
    pop_batch: int | None = None
    """members trained in one compiled call (None: the whole population); slices bound the memory, with progress"""
    num_generations: int | None = None
    """ES generations (None: 1025, the authors' script on Brax ant); with --resume, the total to extend the run to"""
    num_rollouts: int = 1
    """inner training runs per member and env per generation (the same runs for every member)"""
    sigma: tuple[float, float, float] = (0.04, 0.999, 0.01)
    """ES noise σ: at generation 0, factor per generation, floor"""
    es_lr: tuple[float, float, float] = (0.01, 0.999, 0.001)
    """Adam learning rate on the ES mean: at generation 0, factor per generation, floor (1e-2 1 1e-2: constant)"""
    es_beta1: float = 0.99
    """Adam β1 on the ES mean (evosax 0.0.4's default; optax's is 0.9)"""
    fitness_shaping: Literal["z_score", "centered_rank"] = "z_score"
    """how fitness becomes ES weights (the authors: z-score)"""
    validate_every: int = 10
    """every this many generations, the ES mean's return beside PPO's on fixed validation seeds (0: never)"""
    num_validation_seeds: int = 16
    """seeds of the ES mean's validation, the same at every validation and paired with PPO's"""
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

    # ---- PPO loop ----
    ppo_loop: Literal["brax", "purejaxrl"] | None = None
    """brax: Brax PPO's loop; purejaxrl: PureJaxRL's ppo.py (docs/dpo.md item 4); None: the env family's"""
    log_frequency: int | None = None
    """Brax: the authors' update count (see num_updates); 0: as many as fit in --total-timesteps"""
    total_timesteps: int | None = None
    """environment steps per seed, action repeats included; None: the env family's"""
    num_envs: int | None = None
    """parallel environments per seed; None: the env family's"""
    num_steps: int | None = None
    """unroll length; GAE bootstraps at each unroll's end; None: the env family's"""
    num_unrolls: int | None = None
    """consecutive unrolls per env per update, Brax's batch_size·num_minibatches/num_envs; None: the env family's"""
    num_minibatches: int | None = None
    """minibatches per epoch, of whole unrolls (brax loop) or samples (purejaxrl); None: the env family's"""
    update_epochs: int | None = None
    """epochs over each batch; None: the env family's"""
    learning_rate: float | None = None
    """Adam learning rate; None: the env family's"""
    anneal_lr: bool | None = None
    """anneal the learning rate linearly to 0, constant within an update; None: the env family's"""
    gamma: float | None = None
    """discount factor γ; None: the env family's"""
    gae_lambda: float = 0.95
    """GAE λ"""
    ent_coef: float | None = None
    """entropy bonus coefficient; None: the env family's"""
    vf_coef: float = 0.5
    """value loss coefficient (value loss is 0.5·mean squared error, as Brax's 0.5·0.5·MSE)"""
    max_grad_norm: float | None = None
    """global gradient-norm clip, 0 for none; None: the env family's"""
    adam_eps: float | None = None
    """Adam ε; None: the env family's"""
    reward_scaling: float | None = None
    """rewards are multiplied by this before GAE; None: the env family's"""
    normalize_observations: bool | None = None
    """normalise observations by running mean and variance; None: the env family's"""
    actor_hidden: tuple[int, ...] | None = None
    """policy MLP hidden sizes; None: the env family's"""
    critic_hidden: tuple[int, ...] | None = None
    """value MLP hidden sizes; None: the env family's"""
    activation: Literal["tanh", "relu", "swish"] | None = None
    """hidden activation; None: the env family's"""


# ---- The method: drift functions and the Mirror Learning policy objective.
Drift = Callable[[jax.Array, jax.Array], jax.Array]
"""A drift f(r, A) taking log r = logπ - logπ_old and A (broadcastable shapes) -> f, same shape, ≥ 0. It takes the
log-ratio itself, as the authors' brax_drift.py and PureJaxRL's DPO do: log(exp(x)) is -inf below x ≈ -87."""

LOG_RATIO_BOUND = 20.0
"""actor_loss clips log r to ±20 (ratios 2e-9 to 5e8) before the drift and exp(): exp overflows float32 above 88,
and r·A - f would be inf - inf. Samples beyond the bound add no gradient, as PPO's clip does; training never
meets them."""


def ppo_drift(log_ratio: jax.Array, advantage: jax.Array, clip_coef: float = 0.2) -> jax.Array:
    """PPO's drift, f(r, A) = ReLU((r - clip(r, 1-ε, 1+ε))·A) with ε = clip_coef  (Lu et al. 2022, eq. 6).

    With it the objective r·A - f equals PPO-clip's min(r·A, clip(r, 1-ε, 1+ε)·A).
    Args: log_ratio = log r and advantage, broadcastable shapes. Returns f, same shape, ≥ 0.
    """
    ratio = jnp.exp(log_ratio)
    return jax.nn.relu((ratio - jnp.clip(ratio, 1.0 - clip_coef, 1.0 + clip_coef)) * advantage)


def dpo_drift(log_ratio: jax.Array, advantage: jax.Array, alpha: float = 2.0, beta: float = 0.6) -> jax.Array:
    """DPO's discovered drift (Lu et al. 2022, eq. 9).

        A ≥ 0:  f = ReLU((r-1)·A - α·tanh((r-1)·A / α))
        A < 0:  f = ReLU(log(r)·A - β·tanh(log(r)·A / β))

    x - c·tanh(x/c) is ≥ 0 for x ≥ 0 and grows like x³/(3c²) near 0, so f = 0 and ∂f/∂r = 0 at r = 1
    (a valid drift, paper Appendix D). Args: log_ratio = log r and advantage, broadcastable shapes.
    Returns f, same shape, ≥ 0.
    """
    positive = jnp.expm1(log_ratio) * advantage
    negative = log_ratio * advantage
    return jnp.where(
        advantage >= 0,
        jax.nn.relu(positive - alpha * jnp.tanh(positive / alpha)),
        jax.nn.relu(negative - beta * jnp.tanh(negative / beta)),
    )


def actor_loss(log_ratio: jax.Array, advantage: jax.Array, drift: Drift) -> jax.Array:
    """Mirror Learning policy loss, -mean(r·A - f(r, A))  (Lu et al. 2022, eq. 5).

    Args: log_ratio = logπ(a|s) - logπ_old(a|s) [batch] (clipped to ±LOG_RATIO_BOUND), advantage [batch] (already
    normalised), drift f (a Drift, taking the log-ratio). Returns a scalar to minimise, finite for any log-ratio.
    """
    log_ratio = jnp.clip(log_ratio, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    return -jnp.mean(jnp.exp(log_ratio) * advantage - drift(log_ratio, advantage))


def check_drift(drift: Drift):
    """Check a drift on a grid before training with it: f(log r, A) ≥ 0 and finite for log r in [-2, 2] and A in
    [-3, 3], and f = 0 and ∂f/∂log r = 0 at log r = 0 for every A of the grid (a Mirror Learning drift is zero
    and flat at r = 1: Lu et al. 2022, section 2; Kuba et al. 2022). The drift takes log r, not r.

    Raises: ArgsError naming the first condition that fails and where.
    """
    advantage = jnp.linspace(-3.0, 3.0, 13)
    f = np.asarray(drift(jnp.linspace(-2.0, 2.0, 81)[:, None], advantage))
    at_one = np.asarray(drift(jnp.zeros_like(advantage), advantage))
    slope = np.asarray(jax.vmap(jax.grad(drift), (None, 0))(0.0, advantage))
    if not np.isfinite(f).all() or f.min() < 0:
        raise ArgsError(f"the drift must be finite and >= 0 for log r in [-2, 2], A in [-3, 3]; its minimum: {f.min()}")
    for name, x in (("f", at_one), ("its slope in log r", slope)):
        worst = int(np.abs(x).argmax())
        if abs(x[worst]) > 1e-6:
            raise ArgsError(
                f"{name} must be 0 at log r = 0 (r = 1), but is {x[worst]:.3g} at A = {float(advantage[worst]):g}: "
                "does it take r instead of log r?"
            )


def make_drift(args: Args) -> Drift:
    """The drift f(log r, A) chosen by --drift, with its coefficients bound."""
    if args.drift == "ppo":
        return functools.partial(ppo_drift, clip_coef=args.clip_coef)
    if args.drift == "dpo":
        return dpo_drift
    net, ppo_init, _ = load_drift(args.eval_drift)
    return functools.partial(lpo_drift, net, ppo_init=ppo_init, clip_coef=args.clip_coef)


# ---- LPO: the drift network (Lu et al. 2022, section 4.1, eq. 8).
XI = 1e-4  # the margin ξ of eq. 8 (the authors' brax_drift.py line 168: `relu(drift_ppo + drift - 0.0001)`)


def lpo_features(log_ratio: jax.Array, advantage: jax.Array) -> jax.Array:
    """The drift network's input (Lu et al. 2022, section 4.1), in the order of the authors' brax_drift.py
    lines 157-162: [log r, (log r)², 1-r, (1-r)²] and the same four times A. All eight are 0 at r = 1.

    Args: log_ratio = log r and advantage, broadcastable shapes [...]. Returns [..., 8].
    """
    log_r, advantage = jnp.broadcast_arrays(log_ratio, advantage)
    one_minus_r = -jnp.expm1(log_r)
    deltas = jnp.stack([log_r, log_r**2, one_minus_r, one_minus_r**2], axis=-1)
    return jnp.concatenate([deltas, advantage[..., None] * deltas], axis=-1)


def drift_layer_sizes(ppo_init: bool, hidden: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Default LPO: 8 → 128 tanh → 1 (the authors' DriftNet, main_drift_brax.py lines 39-45, and Appendix A's one
    hidden layer); LPO-Zero: 8 → 256 → 256 → 1 ReLU (section 5.1's two layers). No biases in either. hidden = ():
    16 → 1, the linear sign-split drift (the 8 features where A ≥ 0, then where A < 0), whose f̃ is odd in the
    weights, so an antithetic pair at zero differs (the network's f̃(-W) = f̃(W): the same drift, no ES gradient)."""
    hidden = ((128,) if ppo_init else (256, 256)) if hidden is None else hidden
    return (16 if hidden == () else 8, *hidden, 1)


def init_drift_params(
    key: jax.Array, ppo_init: bool = True, hidden: tuple[int, ...] | None = None, start: str = "zero"
) -> list:
    """The drift network's weights, a list of matrices [in, out]. LPO: all zeros (start "zero", the authors' ES
    mean, main_drift_brax.py lines 47-56 compute flax's init but start the ES at zero), or the hidden layers at
    flax's default LeCun-normal init and the output layer at zero (start "hidden", this project's); either way
    f̃ ≡ 0, so generation 0 is PPO. LPO-Zero: every layer normal with variance 1/fan-in."""
    sizes = drift_layer_sizes(ppo_init, hidden)
    keys = jax.random.split(key, len(sizes) - 1)
    if not ppo_init:
        return [jax.random.normal(k, (m, n)) / jnp.sqrt(m) for k, m, n in zip(keys, sizes, sizes[1:])]
    layers = [jnp.zeros((m, n)) for m, n in zip(sizes, sizes[1:])]
    if start == "hidden":
        lecun = jax.nn.initializers.lecun_normal()  # flax.linen.Dense's default kernel_init
        layers[:-1] = [lecun(k, w.shape) for k, w in zip(keys, layers[:-1])]
    return layers


def lpo_drift(
    net: list, log_ratio: jax.Array, advantage: jax.Array, ppo_init: bool = True, clip_coef: float = 0.2
) -> jax.Array:
    """LPO's learned drift (Lu et al. 2022, eq. 8 and section 5.1; brax_drift.py lines 163-169).

        LPO:       f = ReLU(f_PPO(r, A) + f̃(x) - ξ),  f_PPO = ReLU((r - clip(r, 1±ε))·A), ε = clip_coef
        LPO-Zero:  f = ReLU(f̃(x) - ξ)

    f̃ is the bias-free MLP (or sign-split linear map) of x = lpo_features(r, A), so f̃ = 0 at r = 1 and the margin
    ξ keeps f = 0 and ∂f/∂r = 0 there for any weights: every candidate is a valid drift. With zero weights, LPO is
    PPO (at the same clip_coef as the PPO baseline; the authors' line 166 fixes 0.2) with a drift lowered by ξ.
    Args: net from init_drift_params; log_ratio = log r, advantage: broadcastable [...]. Returns f [...] ≥ 0.
    """
    f_tilde = drift_network(net, log_ratio, advantage, ppo_init)
    return jax.nn.relu(f_tilde - XI + (ppo_drift(log_ratio, advantage, clip_coef) if ppo_init else 0.0))


def drift_network(net: list, log_ratio: jax.Array, advantage: jax.Array, ppo_init: bool = True) -> jax.Array:
    """f̃ [...], the bias-free network of lpo_drift: tanh hidden layers (LPO) or ReLU (LPO-Zero) over
    x = lpo_features(log r, A); a single matrix [16, 1] is the linear sign-split drift (its own weights for A ≥ 0
    and for A < 0). f̃ = 0 at r = 1 for any weights, since x = 0 there."""
    h = lpo_features(log_ratio, advantage)
    if len(net) == 1:
        positive = jnp.broadcast_to(advantage, h.shape[:-1])[..., None] >= 0
        h = jnp.concatenate([h * positive, h * ~positive], axis=-1)
    for w in net[:-1]:
        h = (jnp.tanh if ppo_init else jax.nn.relu)(h @ w)
    return (h @ net[-1])[..., 0]


def compute_gae(rewards, values, bootstrap_value, terminated, truncated, gamma: float, gae_lambda: float):
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) by reverse scan, in Brax PPO's V-trace form
    (brax/training/agents/ppo/losses.py) for the brax loop and in PureJaxRL's for the purejaxrl loop.

        δ_t  = (r_t + γ(1 - term_t)·V_{t+1} - V_t)·(1 - trunc_t)
        Â_t  = δ_t + γλ(1 - term_t)(1 - trunc_t)·Â_{t+1},   v_t = V_t + Â_t        (λ-returns, value targets)
        A_t  = (r_t + γ(1 - term_t)·v_{t+1} - V_t)·(1 - trunc_t)                    (Brax's advantage)

    Brax gives a time-limit truncation no advantage and cuts the trace there. PureJaxRL (purejaxrl/ppo.py lines
    142-164) treats every episode end as terminal (line 150: terminated or truncated, no truncation) and uses Â.
    Args: rewards, values, terminated, truncated [T, B]; bootstrap_value [B] = V(s_T).
    Returns (value targets v [T, B], Brax's advantages A [T, B], PureJaxRL's advantages Â [T, B]), gradients stopped.
    """
    next_values = jnp.concatenate([values[1:], bootstrap_value[None]])
    deltas = (rewards + gamma * (1.0 - terminated) * next_values - values) * (1.0 - truncated)

    def backward(acc, step):
        delta, term, trunc = step
        acc = delta + gamma * gae_lambda * (1.0 - term) * (1.0 - trunc) * acc
        return acc, acc

    _, vs_minus_v = jax.lax.scan(
        backward, jnp.zeros_like(bootstrap_value), (deltas, terminated, truncated), reverse=True
    )
    vs = vs_minus_v + values
    next_vs = jnp.concatenate([vs[1:], bootstrap_value[None]])
    advantages = (rewards + gamma * (1.0 - terminated) * next_vs - values) * (1.0 - truncated)
    return jax.lax.stop_gradient(vs), jax.lax.stop_gradient(advantages), jax.lax.stop_gradient(vs_minus_v)


# ---- Defaults per environment family, for the Args fields left at None.
_BRAX = dict(
    num_envs=2048,
    num_minibatches=32,
    learning_rate=3e-4,
    anneal_lr=False,
    normalize_observations=True,
    actor_hidden=(32,) * 4,
    critic_hidden=(256,) * 5,
    activation="swish",
    clip_coef=0.3,
    max_grad_norm=0.0,
    adam_eps=1e-8,
    ppo_loop="brax",
)  # Brax PPO's networks and optimiser; ε from the authors' compute_ppo_loss
# The authors' dpo/main_drift_brax.py `train_fn` table (num_unrolls = batch_size × num_minibatches / num_envs);
# the envs it does not list take Brax's training notebook's (notebooks/training.ipynb: humanoidstandup,
# inverted_pendulum, inverted_double_pendulum, pusher), and hopper and swimmer (PPO-less there) walker2d's.
BRAX_COLUMNS = (
    "total_timesteps reward_scaling num_steps num_unrolls update_epochs gamma ent_coef action_repeat log_frequency"
)
BRAX_TABLE = {  # env: the values of BRAX_COLUMNS
    "ant": (30_000_000, 10.0, 5, 16, 4, 0.97, 1e-2, 1, 20),
    "humanoid": (50_000_000, 0.1, 10, 16, 8, 0.97, 1e-3, 1, 20),
    "halfcheetah": (100_000_000, 1.0, 20, 8, 8, 0.95, 1e-3, 1, 10),
    "walker2d": (50_000_000, 0.1, 20, 4, 8, 0.97, 1e-3, 1, 10),
    "reacher": (100_000_000, 5.0, 50, 4, 8, 0.95, 1e-3, 4, 20),
    "hopper": (50_000_000, 0.1, 20, 4, 8, 0.97, 1e-3, 1, 10),
    "humanoidstandup": (100_000_000, 0.1, 15, 16, 8, 0.97, 1e-2, 1, 20),
    "inverted_pendulum": (2_000_000, 10.0, 5, 16, 4, 0.97, 1e-2, 1, 20),
    "inverted_double_pendulum": (20_000_000, 10.0, 5, 16, 4, 0.97, 1e-2, 1, 20),
    "pusher": (50_000_000, 5.0, 30, 4, 8, 0.95, 1e-2, 1, 20),
    "swimmer": (50_000_000, 0.1, 20, 4, 8, 0.97, 1e-3, 1, 10),
}
ENV_DEFAULTS = {env: dict(_BRAX, **dict(zip(BRAX_COLUMNS.split(), row))) for env, row in BRAX_TABLE.items()}
ENV_DEFAULTS["humanoidstandup"]["learning_rate"] = 6e-4  # Brax's training notebook
ENV_DEFAULTS["pusher"]["num_minibatches"] = 16  # Brax's training notebook (its batch size 512)
_GYMNAX = dict(
    ppo_loop="purejaxrl",
    log_frequency=0,
    num_unrolls=1,
    anneal_lr=True,
    clip_coef=0.2,
    max_grad_norm=0.5,
    adam_eps=1e-5,
    action_repeat=1,
)  # PureJaxRL's ppo.py: one unroll per update, ε 0.2, gradient clip 0.5, Adam ε 1e-5, annealed learning rate
# Classic control: PureJaxRL's ppo.py __main__ config (4 envs × 128 steps, 4 epochs × 4 minibatches); Pendulum and
# MountainCarContinuous: its continuous-action settings; MinAtar: its MinAtar config.
GYMNAX_COLUMNS = (
    "total_timesteps num_envs num_steps num_minibatches update_epochs learning_rate gamma ent_coef reward_scaling"
    " normalize_observations actor_hidden activation"
)
GYMNAX_TABLE = {  # family: the values of GYMNAX_COLUMNS (the critic's hidden sizes are the actor's)
    "classic": (500_000, 4, 128, 4, 4, 2.5e-4, 0.99, 0.01, 1.0, False, (64, 64), "tanh"),
    "Pendulum-v1": (1_000_000, 16, 64, 8, 10, 1e-3, 0.95, 0.0, 0.1, True, (64, 64), "tanh"),
    "MountainCarContinuous-v0": (1_000_000, 16, 64, 8, 10, 1e-3, 0.99, 0.0, 0.1, True, (64, 64), "tanh"),
    "MinAtar": (10_000_000, 64, 128, 8, 4, 5e-4, 0.99, 0.01, 1.0, False, (256, 256), "relu"),
}
for env in typing.get_args(EnvId)[len(BRAX_TABLE) :]:
    family = env if env in GYMNAX_TABLE else ("MinAtar" if env.endswith("MinAtar") else "classic")
    ENV_DEFAULTS[env] = dict(_GYMNAX, **dict(zip(GYMNAX_COLUMNS.split(), GYMNAX_TABLE[family])))
    ENV_DEFAULTS[env]["critic_hidden"] = ENV_DEFAULTS[env]["actor_hidden"]


class ArgsError(ValueError):
    """A user's mistake in the arguments or files: main prints it as one line and exits with code 2 (as tyro)."""


RANGES = (  # every numeric flag's valid values (a tuple flag: each entry), checked by resolve_args; None: unset
    (("gamma", "gae_lambda"), lambda x: 0 <= x <= 1, "in [0, 1]"),
    (("learning_rate", "clip_coef", "adam_eps", "reward_scaling"), lambda x: x > 0, "finite and > 0"),
    (
        ("ent_coef", "vf_coef", "max_grad_norm", "seed", "log_frequency"),
        lambda x: x >= 0,
        "finite and >= 0",
    ),
    (
        (
            "num_seeds",
            "num_cpu_devices",
            "num_eval_envs",
            "episode_length",
            "action_repeat",
            "total_timesteps",
            "num_envs",
            "num_steps",
        )
        + ("num_unrolls", "num_minibatches", "update_epochs", "actor_hidden", "critic_hidden"),
        lambda x: x >= 1,
        ">= 1",
    ),
)


def check_ranges(args, ranges) -> None:
    """Raises ArgsError naming the first flag of `ranges` ((names, valid(x), description) rows) whose value, or an
    entry of its tuple, is NaN, infinite or outside its range."""
    for names, valid, description in ranges:
        for name in names:
            value = getattr(args, name)
            if value is not None and not all(math.isfinite(x) and valid(x) for x in np.atleast_1d(value)):
                raise ArgsError(f"--{name.replace('_', '-')} {value} must be {description}")


def resolve_args(args: Args) -> Args:
    """Fill the None fields with the env family's defaults and check what would otherwise run silently wrong.

    Raises: ArgsError naming the problem: a value outside its range (RANGES), a batch whose unrolls (brax loop)
        or samples (purejaxrl loop) do not split into --num-minibatches, fewer --total-timesteps than one update.
    """
    args = dataclasses.replace(args, **{k: v for k, v in ENV_DEFAULTS[args.env_id].items() if getattr(args, k) is None})
    check_ranges(args, RANGES)
    items = args.num_envs * args.num_unrolls if args.ppo_loop == "brax" else batch_size(args)  # shuffled units
    if items % args.num_minibatches:
        raise ArgsError(
            f"the batch's {items} {'unrolls' if args.ppo_loop == 'brax' else 'samples'}"
            f" do not divide into --num-minibatches {args.num_minibatches}"
        )
    if num_updates(args) == 0:
        raise ArgsError(
            f"--total-timesteps {args.total_timesteps} is less than one update"
            f" ({batch_size(args) * args.action_repeat} steps)"
        )
    return args


def batch_size(args: Args) -> int:
    """Agent steps collected per update and seed: num_envs × num_steps × num_unrolls."""
    return args.num_envs * args.num_steps * args.num_unrolls


def num_updates(args: Args) -> int:
    """n = total_timesteps // (batch × action_repeat) (brax_drift.py line 330), run by the authors' loop as
    (log_frequency + 1) × (n // log_frequency) updates (lines 333 and 349) when n ≥ log_frequency > 0."""
    n = args.total_timesteps // (batch_size(args) * args.action_repeat)
    if 0 < args.log_frequency <= n:
        return (args.log_frequency + 1) * (n // args.log_frequency)
    return n


# ---- Environments: one interface over gymnax and Brax, for a single environment (vmap for many).
#   reset(key) -> (obs, state);  step(key, state, action) -> (obs, state, reward, done, truncated)
# Both reset an ended episode inside step: `obs` is then the next episode's first observation.
class GymnaxEnv:
    """A gymnax env (classic control or MinAtar); observations flattened to float vectors."""

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
        """One env's first observation [obs_dim] and state, from key [2]."""
        obs, state = self.env.reset(key, self.params)
        return obs.reshape(-1).astype(jnp.float32), state

    def step(self, key, state, action):
        """(obs [obs_dim], state, reward, done, truncated), the last three float32 scalars: done when the episode
        ended (terminated or truncated), truncated when only at the time limit; an ended episode is reset."""
        obs, state, reward, terminated, truncated, _ = self.env.step(key, state, action, self.params)
        done = jnp.logical_or(terminated, truncated).astype(jnp.float32)
        truncated = jnp.logical_and(truncated, jnp.logical_not(terminated)).astype(jnp.float32)
        return obs.reshape(-1).astype(jnp.float32), state, jnp.squeeze(reward).astype(jnp.float32), done, truncated


class BraxEnv:
    """A Brax env in Brax's EpisodeWrapper (time limit, action repeat) and AutoResetWrapper, as Brax PPO trains.

    An ended episode restarts from that env's first start state, as in Brax (and the authors' brax 0.0.x).
    """

    def __init__(self, env_id: str, backend: str, episode_length: int, action_repeat: int):
        from brax import envs
        from brax.envs.wrappers.training import AutoResetWrapper, EpisodeWrapper

        base = envs.get_environment(env_id, backend=backend)
        self.env = AutoResetWrapper(EpisodeWrapper(base, episode_length, action_repeat))
        self.obs_dim, self.action_dim, self.discrete = int(base.observation_size), int(base.action_size), False
        self.action_low, self.action_high = -1.0, 1.0
        self.max_episode_steps = math.ceil(episode_length / action_repeat)

    def reset(self, key):
        """One env's first observation [obs_dim] and state, from key [2]."""
        state = self.env.reset(key)
        return state.obs, state

    def step(self, key, state, action):
        """GymnaxEnv.step's five values (key unused: Brax's physics is deterministic); action [action_dim] in
        [-1, 1]."""
        state = self.env.step(state, action)
        return state.obs, state, state.reward, state.done, state.info["truncation"]


def make_env(args: Args):
    """The environment named by args.env_id."""
    if args.env_id in BRAX_ENVS:
        return BraxEnv(args.env_id, args.backend, args.episode_length, args.action_repeat)
    return GymnaxEnv(args.env_id)


# ---- Observation normalisation by running mean and variance (Chan et al.'s parallel update).
class RunningStats(NamedTuple):
    """Running mean and variance of the observations, and the number of observations merged."""

    mean: jax.Array  # [obs_dim]
    var: jax.Array  # [obs_dim]
    count: jax.Array  # scalar


def update_running_stats(stats: RunningStats, batch: jax.Array) -> RunningStats:
    """Merge a batch [..., obs_dim] of observations into the running statistics."""
    batch = batch.reshape(-1, batch.shape[-1])
    n = batch.shape[0]
    delta = batch.mean(0) - stats.mean
    total = stats.count + n
    var = (stats.var * stats.count + batch.var(0) * n + delta**2 * stats.count * n / total) / total
    return RunningStats(stats.mean + delta * n / total, var, total)


def normalize(obs: jax.Array, stats: RunningStats, enabled: bool) -> jax.Array:
    """(obs - mean) / sqrt(var), var clipped to [1e-6, 1e6], the result to [-5, 5] (brax v0.0.11's
    brax/training/normalization.py, the version the authors ran); the identity when not enabled."""
    if not enabled:
        return obs
    return jnp.clip((obs - stats.mean) / jnp.sqrt(jnp.clip(stats.var, 1e-6, 1e6)), -5.0, 5.0)


# ---- Action distributions (written out: distrax does not run on current JAX) and networks.
class Categorical(NamedTuple):
    """Categorical policy over discrete actions; logits [..., num_actions]."""

    logits: jax.Array

    def sample(self, key):
        """An action index, logits' shape without the last axis."""
        return jax.random.categorical(key, self.logits)

    def log_prob(self, action):
        """log π(action), action's shape."""
        log_p = jax.nn.log_softmax(self.logits)
        return jnp.take_along_axis(log_p, action[..., None].astype(jnp.int32), axis=-1)[..., 0]

    def entropy(self, noise):
        """Exact entropy, logits' shape without the last axis; noise is unused (TanhGaussian's estimate needs it)."""
        log_p = jax.nn.log_softmax(self.logits)
        return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)

    def env_action(self, action, low, high):
        """The action the env takes: the index itself (low and high unused)."""
        return action


class TanhGaussian(NamedTuple):
    """Brax's NormalTanhDistribution: u ~ N(loc, scale), action = tanh(u), scale = softplus(x) + 0.001.

    Samples and log-probabilities are of the pre-tanh u; `env_action` squashes u into [low, high].
    loc, scale: [..., action_dim]. Source: brax/training/distribution.py.
    """

    loc: jax.Array
    scale: jax.Array

    def sample(self, key):
        """A pre-tanh sample u [..., action_dim]."""
        return self.loc + self.scale * jax.random.normal(key, self.loc.shape)

    @staticmethod
    def log_det_jacobian(u):
        """log |d tanh(u)/du| = log(1 - tanh²u), written stably as 2(log 2 - u - softplus(-2u))."""
        return 2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u))

    def log_prob(self, u):
        """log density of tanh(u): Gaussian log density of u minus the log Jacobian, summed over dimensions."""
        normal = -0.5 * ((u - self.loc) / self.scale) ** 2 - jnp.log(self.scale) - 0.5 * jnp.log(2 * jnp.pi)
        return jnp.sum(normal - self.log_det_jacobian(u), axis=-1)

    def entropy(self, noise):
        """Gaussian entropy plus the log Jacobian at one sample u = loc + scale·noise (noise standard normal, loc's
        shape): Brax's one-sample estimate of tanh(u)'s entropy, loc's shape without the last axis."""
        normal = 0.5 + 0.5 * jnp.log(2 * jnp.pi) + jnp.log(self.scale)
        return jnp.sum(normal + self.log_det_jacobian(self.loc + self.scale * noise), axis=-1)

    def env_action(self, u, low, high):
        """tanh(u) scaled from [-1, 1] to [low, high], u's shape."""
        return low + (jnp.tanh(u) + 1.0) * (0.5 * (high - low))


class MLP(nn.Module):
    """hidden layers, then a linear output [..., out_dim]. Kernels: Brax's lecun-uniform (brax/training/networks.py)
    or PureJaxRL's orthogonal ones (gain √2, output gain out_scale); biases zero."""

    hidden: tuple[int, ...]
    out_dim: int
    activation: str
    brax_init: bool
    out_scale: float

    @nn.compact
    def __call__(self, x):
        act = {"tanh": nn.tanh, "relu": nn.relu, "swish": nn.swish}[self.activation]
        init = nn.initializers.lecun_uniform() if self.brax_init else nn.initializers.orthogonal(np.sqrt(2))
        # Rows flattened to a matrix: on a [T, B, in] input, XLA on CPU computes each kernel's gradient through a
        # transposed copy of the backpropagated error, and those products ran 1.5-1.8 times longer.
        leading = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        for width in self.hidden:
            x = act(nn.Dense(width, kernel_init=init)(x))
        out_init = nn.initializers.lecun_uniform() if self.brax_init else nn.initializers.orthogonal(self.out_scale)
        return nn.Dense(self.out_dim, kernel_init=out_init)(x).reshape(leading + (self.out_dim,))


def make_networks(args: Args, env):
    """(actor, critic) MLPs: the actor outputs logits, or loc and pre-softplus scale per action dimension."""
    brax = args.env_id in BRAX_ENVS
    out = env.action_dim if env.discrete else 2 * env.action_dim
    return (
        MLP(tuple(args.actor_hidden), out, args.activation, brax_init=brax, out_scale=0.01),
        MLP(tuple(args.critic_hidden), 1, args.activation, brax_init=brax, out_scale=1.0),
    )


def policy(actor: MLP, params, obs, discrete: bool):
    """The action distribution at obs [..., obs_dim]: Categorical, or Brax's scale = softplus(x) + 0.001."""
    out = actor.apply(params["actor"], obs)
    if discrete:
        return Categorical(out)
    loc, scale = jnp.split(out, 2, axis=-1)
    return TanhGaussian(loc, jax.nn.softplus(scale) + 0.001)


# ---- Training: make_train(args, drift) returns init(rng) -> Runner and train_chunk(runner, n) advancing n updates;
# over_seeds maps it over the seeds, sharded over the devices.
class Transition(NamedTuple):
    """One env step of every env, as the rollout records it (an unroll stacks them: fields [T, num_envs, ...])."""

    obs: jax.Array  # [num_envs, obs_dim], raw; an unroll keeps one more, its last next observation
    action: jax.Array  # [num_envs] or [num_envs, action_dim]; continuous: pre-tanh
    log_prob: jax.Array  # [num_envs], under the behaviour policy
    reward: jax.Array  # [num_envs], scaled by reward_scaling
    done: jax.Array  # [num_envs], 1.0 when the episode ended (terminated or truncated)
    truncated: jax.Array  # [num_envs], 1.0 when it ended at the time limit only


class Sample(NamedTuple):
    """The purejaxrl loop's batch: agent steps with what the rollout fixed, fields [samples, ...]."""

    obs: jax.Array  # raw
    action: jax.Array
    log_prob: jax.Array  # under the behaviour policy
    value: jax.Array  # the critic's at rollout time
    advantage: jax.Array  # GAE, before normalisation
    target: jax.Array  # value target A + V


class EpisodeStats(NamedTuple):
    """Per-env episode bookkeeping for the logged episodic return."""

    episode_return: jax.Array  # [num_envs], unscaled return of the running episode
    last_return: jax.Array  # [num_envs], unscaled return of the last finished episode, NaN before the first


class Runner(NamedTuple):
    """Everything a seed's training carries from update to update; also what a checkpoint holds."""

    train_state: TrainState
    obs_stats: RunningStats
    env_state: Any
    obs: jax.Array  # [num_envs, obs_dim]
    episodes: EpisodeStats
    rng: jax.Array
    update: jax.Array  # updates done


LOSS_METRICS = ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction")  # means over minibatches
METRICS = ("episodic_return", *LOSS_METRICS)


def make_optimizer(args: Args) -> optax.GradientTransformation:
    """Adam(--learning-rate, --adam-eps), with --anneal-lr linearly to 0 over the updates (constant within one, as
    PureJaxRL's ppo.py lines 73-79), after a global-norm clip if --max-grad-norm > 0. Brax's defaults
    (brax/training/agents/ppo/train.py: optax.adam, max_grad_norm=None) have no clip; PureJaxRL's clip at 0.5."""
    steps_per_update = args.update_epochs * args.num_minibatches

    def annealed(count):
        return args.learning_rate * (1.0 - (count // steps_per_update) / num_updates(args))

    tx = optax.adam(annealed if args.anneal_lr else args.learning_rate, eps=args.adam_eps)
    return optax.chain(optax.clip_by_global_norm(args.max_grad_norm), tx) if args.max_grad_norm > 0 else tx


def make_train(args: Args, drift: Drift):
    """Build one seed's training with the drift f(r, A) (see make_drift) as two pure functions.

    Returns:
        init(rng) -> Runner: parameters, optimiser, environments. Call it per seed outside any vmap: jaxlib
            0.10.2 on CPU can deadlock on batched LAPACK calls, such as the QR of a vmapped orthogonal init.
        train_chunk(runner, n) -> (runner, metrics): n updates (n may be traced, at most max_chunk(args));
            metrics[name] [max_chunk(args)] for the names in METRICS, NaN past n. episodic_return is the mean over
            envs of the last finished episode's unscaled return (NaN before any finished); the losses, entropy,
            approx_kl and clip_fraction (share of samples with |r - 1| > ε) are means over epochs and minibatches.
    """
    env = make_env(args)
    actor, critic = make_networks(args, env)
    n_chunk = max_chunk(args)
    obs_norm = args.normalize_observations
    n_unrolls = args.num_envs * args.num_unrolls
    tx = make_optimizer(args)

    def init(rng) -> Runner:
        """A seed's first Runner from its key [2]: fresh networks and optimiser, num_envs envs reset."""
        rng, key_init, key_reset = jax.random.split(rng, 3)
        key_actor, key_critic = jax.random.split(key_init)
        params = {
            "actor": actor.init(key_actor, jnp.zeros((1, env.obs_dim))),
            "critic": critic.init(key_critic, jnp.zeros((1, env.obs_dim))),
        }
        obs, env_state = jax.vmap(env.reset)(jax.random.split(key_reset, args.num_envs))
        stats = RunningStats(jnp.zeros(env.obs_dim), jnp.ones(env.obs_dim), 1e-4)
        return Runner(
            TrainState.create(apply_fn=None, params=params, tx=tx),
            jax.tree.map(jnp.asarray, stats),
            env_state,
            obs,
            EpisodeStats(jnp.zeros(args.num_envs), jnp.full(args.num_envs, jnp.nan)),
            rng,
            jnp.int32(0),
        )

    def env_step(runner: Runner, key):
        """One step of the num_envs envs under the current policy: the runner after it, and its Transition."""
        key_action, key_env = jax.random.split(key)
        pi = policy(actor, runner.train_state.params, normalize(runner.obs, runner.obs_stats, obs_norm), env.discrete)
        action = pi.sample(key_action)
        obs, env_state, reward, done, truncated = jax.vmap(env.step)(
            jax.random.split(key_env, args.num_envs),
            runner.env_state,
            pi.env_action(action, env.action_low, env.action_high),
        )
        episode_return = runner.episodes.episode_return + reward
        episodes = EpisodeStats(
            episode_return * (1.0 - done),
            jnp.where(done > 0, episode_return, runner.episodes.last_return),
        )
        transition = Transition(runner.obs, action, pi.log_prob(action), reward * args.reward_scaling, done, truncated)
        return runner._replace(env_state=env_state, obs=obs, episodes=episodes), transition

    def unroll(runner: Runner, key):
        """num_steps steps: a Transition of [num_steps, num_envs, ...] fields, obs [num_steps + 1, num_envs,
        obs_dim] with the observation after the last step kept for the bootstrap value."""
        runner, traj = jax.lax.scan(env_step, runner, jax.random.split(key, args.num_steps))
        return runner, traj._replace(obs=jnp.concatenate([traj.obs, runner.obs[None]]))

    def objective(pi, action, behaviour_log_prob, advantages, value_loss, noise):
        """The drift's policy loss (actor_loss on per-minibatch normalised advantages) + vf_coef·value loss -
        ent_coef·entropy (noise: the entropy estimate's standard normals, action's shape). Returns (total,
        (policy loss, value loss, entropy, approx-KL, clip fraction)), scalars."""
        log_ratio = pi.log_prob(action) - behaviour_log_prob
        ratio = jnp.exp(log_ratio)
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        policy_loss = actor_loss(log_ratio, advantages, drift)
        entropy = jnp.mean(pi.entropy(noise))
        total = policy_loss + args.vf_coef * value_loss - args.ent_coef * entropy
        approx_kl = jnp.mean(ratio - 1.0 - log_ratio)  # KL(π_old‖π) estimate
        return total, (policy_loss, value_loss, entropy, approx_kl, jnp.mean(jnp.abs(ratio - 1.0) > args.clip_coef))

    # The two PPO loops differ only here: what the epochs shuffle into minibatches, and the loss on one of them.
    if args.ppo_loop == "brax":
        shuffle_axis, shuffled = 1, n_unrolls  # whole unrolls [T, U·E]

        def prepare(params, batch: Transition, obs_stats) -> Transition:
            """The brax loop's batch is the rollout itself (fields [T, U·E, ...], obs [T + 1, U·E, ...])."""
            return batch

        def loss_fn(params, minibatch: Transition, obs_stats, noise):
            """Brax PPO's loss on a minibatch of B whole unrolls (Transition fields [T, B, ...], obs [T + 1, B, ...]),
            values and GAE recomputed with the current critic; value loss 0.5·MSE. Returns objective's."""
            obs = normalize(minibatch.obs, obs_stats, obs_norm)
            values = critic.apply(params["critic"], obs)[..., 0]
            terminated = minibatch.done * (1.0 - minibatch.truncated)
            targets, advantages, _ = compute_gae(
                minibatch.reward, values[:-1], values[-1], terminated, minibatch.truncated, args.gamma, args.gae_lambda
            )
            value_loss = 0.5 * jnp.mean((targets - values[:-1]) ** 2)
            pi = policy(actor, params, obs[:-1], env.discrete)
            return objective(pi, minibatch.action, minibatch.log_prob, advantages, value_loss, noise)

    else:
        shuffle_axis, shuffled = 0, batch_size(args)  # samples [T·U·E], as PureJaxRL's ppo.py

        def prepare(params, batch: Transition, obs_stats) -> Sample:
            """The purejaxrl loop's batch: the rollout's values, PureJaxRL's GAE once over each unroll, flattened to
            samples; batch fields [T, U·E, ...] (obs [T + 1, ...]) -> Sample fields [T·U·E, ...]."""
            values = critic.apply(params["critic"], normalize(batch.obs, obs_stats, obs_norm))[..., 0]
            no_truncation = jnp.zeros_like(batch.done)
            targets, _, advantages = compute_gae(
                batch.reward, values[:-1], values[-1], batch.done, no_truncation, args.gamma, args.gae_lambda
            )
            samples = Sample(batch.obs[:-1], batch.action, batch.log_prob, values[:-1], advantages, targets)
            return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), samples)

        def loss_fn(params, minibatch: Sample, obs_stats, noise):
            """PureJaxRL's loss on a minibatch of B shuffled samples (fields [B, ...]) with the rollout's advantages
            and targets; value loss 0.5·max(squared error, that of the value clipped to V_old ± ε) (ppo.py lines
            179-186). Returns objective's."""
            obs = normalize(minibatch.obs, obs_stats, obs_norm)
            values = critic.apply(params["critic"], obs)[..., 0]
            clipped = minibatch.value + jnp.clip(values - minibatch.value, -args.clip_coef, args.clip_coef)
            errors = jnp.maximum((values - minibatch.target) ** 2, (clipped - minibatch.target) ** 2)
            pi = policy(actor, params, obs, env.discrete)
            value_loss = 0.5 * jnp.mean(errors)
            return objective(pi, minibatch.action, minibatch.log_prob, minibatch.advantage, value_loss, noise)

    def minibatches_of(x, permutation):
        """x shuffled along shuffle_axis and split into [num_minibatches, ...] minibatches along it."""
        x = jnp.take(x, permutation, axis=shuffle_axis)
        x = x.reshape(x.shape[:shuffle_axis] + (args.num_minibatches, -1) + x.shape[shuffle_axis + 1 :])
        return jnp.moveaxis(x, shuffle_axis, 0)

    def update_minibatch(carry, minibatch_and_noise):
        """One Adam step on one minibatch (of loss_fn's shapes); carry = (train_state, obs_stats)."""
        minibatch, noise = minibatch_and_noise
        train_state, obs_stats = carry
        grads, aux = jax.grad(loss_fn, has_aux=True)(train_state.params, minibatch, obs_stats, noise)
        grads = jax.tree.map(jnp.nan_to_num, grads)  # as the authors' update_model
        return (train_state.apply_gradients(grads=grads), obs_stats), aux

    def update_epoch(carry, key):
        """One epoch: the batch (prepare's) shuffled into num_minibatches minibatches, one Adam step on each;
        carry = (train_state, obs_stats, batch). Returns the carry and loss_fn's scalars [num_minibatches]."""
        train_state, obs_stats, batch = carry
        key_perm, key_mb = jax.random.split(key)
        permutation = jax.random.permutation(key_perm, shuffled)
        minibatches = jax.tree.map(functools.partial(minibatches_of, permutation=permutation), batch)
        # The epoch's entropy noise in one draw: on CPU, jax lowers each random draw to a loop of 5 rounds, which
        # added about 140 thunks (65 of them copies) to every minibatch step. Unused, so compiled away, if discrete.
        noise = jax.random.normal(key_mb, minibatches.action.shape)
        (train_state, _), aux = jax.lax.scan(update_minibatch, (train_state, obs_stats), (minibatches, noise))
        return (train_state, obs_stats, batch), aux

    def update(runner: Runner) -> tuple[Runner, dict]:
        """One PPO update: num_unrolls unrolls of every env, then update_epochs epochs; metrics {name: scalar}."""
        rng, key_unrolls, key_epochs = jax.random.split(runner.rng, 3)
        runner, traj = jax.lax.scan(unroll, runner, jax.random.split(key_unrolls, args.num_unrolls))
        # [U, T(+1), E, ...] -> [T(+1), U·E, ...]: time first, then every env's every unroll
        batch = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape((x.shape[1], n_unrolls) + x.shape[3:]), traj)
        # As the authors' run_epoch: statistics updated with this batch before the epochs use them.
        obs_stats = update_running_stats(runner.obs_stats, batch.obs[:-1]) if obs_norm else runner.obs_stats
        batch = prepare(runner.train_state.params, batch, obs_stats)
        (train_state, _, _), aux = jax.lax.scan(
            update_epoch, (runner.train_state, obs_stats, batch), jax.random.split(key_epochs, args.update_epochs)
        )
        episodic_return = jnp.nanmean(runner.episodes.last_return)  # over the envs that finished an episode
        metrics = dict(zip(METRICS, (episodic_return, *jax.tree.map(jnp.mean, aux))))
        return runner._replace(train_state=train_state, obs_stats=obs_stats, rng=rng, update=runner.update + 1), metrics

    def train_chunk(runner: Runner, n):
        """n updates (n traced, at most n_chunk = max_chunk(args)) in one compiled loop; metrics {name: [n_chunk]},
        NaN past n. Raises ValueError for a concrete n outside [0, n_chunk], whose metrics would not fit."""
        if not isinstance(n, jax.core.Tracer) and not 0 <= int(n) <= n_chunk:
            raise ValueError(f"train_chunk: {int(n)} updates do not fit one chunk of at most {n_chunk} (max_chunk)")

        def body(i, carry):
            runner, buffers = carry
            runner, metrics = update(runner)
            return runner, {k: buffers[k].at[i].set(metrics[k]) for k in METRICS}

        return jax.lax.fori_loop(0, n, body, (runner, {k: jnp.full(n_chunk, jnp.nan) for k in METRICS}))

    return init, train_chunk


def max_chunk(args: Args) -> int:
    """Most updates in one compiled call: 5% of the run, so a killed run loses at most 5% of its updates."""
    return max(1, num_updates(args) // 20)


def seed_keys(args: Args):
    """(train keys [num_seeds, 2], evaluation keys [num_seeds, 2]) derived from --seed."""
    key_train, key_eval = jax.random.split(jax.random.PRNGKey(args.seed))
    return jax.random.split(key_train, args.num_seeds), jax.random.split(key_eval, args.num_seeds)


def seed_devices(num_seeds: int, num_cpu_devices: int | None = 1) -> int:
    """How many devices over_seeds shards num_seeds seeds over: the greatest common divisor of num_seeds and the
    devices it may use, on a CPU num_cpu_devices of JAX's (1 or None: one device, whatever the process has, so a
    seed's numbers do not depend on the machine), on accelerators all of JAX's."""
    cpu = jax.default_backend() == "cpu"
    return math.gcd(num_seeds, min(num_cpu_devices or 1, jax.device_count()) if cpu else jax.device_count())


def over_seeds(fn, num_seeds: int, seed_axes: tuple[int | None, ...], num_cpu_devices: int | None = 1):
    """jit of fn mapped over a leading seed axis (of the arguments whose seed_axes entry is 0, and of every output).

    One seed is not vmapped (the axis is dropped and restored; vmapped, its float rounding differs); several are
    vmapped and sharded over seed_devices(num_seeds, num_cpu_devices) devices.
    """
    if num_seeds == 1:

        def single(*xs):
            xs = [jax.tree.map(lambda x: x[0], x) if axis == 0 else x for x, axis in zip(xs, seed_axes)]
            return jax.tree.map(lambda y: y[None], fn(*xs))

        return jax.jit(single)
    mapped = jax.vmap(fn, in_axes=seed_axes)
    n = seed_devices(num_seeds, num_cpu_devices)
    if n == 1:
        return jax.jit(mapped)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("seed",))
    spec = jax.sharding.PartitionSpec
    in_specs = tuple(spec("seed") if axis == 0 else spec() for axis in seed_axes)
    return jax.jit(jax.shard_map(mapped, mesh=mesh, in_specs=in_specs, out_specs=spec("seed"), check_vma=False))


def init_seeds(init, keys) -> Runner:
    """Each seed's Runner, built one seed at a time (no batched QR, see make_train), stacked [num_seeds, ...]."""
    init = jax.jit(init)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *[init(key) for key in keys])


# ---- Evaluation.
def make_evaluate(args: Args):
    """evaluate(params, obs_stats, rng) -> mean unscaled return over args.num_eval_envs episodes.

    Each episode runs to its end or the time limit, with actions sampled from the policy (Brax's evaluator,
    deterministic_eval=False). Pure; jit and vmap it over seeds.
    """
    env = make_env(args)
    n = args.num_eval_envs
    actor = make_networks(args, env)[0]

    def evaluate(params, obs_stats, rng):
        rng, key_reset = jax.random.split(rng)
        obs, env_state = jax.vmap(env.reset)(jax.random.split(key_reset, n))

        def step(carry, key):
            obs, env_state, episode_return, alive = carry
            key_action, key_env = jax.random.split(key)
            pi = policy(actor, params, normalize(obs, obs_stats, args.normalize_observations), env.discrete)
            action = pi.sample(key_action)
            obs, env_state, reward, done, _ = jax.vmap(env.step)(
                jax.random.split(key_env, n), env_state, pi.env_action(action, env.action_low, env.action_high)
            )
            return (obs, env_state, episode_return + reward * alive, alive * (1.0 - done)), None

        init = (obs, env_state, jnp.zeros(n), jnp.ones(n))
        (_, _, episode_return, _), _ = jax.lax.scan(step, init, jax.random.split(rng, env.max_episode_steps))
        return episode_return.mean()

    return evaluate


def evaluate_seeds(args: Args, params, obs_stats) -> dict:
    """Each seed's policy evaluated with sampled actions (as Brax's evaluator): seed_statistics' final_return_*."""
    evaluate = over_seeds(make_evaluate(args), args.num_seeds, (0, 0, 0), args.num_cpu_devices)
    return seed_statistics(evaluate(params, obs_stats, seed_keys(args)[1]), "final_return")


# ---- The run: train chunk by chunk, logging and checkpointing between chunks, then evaluate.
def run_training(args: Args, drift: Drift | None = None) -> str:
    """Train all seeds chunk by chunk; write metrics rows and a checkpoint after every chunk, then the outputs.

    drift: any Drift to train with instead of --drift's, checked first (check_drift); summary.json names it by its
    __name__, and resuming such a run means calling run_training(args, drift) again with the same drift. Returns
    the run directory. Raises ArgsError for bad arguments (resolve_args) or an invalid drift.
    """
    args = resolve_args(args)
    name = args.drift if drift is None else getattr(drift, "__name__", "custom")
    if drift is not None:
        check_drift(drift)
    run_dir = (
        args.resume
        or args.run_dir
        or os.path.join("runs", f"{args.env_id}__{args.exp_name}__{name}__{args.seed}__{int(time.time())}")
    )
    refuse_occupied(run_dir, args)
    n_updates = num_updates(args)
    steps_per_update = batch_size(args) * args.action_repeat
    init, train_chunk = make_train(args, make_drift(args) if drift is None else drift)
    runners = init_seeds(init, seed_keys(args)[0])
    metrics_path = os.path.join(run_dir, "metrics.csv")
    checkpoint_path = os.path.join(run_dir, "checkpoint.msgpack")
    rows = []
    if args.resume:
        runners = load_tree(checkpoint_path, runners)
        with open(metrics_path) as f:
            rows = [[r[k] for k in FIELDS] for r in csv.DictReader(f)][: int(runners.update[0])]
    write_json(os.path.join(run_dir, "args.json"), dataclasses.asdict(args))
    with open(metrics_path, "w", newline="") as f:
        csv.writer(f).writerows([FIELDS] + rows)
    family = f"Brax {args.backend}" if args.env_id in BRAX_ENVS else "gymnax"
    devices = seed_devices(args.num_seeds, args.num_cpu_devices)
    print(
        f"{args.env_id} ({family}), drift {name}, {args.num_seeds} seed(s) on {devices} "
        f"{jax.default_backend()} device(s): {n_updates} updates of {steps_per_update:,} steps per seed",
        flush=True,
    )
    start = time.time()
    chunk_fn = (
        over_seeds(train_chunk, args.num_seeds, (0, None), args.num_cpu_devices).lower(runners, jnp.int32(1)).compile()
    )
    print(f"compiled in {time.time() - start:.0f}s", flush=True)
    updates_done = int(runners.update[0])
    chunk = 1
    while updates_done < n_updates:
        n = min(chunk, max_chunk(args), n_updates - updates_done)
        t0 = time.time()
        runners, metrics = jax.block_until_ready(chunk_fn(runners, jnp.int32(n)))
        seconds = time.time() - t0
        sps = n * steps_per_update * args.num_seeds / seconds
        metrics = {k: np.asarray(v)[:, :n] for k, v in metrics.items()}
        if not all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(runners.train_state.params)):
            last = f"{rows[-1][1]:.2f}" if rows else "none yet"
            kept = f"checkpoint.msgpack keeps update {updates_done}" if updates_done else "no checkpoint was written"
            raise ArgsError(
                f"the run diverged: non-finite parameters after update {updates_done + n} (last logged return "
                f"{last}); {kept}. A smaller --learning-rate may help"
            )
        with np.errstate(all="ignore"), warnings.catch_warnings():  # NaN returns before any episode ended
            warnings.simplefilter("ignore", RuntimeWarning)
            returns = metrics["episodic_return"]
            columns = [
                (updates_done + np.arange(1, n + 1)) * steps_per_update,
                np.nanmean(returns, 0),
                np.nanstd(returns, 0),
            ]
        columns += [metrics[k].mean(0) for k in LOSS_METRICS] + [np.full(n, sps)]
        new_rows = [list(row) for row in zip(*columns)]
        with open(metrics_path, "a", newline="") as f:
            csv.writer(f).writerows(new_rows)
        atomic_write(checkpoint_path, flax.serialization.to_bytes(runners))
        rows += new_rows
        updates_done += n
        eta = (n_updates - updates_done) * seconds / n / 60
        print(
            f"update {updates_done}/{n_updates}  step {updates_done * steps_per_update:,}  {sps:,.0f} steps/s  return "
            f"{rows[-1][1]:.2f} ± {rows[-1][2]:.2f}  ETA {eta:.1f} min",
            flush=True,
        )
        chunk = max(1, int(30.0 * n / seconds))  # the next chunk takes about 30 s
    params, obs_stats = runners.train_state.params, runners.obs_stats
    # every update's seconds from its logged speed: a resumed run's total counts the earlier sessions too
    train_seconds = float(np.sum(steps_per_update * args.num_seeds / np.array(rows, dtype=float)[:, -1]))
    atomic_write(os.path.join(run_dir, "params.msgpack"), flax.serialization.to_bytes((params, obs_stats)))
    summary = dict(
        env_id=args.env_id,
        drift=name,
        total_timesteps=n_updates * steps_per_update,
        num_seeds=args.num_seeds,
        num_eval_envs=args.num_eval_envs,
        **evaluate_seeds(args, params, obs_stats),
        train_seconds=train_seconds,
        sps=n_updates * steps_per_update * args.num_seeds / train_seconds,
        device=f"{devices} x {jax.devices()[0].device_kind}",
    )
    write_json(os.path.join(run_dir, "summary.json"), summary)
    steps, mean, std = np.array(rows, dtype=float).T[:3]  # std over seeds with ddof 0, as metrics.csv logs it
    sample_std = std * np.sqrt(args.num_seeds / max(args.num_seeds - 1, 1))
    plot_curves(
        os.path.join(run_dir, "learning_curve.png"),
        {"mean over seeds ± 1 sample std": (steps, mean, sample_std)},
        f"{args.env_id}, drift {name}, {args.num_seeds} seed(s)",
    )
    print(
        f"final return {summary['final_return_mean']:.2f} ± {summary['final_return_std']:.2f} (sampled actions, "
        f"{args.num_eval_envs} episodes per seed)"
    )
    return run_dir


# ---- LPO's outer loop: OpenAI-ES over the drift network, each member scored by whole inner training runs.
LPO_RANGES = (  # the ES flags' valid values (check_ranges); --sigma and --es-lr are checked by run_meta_training
    (("pop_size", "num_generations", "num_rollouts", "num_processes", "init_timeout"), lambda x: x >= 1, ">= 1"),
    (("validate_every", "process_id"), lambda x: x >= 0, "finite and >= 0"),
    (("es_beta1",), lambda x: 0 <= x < 1, "in [0, 1)"),
)


def make_es(args: Args, solution: list):
    """evosax OpenAI-ES over drift weights shaped as solution, set as the authors' evosax 0.0.4 OpenES defaults:
    antithetic sampling, Adam (β1 --es-beta1) on the mean, a learning rate and σ decaying per generation to a floor."""
    from evosax.algorithms import Open_ES
    from evosax.core.fitness_shaping import centered_rank_fitness_shaping_fn, standardize_fitness_shaping_fn

    lr = optax.exponential_decay(args.es_lr[0], 1, args.es_lr[1], end_value=args.es_lr[2])
    sigma = optax.exponential_decay(args.sigma[0], 1, args.sigma[1], end_value=args.sigma[2])
    shaping = {"z_score": standardize_fitness_shaping_fn, "centered_rank": centered_rank_fitness_shaping_fn}
    return Open_ES(
        population_size=args.pop_size,
        solution=solution,
        use_antithetic_sampling=True,
        optimizer=optax.adam(lr, b1=args.es_beta1),
        std_schedule=sigma,
        fitness_shaping_fn=shaping[args.fitness_shaping],
    )


def es_signal(per_run: np.ndarray) -> float:
    """The ES's signal-to-noise figure: the correlation over antithetic pairs of the differences F(θ+σε) - F(θ-σε) on
    the first and on the second half of the inner runs (independent seeds). About 0: the ES walks at random; 1: every
    difference replicates. per_run [pop_size, R], member i's twin at i + pop_size/2 (evosax). NaN for R < 2."""
    half = per_run.shape[1] // 2
    if half == 0:
        return float("nan")
    differences = per_run[: len(per_run) // 2] - per_run[len(per_run) // 2 :]
    first, second = differences[:, :half].mean(1), differences[:, half : 2 * half].mean(1)
    return float(np.corrcoef(first, second)[0, 1]) if min(first.std(), second.std()) > 0 else float("nan")


VALIDATION_STREAM = 2**31 - 1  # fold_in index of the validation seeds' key; generations use 0 .. num_generations - 1


def over_population(member: Callable, pop_size: int) -> Callable:
    """jit of fitness(nets [pop_size, ...], runners, keys) -> [pop_size, R], member(net, runners, keys) -> [R] for
    each net. Over D JAX devices (the largest number dividing pop_size; all of them over several processes, where
    run_meta_training refuses a population that does not divide) each device takes its pop/D members of the whole
    population, runs them and all-gathers the returns f32[pop_size, R], which is all it exchanges; the ES update then
    runs alike on every process (Salimans et al.'s shared seeds: ask draws the same population)."""
    mapped = jax.vmap(member, in_axes=(0, None, None))
    n = math.gcd(pop_size, jax.device_count())
    if n == 1:
        return jax.jit(mapped)
    per_device = pop_size // n

    def mine(nets, runners, keys):
        first = jax.lax.axis_index("pop") * per_device
        nets = jax.tree.map(lambda w: jax.lax.dynamic_slice_in_dim(w, first, per_device), nets)
        return jax.lax.all_gather(mapped(nets, runners, keys), "pop", tiled=True)

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("pop",))
    replicated = jax.sharding.PartitionSpec()
    return jax.jit(jax.shard_map(mine, mesh=mesh, in_specs=replicated, out_specs=replicated, check_vma=False))


def make_env_fitness(args: Args):
    """One meta-training env's compiled pieces, all on the same inner runs (common random numbers).

    Returns (init, fitness, validate, baselines): init(rng) -> Runner as make_train's;
        fitness(nets [pop_batch, ...], runners [R, ...], eval_keys [R, 2]) -> [pop_batch, R] each member's final
            return per run (Brax's evaluator: --num-eval-envs episodes, sampled actions), pop_batch = --pop-batch
            or --pop-size;
        validate(net, runners, eval_keys) -> [R] one drift's final returns (the ES mean's, on validation seeds);
        baselines(runners, eval_keys) -> (PPO's final returns [R], the untrained policy's returns [R]).
    """
    n_updates = num_updates(args)
    n_chunk = max_chunk(args)
    evaluate = make_evaluate(args)

    def final_return(drift, runner, key):
        train_chunk = make_train(args, drift)[1]

        def chunk(i, runner):
            return train_chunk(runner, jnp.minimum(n_chunk, n_updates - i * n_chunk))[0]

        runner = jax.lax.fori_loop(0, -(-n_updates // n_chunk), chunk, runner)
        return evaluate(runner.train_state.params, runner.obs_stats, key)

    def member(net, runners, keys):
        drift = functools.partial(lpo_drift, net, ppo_init=args.ppo_init, clip_coef=args.clip_coef)
        return jax.vmap(lambda r, k: final_return(drift, r, k))(runners, keys)

    def baselines(runners, keys):
        ppo = make_drift(dataclasses.replace(args, drift="ppo"))
        untrained = jax.vmap(lambda r, k: evaluate(r.train_state.params, r.obs_stats, k))
        return jax.vmap(lambda r, k: final_return(ppo, r, k))(runners, keys), untrained(runners, keys)

    fitness = over_population(member, args.pop_batch or args.pop_size)  # one slice of --pop-batch members
    return make_train(args, ppo_drift)[0], fitness, jax.jit(member), jax.jit(baselines)


def shape_within_env(returns: np.ndarray, shaping: str) -> np.ndarray:
    """One env's member returns [pop_size] as scores on a common scale, so that every env weighs the same in the
    average over --env-ids: z-scores (shaping "z_score"), or centered ranks in [-0.5, 0.5] (ties share their mean
    rank), which one collapsed run cannot dominate. Either keeps the members' order."""
    if shaping == "z_score":
        return (returns - returns.mean()) / (returns.std() + 1e-8)
    return (scipy.stats.rankdata(returns) - 1) / (len(returns) - 1) - 0.5


def validation_gain(means: np.ndarray, ppo_returns: list[np.ndarray]) -> float:
    """The ES mean's gain over PPO on the validation seeds, one number over several envs: each env's mean return
    (means [n_envs]) minus PPO's mean (ppo_returns: n_envs arrays [seeds]), in units of PPO's sample std over those
    seeds, averaged over envs, so that Pendulum's spread of hundreds does not outweigh CartPole's. For one env it
    orders generations as the raw difference does. best_drift.msgpack is the mean with the highest gain so far."""
    ppo_means = np.array([np.mean(r) for r in ppo_returns])
    ppo_stds = np.array([max(float(np.std(r, ddof=1)), 1e-6) for r in ppo_returns])  # 1e-6: PPO with no spread
    return float(np.mean((means - ppo_means) / ppo_stds))


def env_inner_args(args: Args, env_id: str) -> Args:
    """The resolved Args of env_id's inner runs in meta-training: the command's flags, then the --env-flags entries
    for env_id, then env_id's family defaults for what is still unset. Raises ArgsError for an entry that is not
    ENV:FLAG=VALUE with ENV a meta-training env and FLAG an inner-loop flag (INNER_FIELDS), or a bad value."""
    given = []
    for entry in args.env_flags:
        env, _, setting = entry.partition(":")
        flag, equals, value = setting.partition("=")
        field = flag.removeprefix("--").replace("-", "_")
        if not equals or env not in (args.env_ids or (args.env_id,)) or field not in INNER_FIELDS or "env_id" in field:
            raise ArgsError(
                f"--env-flags {entry}: expected ENV:FLAG=VALUE, ENV one of the meta-training envs and FLAG an "
                "inner-loop flag (learning-rate, total-timesteps, update-epochs, ...)"
            )
        if env == env_id:
            given += [f"--{field.replace('_', '-')}", *value.split()]
    try:
        return resolve_args(tyro.cli(Args, args=given, default=dataclasses.replace(args, env_id=env_id)))
    except SystemExit:  # tyro has printed what is wrong with the value
        raise ArgsError(f"--env-flags: a bad value for {env_id} ({' '.join(given)})") from None


def run_meta_training(args: Args) -> str:
    """ES over the drift network, one generation at a time; writes the run directory and an atomic checkpoint after
    every generation, so an interrupted run resumes (--resume) to exactly an uninterrupted run's numbers.

    A member's fitness is its agents' final return shaped over the population within each env (--fitness-shaping:
    z-scored, or centered ranks in [-0.5, 0.5], which a collapsed run cannot dominate), averaged over --env-ids and
    shaped once more by evosax (with one env, that changes nothing: the authors' z-scored return). PPO's and the
    untrained policy's returns on the same inner runs are logged beside the members' mean, to show where the
    population stands.
    """
    if args.num_generations is None:
        args = dataclasses.replace(args, num_generations=1025)  # the authors' script
    check_ranges(args, LPO_RANGES)
    for name in ("sigma", "es_lr"):
        start, factor, floor = getattr(args, name)
        if not (np.isfinite([start, factor, floor]).all() and start > 0 and floor > 0 and 0 < factor <= 1):
            raise ArgsError(
                f"--{name.replace('_', '-')} {getattr(args, name)}: its start and floor must be finite and > 0, its "
                "factor per generation in (0, 1]"
            )
    if args.pop_size < 2 or args.pop_size % 2:
        raise ArgsError(f"--pop-size {args.pop_size} must be even and positive (antithetic pairs)")
    batch = args.pop_batch or args.pop_size
    if batch <= 0 or args.pop_size % batch:
        raise ArgsError(f"--pop-batch {args.pop_batch} must be positive and divide --pop-size {args.pop_size}")
    if jax.process_count() > 1 and batch % jax.device_count():
        raise ArgsError(f"--pop-batch/--pop-size {batch} does not divide over the {jax.device_count()} JAX devices")
    if args.drift_hidden is not None and min(args.drift_hidden, default=1) <= 0:
        raise ArgsError(f"--drift-hidden {args.drift_hidden} needs positive layer sizes (none: the linear drift)")
    if args.drift_start == "hidden" and not args.ppo_init:
        raise ArgsError("--drift-start hidden is a start of LPO; LPO-Zero (--no-ppo-init) starts at a random network")
    if args.validate_every and args.num_validation_seeds < 2:
        raise ArgsError(
            f"--num-validation-seeds {args.num_validation_seeds} must be at least 2 (or --validate-every 0)"
        )
    env_ids = args.env_ids or (args.env_id,)
    name = f"{'+'.join(env_ids)}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = args.resume or args.run_dir or os.path.join("runs", name)
    refuse_occupied(run_dir, args)
    env_args = [env_inner_args(args, e) for e in env_ids]
    envs = [(a.env_id, *make_env_fitness(a)) for a in env_args]
    recorded = dict(dataclasses.asdict(env_args[0]), env_settings={a.env_id: dataclasses.asdict(a) for a in env_args})
    initial = init_drift_params(jax.random.PRNGKey(args.seed), args.ppo_init, args.drift_hidden, args.drift_start)
    es = make_es(args, initial)
    es_state = es.init(jax.random.PRNGKey(args.seed), initial, es.default_params)
    env_fields = [f"{e}_{k}" for e in env_ids for k in ("mean_return", "ppo_return", "untrained_return", "signal")]
    fields = ["generation", "sigma", "seconds", *env_fields, *(f"{e}_validation_return" for e in env_ids)]
    v = args.num_validation_seeds
    validation_keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(args.seed), VALIDATION_STREAM), 2 * v)
    validation_runners = [init_seeds(env[1], validation_keys[:v]) for env in envs] if args.validate_every else []
    ppo_validation = [np.asarray(e[4](r, validation_keys[v:])[0], float) for e, r in zip(envs, validation_runners)]
    checkpoint_path = os.path.join(run_dir, "es_checkpoint.msgpack")
    log_path = os.path.join(run_dir, "generations.csv")
    rows = []
    if args.resume:
        es_state = load_tree(checkpoint_path, es_state)
        with open(log_path) as f:
            rows = [[r[k] for k in fields] for r in csv.DictReader(f)][: int(es_state.generation_counter)]
    write_json(os.path.join(run_dir, "args.json"), dataclasses.asdict(args))
    steps = ", ".join(f"{num_updates(a) * batch_size(a):,}" for a in env_args)
    print(
        f"meta-training the {'LPO' if args.ppo_init else 'LPO-Zero'} drift on {', '.join(env_ids)}: population "
        f"{args.pop_size}, {args.num_rollouts} run(s) per env of {steps} steps",
        flush=True,
    )
    ask = jax.jit(es.ask)
    tell = jax.jit(es.tell)
    for g in range(len(rows), args.num_generations):
        t0 = time.time()
        sigma = float(es_state.std)
        key_ask, key_runs, key_tell = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(args.seed), g), 3)
        population, es_state = ask(key_ask, es_state, es.default_params)
        scores = []
        columns = []
        for i, (e, init, fitness, _, baselines) in enumerate(envs):
            keys = jax.random.split(jax.random.fold_in(key_runs, i), 2 * args.num_rollouts)
            runners = init_seeds(init, keys[: args.num_rollouts])
            per_run = []  # [pop, R], --pop-batch members at a time
            for first in range(0, args.pop_size, batch):
                nets = jax.tree.map(lambda w, first=first: w[first : first + batch], population)
                per_run.append(np.asarray(fitness(nets, runners, keys[args.num_rollouts :]), dtype=float))
                if batch < args.pop_size:
                    print(f"  {e}: members {first + batch}/{args.pop_size} trained", flush=True)
            per_run = np.concatenate(per_run)
            if not np.isfinite(per_run).any():
                raise ArgsError(
                    f"generation {g + 1}: no member's inner run on {e} ended with a finite return (the inner runs "
                    f"diverge); es_checkpoint.msgpack keeps generation {g}"
                )
            per_run = np.where(np.isfinite(per_run), per_run, np.min(per_run[np.isfinite(per_run)], initial=0.0))
            returns = per_run.mean(1)
            scores.append(shape_within_env(returns, args.fitness_shaping))
            ppo, untrained = baselines(runners, keys[args.num_rollouts :])
            columns += [returns.mean(), float(np.mean(ppo)), float(np.mean(untrained)), es_signal(per_run)]
        es_state, _ = tell(key_tell, population, -np.mean(scores, 0), es_state, es.default_params)  # evosax minimises
        mean = es.get_mean(es_state)
        if not all(bool(jnp.isfinite(w).all()) for w in jax.tree.leaves(mean)):
            raise ArgsError(
                f"generation {g + 1}: the ES mean became non-finite; es_checkpoint.msgpack keeps generation {g}"
            )
        validated = args.validate_every and (g + 1) % args.validate_every == 0
        for i, (_, _, _, validate, _) in enumerate(envs):
            columns.append(np.mean(validate(mean, validation_runners[i], validation_keys[v:])) if validated else "")
        rows.append([g + 1, sigma, time.time() - t0] + columns)
        table = io.StringIO()
        csv.writer(table).writerows([fields] + rows)
        atomic_write(log_path, table.getvalue().encode())
        # The drift files first (the mean; the best validated mean): a run killed before the checkpoint redoes this
        # generation and rewrites them all.
        gains = [validation_gain(np.array(r[-len(envs) :], dtype=float), ppo_validation) for r in rows if r[-1] != ""]
        for file in ("drift.msgpack", "best_drift.msgpack")[: 1 + bool(validated and gains[-1] == max(gains))]:
            save_drift(os.path.join(run_dir, file), mean, args.ppo_init, recorded)
        atomic_write(checkpoint_path, flax.serialization.to_bytes(es_state))
        progress = "".join(
            f"  {e} {c[0]:.1f} ({c[1]:.1f}) signal {c[3]:+.2f}"
            for e, c in zip(env_ids, np.reshape(columns[: 4 * len(envs)], (-1, 4)))
        )
        checked = ""
        if validated:
            differences = (f"{float(c) - np.mean(p):+.1f}" for c, p in zip(columns[-len(envs) :], ppo_validation))
            checked = f"  ES mean − PPO on validation seeds {' '.join(differences)}"
        print(
            f"generation {g + 1}/{args.num_generations}  σ {sigma:.4f}  {rows[-1][2]:.0f}s  members' return (PPO's):"
            f"{progress}{checked}  ETA {(args.num_generations - g - 1) * rows[-1][2] / 60:.0f} min",
            flush=True,
        )
    table = {k: np.array([float(r[j] or "nan") for r in rows]) for j, k in enumerate(fields)}
    for i, e in enumerate(env_ids):
        gen, checked = table["generation"], np.isfinite(table[f"{e}_validation_return"])
        curves = {
            "members' mean": (gen, table[f"{e}_mean_return"], 0 * gen),
            "PPO, same runs": (gen, table[f"{e}_ppo_return"], 0 * gen),
        }
        if args.validate_every:
            at = gen[checked]
            curves["ES mean, validation seeds"] = (at, table[f"{e}_validation_return"][checked], 0 * at)
            curves["PPO, validation seeds"] = (at, np.mean(ppo_validation[i]) + 0 * at, 0 * at)
        plot_curves(os.path.join(run_dir, f"fitness_{e}.png"), curves, e, "generation", "final return")
    return run_dir


# ---- Plumbing: run directories, resume, logs, plots, reports, launch. Nothing below changes a number.
def use_cpu_cores(args: Args) -> Args:
    """args with --num-cpu-devices set to the count that runs, after splitting the host CPU into that many devices.

    JAX gives a whole CPU one device and splits each operation over every core. With --num-cpu-devices N, over_seeds
    trains each device's share of the seeds on its own core, which can be faster (docs/dpo.md, item 14), but a
    seed's float rounding then differs from the default's. The default, 1, keeps JAX's one device, so the same
    command gives the same numbers on any core count (another CPU model can still round differently). JAX reads
    the setting when it starts: after its first operation (or with XLA_FLAGS' device count) the devices stay as
    they are, and the returned args name the count over_seeds may use, at most the devices there are; on an
    accelerator the CPU split has no effect and they name none.
    """
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        try:
            jax.config.update("jax_num_cpu_devices", args.num_cpu_devices or 1)
        except RuntimeError:  # JAX has already started in this process
            pass
    cpu = jax.default_backend() == "cpu"  # jax.devices("cpu") fails where JAX_PLATFORMS names accelerators only
    return dataclasses.replace(
        args, num_cpu_devices=min(args.num_cpu_devices or 1, jax.device_count()) if cpu else None
    )


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


def atomic_write(path: str, data: bytes):
    """Write bytes to path (its directory created) via a temporary file, fsync and a rename: neither a kill nor a
    power cut leaves half a file. Does nothing on processes other than 0 (lpo.py's multi-process meta-training)."""
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


def load_tree(path: str, template):
    """Restore a tree written with flax.serialization.to_bytes into template's structure and shapes. A finished run's
    policies reload from Python with load_tree(f"{run_dir}/params.msgpack", (t.train_state.params, t.obs_stats)), t
    = jax.eval_shape(jax.vmap(init), seed_keys(args)[0]), init from make_train and args from resumed_args.

    Raises ArgsError if the file is missing, damaged or of other shapes.
    """
    try:
        with open(path, "rb") as f:
            tree = flax.serialization.from_bytes(template, f.read())
        if [np.shape(x) for x in jax.tree.leaves(tree)] != [np.shape(x) for x in jax.tree.leaves(template)]:
            raise ValueError("shapes differ")
    except Exception as e:  # missing file, msgpack, key and shape errors all mean the same thing to the user
        raise ArgsError(f"{path} is missing, damaged or does not match args.json ({type(e).__name__})") from None
    return jax.tree.map(jnp.asarray, tree)


FIELDS = ("global_step", "episodic_return_mean", "episodic_return_std", *LOSS_METRICS, "sps")


METHOD_COLORS = {"PPO": "C0", "DPO": "C1", "LPO": "C2"}  # one colour per method in every figure, as in docs/


def plot_curves(
    path: str, curves: dict, title: str, xlabel: str = "environment steps (per seed)", ylabel: str = "episodic return"
):
    """PNG with one line and a shaded band per label: curves = {label: (x [n], y [n], band half-width [n])}; a
    method's label (METHOD_COLORS) keeps its colour whatever the order."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="tight")
    ax = fig.subplots()
    for label, (x, y, band) in curves.items():
        x, y, band = (np.asarray(v, dtype=float) for v in (x, y, band))
        line = ax.plot(x, y, label=label, color=METHOD_COLORS.get(label))[0]
        ax.fill_between(x, y - band, y + band, alpha=0.25, color=line.get_color())
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend()
    if jax.process_index() == 0:
        fig.savefig(path)


def run_comparison(args: Args) -> str:
    """Train each drift of --compare with the same seeds and flags, each into run_dir/<drift>/ (a finished run is
    kept and an interrupted one resumed when the command runs again with the same --run-dir); summary.json holds
    every drift's summary and learning_curves.png their curves (mean ± standard error over seeds)."""
    name = f"{args.env_id}__{args.exp_name}__compare__{args.seed}__{int(time.time())}"
    base = args.run_dir or os.path.join("runs", name)
    if os.path.exists(os.path.join(base, "args.json")):  # a single run's directory, not a comparison's
        refuse_occupied(base, args)
    summary = dict(env_id=args.env_id, drifts={})
    curves = {}
    for drift in args.compare:
        run_dir = os.path.join(base, drift)
        if not os.path.exists(os.path.join(run_dir, "summary.json")):
            resume = run_dir if os.path.exists(os.path.join(run_dir, "checkpoint.msgpack")) else None
            # this comparison's own subdirectory: resumed from its checkpoint, or restarted if it has none yet
            run_training(
                dataclasses.replace(args, drift=drift, compare=(), run_dir=run_dir, resume=resume, overwrite=True)
            )
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary["drifts"][drift] = json.load(f)
        steps, mean, std = np.loadtxt(os.path.join(run_dir, "metrics.csv"), delimiter=",", skiprows=1, ndmin=2).T[:3]
        curves[drift.upper()] = (steps, mean, std / np.sqrt(max(args.num_seeds - 1, 1)))  # std: ddof 0
    write_json(os.path.join(base, "summary.json"), summary)
    title = f"{args.env_id}, {args.num_seeds} seed(s)"
    plot_curves(os.path.join(base, "learning_curves.png"), curves, title, ylabel="episodic return (mean ± s.e.)")
    for drift, r in summary["drifts"].items():
        low, high = r["final_return_iqm_ci"]
        print(
            f"{drift.upper():4s} final return {r['final_return_mean']:.2f} ± {r['final_return_std']:.2f} (sample std), "
            f"IQM {r['final_return_iqm']:.2f} [{low:.2f}, {high:.2f}] (sampled actions)"
        )
    if len(args.compare) == 2 and args.num_seeds > 1:
        a, b = (summary["drifts"][d]["final_returns"] for d in args.compare)
        p = float(scipy.stats.ttest_ind(a, b, equal_var=False).pvalue)
        verdict = "different at p < 0.05" if p < 0.05 else f"no difference detected at n = {args.num_seeds}"
        print(f"Welch's t-test {args.compare[0].upper()} vs {args.compare[1].upper()}: p = {p:.3g} ({verdict})")
    return base


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
    does not know dropped), with resume and run_dir set to it. A dpo.py run keeps every other saved flag; lpo.py's
    meta-training takes this command's LAUNCH_FIELDS, and its --num-generations where given (to extend the run).

    Raises ArgsError if args.json is missing or damaged.
    """
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


# ---- LPO's files and start-up.
_NAMES = [f.name for f in dataclasses.fields(Args)]
INNER_FIELDS = ("num_eval_envs", "env_id", "backend", "episode_length", "action_repeat", "clip_coef")
INNER_FIELDS += (*_NAMES[_NAMES.index("ppo_loop") : _NAMES.index("activation") + 1], "env_ids")
"""the flags a drift file records, in this order: the inner runs' settings, their evaluation and the meta-training
envs"""


def save_drift(path: str, net: list, ppo_init: bool, settings: dict | None = None):
    """A drift file: the network's weights, its form (LPO or LPO-Zero) and the INNER_FIELDS of settings (the first
    meta-training env's resolved Args), and of each env's in settings["env_settings"] ({env_id: Args as a dict},
    if given), msgpack, written atomically."""
    settings = settings or {}
    inner = {k: settings[k] for k in INNER_FIELDS if k in settings}
    if "env_settings" in settings:
        inner["env_settings"] = {
            e: {k: s[k] for k in INNER_FIELDS if k in s} for e, s in settings["env_settings"].items()
        }
    inner = json.dumps(inner)
    state = {"net": {str(i): np.asarray(w) for i, w in enumerate(net)}, "ppo_init": ppo_init, "settings": inner}
    atomic_write(path, flax.serialization.msgpack_serialize(state))


def load_drift(path: str) -> tuple[list, bool, dict]:
    """(net, ppo_init, settings) from a drift file, or from a meta-training run directory's drift.msgpack (the ES
    mean); settings are the recorded inner-loop flags of the first meta-training env ({} in files written before they
    were recorded) and, in files written since 2026-12-07, settings["env_settings"]: every meta-training env's.

    Raises ArgsError if the file is missing, damaged or not a drift network's weights.
    """
    file = os.path.join(path, "drift.msgpack") if os.path.isdir(path) else str(path)
    try:
        with open(file, "rb") as f:
            state = flax.serialization.msgpack_restore(f.read())
        net = [jnp.asarray(state["net"][str(i)]) for i in range(len(state["net"]))]
        ppo_init = bool(state["ppo_init"])
        sizes = drift_layer_sizes(ppo_init, tuple(w.shape[0] for w in net[1:]))
        if [w.shape for w in net] != list(zip(sizes, sizes[1:])):
            raise ValueError("shapes differ")
        settings = json.loads(state.get("settings", "{}"))
        for recorded in [settings, *settings.get("env_settings", {}).values()]:
            recorded.update({k: tuple(v) for k, v in recorded.items() if isinstance(v, list)})  # JSON has no tuples
    except Exception as e:  # missing file, msgpack, key and shape errors all mean the same thing to the user
        raise ArgsError(f"drift {file} is missing or not a drift written by lpo.py ({type(e).__name__})") from None
    return net, ppo_init, settings


def eval_drift_args(args: Args) -> Args:
    """--eval-drift's Args: the drift file's recorded inner-run settings (INNER_FIELDS) for each flag this command
    leaves at its default: the first meta-training env's without --env-id, the named env's if it was a meta-training
    env, none (its family defaults) for another env; and the file's absolute path. Raises ArgsError if the file is
    missing or damaged, before any training."""
    settings = load_drift(args.eval_drift)[2]
    per_env = settings.pop("env_settings", {})
    if args.env_id != Args().env_id:  # --env-id given: its recorded settings, if the drift met it
        settings = per_env.get(args.env_id, settings if args.env_id == settings.get("env_id") else {})
    recorded = {k: v for k, v in settings.items() if getattr(args, k) == getattr(Args(), k)}  # given flags win
    return dataclasses.replace(args, **recorded, eval_drift=os.path.abspath(args.eval_drift))


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


LAUNCH_FIELDS = ("coordinator_address", "num_processes", "process_id", "init_timeout")
"""the flags a resumed run takes from its command, not from its args.json"""


def main(args: Args) -> str:
    """Run the command the flags describe (see Args); returns the run directory.

    A bad argument or file is one line on stderr and exit code 2 (tyro's code for its own usage errors).
    """
    try:
        if args.resume:
            args = resumed_args(args)
        start_processes(args)
        meta = (
            os.path.exists(os.path.join(args.resume, "es_checkpoint.msgpack")) if args.resume else not args.eval_drift
        )
        if jax.process_count() > 1 and not meta:
            raise ArgsError("several processes run the meta-training only; run the other commands as one process")
        if meta:  # each env's defaults are filled in per env
            run_dir = run_meta_training(args)
        else:
            if args.eval_drift:  # the transfer test: the learned drift and --compare's others on the same seeds
                args = eval_drift_args(args)
            args = use_cpu_cores(resolve_args(args))
            run_dir = run_comparison(args) if args.compare else run_training(args)
    except ArgsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"run directory: {run_dir}")
    return run_dir


if __name__ == "__main__":
    main(tyro.cli(Args))
