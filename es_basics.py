"""Evolution strategies written out from their equations, run beside evosax on test functions and policies, and
two systems built on them: Intelligent Trial and Error and POET.

From sampled fitnesses alone, CEM refits a Gaussian to the elite, CMA-ES adapts a full covariance and a step
size, OpenAI-ES follows the Monte-Carlo gradient (1/σ)·E[F(μ + σε)·ε], SNES follows the natural
gradient of a separable Gaussian, and MAP-Elites keeps the best solution per cell of a behaviour grid. Each
method is `init`, `ask` and `tell` with one signature (METHODS); evosax's strategies run behind the same three,
and every loop in this file takes one generation the same way (es_generation).
Intelligent Trial and Error (--algo ite) maps a planar arm with MAP-Elites and, after damage, picks which elite to
try next by Bayesian optimisation over the map; POET (--algo poet) grows a set of tracks of walls and gaps, each
paired with an agent that OpenAI-ES improves, admitting new tracks under a minimal criterion and moving agents
between pairs.

Sources: CMU 10-403 lecture on evolutionary methods; Salimans et al., "Evolution Strategies as a Scalable
Alternative to Reinforcement Learning", arXiv:1703.03864, and its code; Hansen, "The CMA Evolution Strategy:
A Tutorial", arXiv:1604.00772; Schaul et al., "High Dimensions and Heavy Tails for Natural Evolution
Strategies", GECCO 2011 (SNES); Mouret and Clune, "Illuminating search spaces by mapping elites",
arXiv:1504.04909; Cully, Clune, Tarapore, Mouret, "Robots that can adapt like animals", Nature 2015, arXiv:1407.3501;
Wang, Lehman, Clune, Stanley, "Paired Open-Ended Trailblazer (POET)", arXiv:1901.01753. Every problem returns a
fitness to MAXIMISE (mean return, or -f(x) for test functions); evosax minimises and is told -fitness. A NaN or
-inf fitness ranks last.

Example:
    python es_basics.py --algo cma-es --problem rosenbrock --num-dims 10 --num-generations 2000
    python es_basics.py --algo ite
"""

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import socket
import sys
import time
import types
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, get_args

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import tyro
from jax.flatten_util import ravel_pytree

WrittenOut = Literal["cem", "cma-es", "openai-es", "snes", "map-elites", "ite", "poet"]
EvosaxName = Literal["evosax:CMA_ES", "evosax:Sep_CMA_ES", "evosax:SNES", "evosax:xNES", "evosax:Open_ES"]
Algo = Literal[WrittenOut, EvosaxName]
ClassicControl = Literal["CartPole-v1", "Acrobot-v1", "MountainCar-v0", "Pendulum-v1", "MountainCarContinuous-v0"]
MinAtar = Literal["Breakout-MinAtar", "Asterix-MinAtar", "Freeway-MinAtar", "SpaceInvaders-MinAtar", "Seaquest-MinAtar"]
GymnaxEnvId = Literal[ClassicControl, MinAtar]  # dpo.py's gymnax envs, in its order (Brax envs: see dpo.py)
ProblemName = Literal["sphere", "rosenbrock", "rastrigin", GymnaxEnvId]
TEST_FUNCTIONS = get_args(ProblemName)[:3]


@dataclasses.dataclass
class Args:
    """es_basics.py's flags. The fields left None take the defaults of the method and the kind of problem
    (DEFAULTS); args.json records the values a run used."""

    exp_name: str = "es_basics"
    """name of this experiment, part of the run name"""
    seed: int = 1
    """seed: generation g draws everything from fold_in(PRNGKey(seed), g); a policy's initial weights too"""
    run_dir: str | None = None
    """where to write results; None: runs/{problem}__{algo}__{exp_name}__{seed}__{unix time}"""
    resume: str | None = None
    """continue the run in this run directory from its checkpoint (its args.json; --num-generations may extend it)"""
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

    # ---- problem ----
    problem: ProblemName = "sphere"
    """test function or gymnax env id (ite and poet bring their own: the arm, the track)"""
    num_dims: int | None = None
    """test functions: dimension of x (None: 10); policies: set by the network"""
    num_eval_episodes: int = 10
    """policies: episodes of the noiseless centre (mean policy, MAP-Elites' best elite) every generation"""
    hidden: tuple[int, ...] = (32, 32)
    """policies: hidden layer sizes of the deterministic tanh MLP"""
    normalize_observations: bool | None = None
    """policies: normalise observations by running statistics (None: on for openai-es, off otherwise)"""
    obs_stats_fraction: float = 0.01
    """policies: fraction of the population's episodes whose observations update the statistics (Salimans et al.)"""

    # ---- evolution strategy ----
    algo: Algo = "openai-es"
    """written-out method, or evosax:<Name> (run with its written-out twin's defaults)"""
    pop_size: int | None = None
    """population size per generation; must divide over the JAX devices"""
    num_generations: int | None = None
    """generations to run (CMA-ES may stop earlier on Hansen's termination criteria)"""
    sigma_init: float | None = None
    """initial noise scale σ (CEM and SNES: per coordinate; CMA-ES: step size; MAP-Elites: mutation std)"""
    sigma_decay: float | None = None
    """σ multiplier per generation (openai-es, evosax:Open_ES)"""
    sigma_limit: float | None = None
    """floor of the decayed σ"""
    learning_rate: float | None = None
    """Adam's step size α of the mean (openai-es, evosax:Open_ES)"""
    lr_decay: float | None = None
    """learning-rate multiplier per generation (openai-es, evosax:Open_ES)"""
    weight_decay: float | None = None
    """openai-es: L2 coefficient λ; Adam ascends g - λ·μ with g = (1/n) Σ rank_i ε_i"""
    elite_ratio: float | None = None
    """cem: elite fraction ρ, the top ⌊ρ·pop⌋ members refit the Gaussian"""
    cem_noise: float | None = None
    """cem: η added to the elite variance each generation, so σ never collapses"""
    num_bins: int | None = None
    """map-elites and ite: cells per descriptor axis (the grid has num_bins² cells)"""

    # ---- ite: a MAP-Elites map of the intact arm (--pop-size, --num-generations, --sigma-init), then trials ----
    ite_max_trials: int = 20
    """ite: trials on the damaged arm at most; also the budget of the two baselines"""
    ite_stop_fraction: float = 0.9
    """ite: stop once a trial reaches this fraction of the best predicted performance of the untried elites"""
    ite_length_scale: float = 0.15
    """ite: length scale ρ of the Matérn 5/2 kernel over hand positions (the arm is 1 long)"""

    # ---- poet: --num-generations iterations; each pair's ES_STEP is openai-es with its flags ----
    poet_mutate_every: int = 10
    """poet: N_mutate, iterations between environment mutations"""
    poet_transfer_every: int = 20
    """poet: N_transfer, iterations between transfer attempts"""
    poet_max_pairs: int = 6
    """poet: cap on active environment-agent pairs (the oldest is archived to make room)"""


# ---- The methods. Every state has `mean` [dim] (the centre) and `sigma` (scalar or [dim]). init(key, mean, args)
# -> state; ask(key, state, args) -> (population [pop, dim], state); tell(key, state, population, fitness [pop],
# descriptors [pop, 2], args) -> (state, stop), stop an int32 index of STOP_REASONS (0: go on). Member i's noise
# comes from fold_in(key, i) alone, so any device can rebuild any member: shared seeds (Salimans et al. Alg. 2).
STOP_REASONS = ("", "tolfun", "tolx", "condition", "sigma-underflow")
GO_ON = np.int32(0)


def all_noise(key: jax.Array, pop_size: int, num_dims: int) -> jax.Array:
    """Every member's ε ~ N(0, I), [pop_size, num_dims]; member i's from fold_in(key, i)."""
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (num_dims,)))(jnp.arange(pop_size))


def gaussian_ask(key: jax.Array, state, args: Args):
    """CEM and SNES: x_i = μ + σ ⊙ ε_i, ε_i ~ N(0, I), σ a scalar or [dim]. -> ([pop, dim], state)."""
    return state.mean + state.sigma * all_noise(key, args.pop_size, state.mean.shape[0]), state


def best_first(fitness: jax.Array) -> jax.Array:
    """Indices [n] sorting fitness [n] from best to worst; NaN and -inf come last (ties by index)."""
    return jnp.argsort(-jnp.where(jnp.isnan(fitness), -jnp.inf, fitness), stable=True)


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


def es_gradient(fitness: jax.Array, noise: jax.Array, sigma) -> jax.Array:
    """Score-function estimate of ∇_μ E[F(μ + σε)] = (1/σ)·E[F(μ + σε)·ε] (Salimans et al., eq. 2):
    g = 1/(nσ) · Σ_i F_i ε_i. fitness F [n], noise ε [n, dim], σ > 0 -> g [dim]."""
    return fitness @ noise / (fitness.shape[0] * sigma)


# ---- CEM: cross-entropy method with a diagonal Gaussian ----
class DiagonalGaussian(NamedTuple):
    """The search distribution of CEM and SNES: N(μ, diag σ²)."""

    mean: jax.Array  # μ [dim]
    sigma: jax.Array  # per-coordinate std [dim]


def diagonal_init(key, mean, args) -> DiagonalGaussian:
    """CEM and SNES start: μ = mean [dim], σ = --sigma-init in every coordinate."""
    return DiagonalGaussian(mean, jnp.full_like(mean, args.sigma_init))


def cem_tell(key, state: DiagonalGaussian, population, fitness, descriptors, args):
    """Refit the Gaussian to the elite (CMU 10-403; Szita & Lőrincz 2006 for the added noise η):
    E = the ⌊ρn⌋ fittest;  μ ← mean(E);  σ² ← var(E) + η."""
    elite = population[best_first(fitness)[: int(args.elite_ratio * args.pop_size)]]
    return DiagonalGaussian(elite.mean(0), jnp.sqrt(elite.var(0) + args.cem_noise)), GO_ON


# ---- CMA-ES: full covariance, evolution paths, cumulative step-size adaptation, termination ----
class CMAState(NamedTuple):
    """CMA-ES's state (Hansen's tutorial, Fig. 6): N(m, σ²C) and the two evolution paths."""

    mean: jax.Array  # m [n]
    sigma: jax.Array  # step size σ
    C: jax.Array  # covariance [n, n]
    p_sigma: jax.Array  # evolution path of σ [n]
    p_c: jax.Array  # evolution path of C [n]
    B: jax.Array  # eigenvectors of C [n, n] (columns)
    D: jax.Array  # square roots of C's eigenvalues [n]
    generation: jax.Array  # generations told so far
    best_history: jax.Array  # [history] best fitness of the latest generations (TolFun), newest first


# Hansen's tutorial (section B.3) stopping criteria, with its values: TolFun 1e-12, TolX 1e-12·σ₀, ConditionCov 1e14
TOL_FUN, TOL_X, MAX_CONDITION = 1e-12, 1e-12, 1e14


def cma_init(key, mean, args) -> CMAState:
    """m = mean [n], σ = --sigma-init, C = I, both paths 0 (tutorial, Fig. 6); no fitness history yet (NaN)."""
    n, sigma = mean.shape[0], jnp.asarray(args.sigma_init, jnp.float32)
    eye, zeros = jnp.eye(n), jnp.zeros(n)
    history = jnp.full(10 + math.ceil(30 * n / args.pop_size), jnp.nan)  # TolFun looks back 10 + ⌈30n/λ⌉
    return CMAState(mean, sigma, eye, zeros, zeros, eye, jnp.ones(n), jnp.array(0), history)


def cma_ask(key, state: CMAState, args):
    """x_i = m + σ·B·(D ⊙ z_i), z_i ~ N(0, I), so x_i ~ N(m, σ²C)  (tutorial eq. 38-40)."""
    y = (all_noise(key, args.pop_size, state.mean.shape[0]) * state.D) @ state.B.T  # y_i = B D z_i ~ N(0, C)
    return state.mean + state.sigma * y, state


def cma_tell(key, state: CMAState, population, fitness, descriptors, args):
    """One CMA-ES update with positive recombination weights (tutorial eq. 41-47), then the stop test:

        y_i = (x_{i:λ} - m)/σ (best first);  y_w = Σ_{i≤μ} w_i y_i;  m ← m + σ y_w
        p_σ ← (1-c_σ) p_σ + √(c_σ(2-c_σ)μ_eff) · C^{-1/2} y_w
        σ ← σ · exp((c_σ/d_σ)(‖p_σ‖/E‖N(0,I)‖ - 1))
        p_c ← (1-c_c) p_c + h_σ √(c_c(2-c_c)μ_eff) · y_w
        C ← (1 - c_1 - c_μ + c_1 δ(h_σ)) C + c_1 p_c p_cᵀ + c_μ Σ w_i y_i y_iᵀ;   C = B D² Bᵀ (one eigh)

    stop (section B.3): 1 tolfun, the range of the best fitness of the last 10 + ⌈30n/λ⌉ generations and of
    this generation's fitness < 1e-12; 2 tolx, σ·max(|p_c|, √diag C) < 1e-12·σ₀ in every coordinate;
    3 condition, cond(C) > 1e14; 4 sigma-underflow, m + 0.2σ√C_ii == m for some i (NoEffectCoord).
    """
    n, lam = state.mean.shape[0], args.pop_size  # Hansen's default strategy parameters (Table 1, eq. 49-58):
    mu = lam // 2  # parents
    w = np.log((lam + 1) / 2) - np.log(np.arange(1, mu + 1))
    w = (w / w.sum()).astype(np.float32)  # recombination weights, Σw = 1
    mu_eff = 1.0 / float(np.sum(w**2))
    c_sigma = (mu_eff + 2) / (n + mu_eff + 5)  # cumulation for σ's path
    d_sigma = 1 + 2 * max(0.0, math.sqrt((mu_eff - 1) / (n + 1)) - 1) + c_sigma  # damping of σ
    c_c = (4 + mu_eff / n) / (n + 4 + 2 * mu_eff / n)  # cumulation for the rank-one path
    c_1 = 2 / ((n + 1.3) ** 2 + mu_eff)  # rank-one learning rate
    c_mu = min(1 - c_1, 2 * (mu_eff - 2 + 1 / mu_eff) / ((n + 2) ** 2 + mu_eff))  # rank-μ learning rate
    chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n**2))  # E‖N(0, I)‖
    y = (population[best_first(fitness)[:mu]] - state.mean) / state.sigma  # best μ steps, [μ, n]
    y_w = w @ y  # weighted recombination of the steps
    mean = state.mean + state.sigma * y_w
    c_inv_sqrt_y_w = state.B @ ((state.B.T @ y_w) / state.D)  # C^{-1/2} y_w
    p_sigma = (1 - c_sigma) * state.p_sigma + math.sqrt(c_sigma * (2 - c_sigma) * mu_eff) * c_inv_sqrt_y_w
    norm_p_sigma = jnp.linalg.norm(p_sigma)
    sigma = state.sigma * jnp.exp((c_sigma / d_sigma) * (norm_p_sigma / chi_n - 1))  # longer path: larger σ
    # h_σ stalls the rank-one path while ‖p_σ‖ is large (σ is growing), so C does not grow along with σ
    h_sigma = (
        norm_p_sigma / jnp.sqrt(1 - (1 - c_sigma) ** (2 * (state.generation + 1))) < (1.4 + 2 / (n + 1)) * chi_n
    ).astype(jnp.float32)
    p_c = (1 - c_c) * state.p_c + h_sigma * math.sqrt(c_c * (2 - c_c) * mu_eff) * y_w
    delta_h = (1 - h_sigma) * c_c * (2 - c_c)
    rank_mu = (w[:, None] * y).T @ y  # Σ w_i y_i y_iᵀ
    C = (1 - c_1 - c_mu + c_1 * delta_h) * state.C + c_1 * jnp.outer(p_c, p_c) + c_mu * rank_mu
    C = (C + C.T) / 2  # keep it exactly symmetric
    eigenvalues, B = jnp.linalg.eigh(C)  # one matrix per run, never vmapped: a batched LAPACK call can hang jaxlib
    D = jnp.sqrt(jnp.maximum(eigenvalues, 1e-20))
    history = jnp.roll(state.best_history, 1).at[0].set(fitness[best_first(fitness)[0]])
    recent = jnp.concatenate([history, fitness])
    stops = jnp.array(
        [
            (state.generation + 1 >= history.shape[0]) & (jnp.max(recent) - jnp.min(recent) < TOL_FUN),
            jnp.all(sigma * jnp.maximum(jnp.abs(p_c), jnp.sqrt(jnp.diag(C))) < TOL_X * args.sigma_init),
            jnp.max(D) ** 2 > MAX_CONDITION * jnp.min(D) ** 2,
            jnp.any(mean + 0.2 * sigma * jnp.sqrt(jnp.diag(C)) == mean) | ~jnp.isfinite(sigma),
        ]
    )
    stop = jnp.where(stops.any(), jnp.argmax(stops) + 1, 0).astype(jnp.int32)
    return CMAState(mean, sigma, C, p_sigma, p_c, B, D, state.generation + 1, history), stop


# ---- OpenAI-ES (Salimans et al. 2017 and their code): antithetic pairs, centered ranks, Adam, weight decay ----
class GradientESState(NamedTuple):
    """OpenAI-ES: N(μ, σ²I) moved by Adam along an estimated gradient."""

    mean: jax.Array  # μ [dim]
    sigma: jax.Array  # σ
    learning_rate: jax.Array  # α
    adam_m: jax.Array  # first moment [dim]
    adam_v: jax.Array  # second moment [dim]
    step: jax.Array  # Adam steps taken


def gradient_es_init(key, mean, args) -> GradientESState:
    """μ = mean [dim], σ = --sigma-init, α = --learning-rate, Adam's moments 0."""
    sigma, learning_rate = jnp.asarray(args.sigma_init, jnp.float32), jnp.asarray(args.learning_rate, jnp.float32)
    return GradientESState(mean, sigma, learning_rate, jnp.zeros_like(mean), jnp.zeros_like(mean), jnp.array(0))


def antithetic_noise(key: jax.Array, pop_size: int, num_dims: int) -> jax.Array:
    """[ε_1..ε_{n/2}, -ε_1..-ε_{n/2}] [pop_size, num_dims]: members i and i + n/2 are a mirrored pair."""
    half = all_noise(key, pop_size // 2, num_dims)
    return jnp.concatenate([half, -half])


def openai_es_ask(key, state: GradientESState, args):
    """x_i = μ ± σ ε_i in antithetic pairs."""
    return state.mean + state.sigma * antithetic_noise(key, args.pop_size, state.mean.shape[0]), state


def openai_es_tell(key, state: GradientESState, population, fitness, descriptors, args):
    """The reference code's step (es_distributed/es.py): g = (1/n) Σ rank(F_i) ε_i - λμ, with no 1/σ, so that
    λ acts on the same scale as there; then an Adam ascent step on g:

        m ← β₁m + (1-β₁)g;  v ← β₂v + (1-β₂)g²;  μ ← μ + α·m̂/(√v̂ + ε)   (β = 0.9, 0.999; ε = 1e-8)
    """
    noise = (population - state.mean) / state.sigma
    g = es_gradient(centered_ranks(fitness), noise, 1.0) - args.weight_decay * state.mean  # σ = 1: no 1/σ
    step = state.step + 1
    m = 0.9 * state.adam_m + 0.1 * g
    v = 0.999 * state.adam_v + 0.001 * g**2
    m_hat, v_hat = m / (1 - 0.9**step), v / (1 - 0.999**step)  # bias correction
    mean = state.mean + state.learning_rate * m_hat / (jnp.sqrt(v_hat) + 1e-8)
    sigma = jnp.maximum(state.sigma * args.sigma_decay, args.sigma_limit)
    return GradientESState(mean, sigma, state.learning_rate * args.lr_decay, m, v, step), GO_ON


# ---- SNES: separable natural evolution strategy (Schaul, Glasmachers, Schmidhuber 2011) ----
SNES_MIN_SIGMA = 1e-30  # float32 keeps σ finite and non-zero; x - μ has lost every digit long before


def snes_utilities(pop_size: int) -> jax.Array:
    """u_i = max(0, ln(λ/2 + 1) - ln i) / Σ_j max(0, ln(λ/2 + 1) - ln j) - 1/λ for rank i = 1 (best)..λ. [λ]"""
    u = np.maximum(0.0, np.log(pop_size / 2 + 1) - np.log(np.arange(1, pop_size + 1)))
    return jnp.asarray(u / u.sum() - 1 / pop_size, jnp.float32)


def snes_tell(key, state: DiagonalGaussian, population, fitness, descriptors, args):
    """Natural-gradient step of the mean and of the per-coordinate σ, fitness replaced by rank utilities:

    ∇_μ = Σ u_i z_i;  ∇_σ = Σ u_i (z_i² - 1)
    μ ← μ + η_μ σ ⊙ ∇_μ  (η_μ = 1);   σ ← σ ⊙ exp(η_σ/2 · ∇_σ),  η_σ = (3 + ln d)/(5√d)
    """
    d = state.mean.shape[0]
    u = jnp.zeros(args.pop_size).at[best_first(fitness)].set(snes_utilities(args.pop_size))
    z = (population - state.mean) / state.sigma
    eta_sigma = (3 + math.log(d)) / (5 * math.sqrt(d))
    mean = state.mean + state.sigma * (u @ z)
    sigma = jnp.maximum(state.sigma * jnp.exp(eta_sigma / 2 * (u @ (z**2 - 1))), SNES_MIN_SIGMA)
    return DiagonalGaussian(mean, sigma), GO_ON


# ---- MAP-Elites: the best solution per cell of a behaviour grid ----
class MapElitesState(NamedTuple):
    """MAP-Elites' archive of num_bins² cells (Mouret and Clune, Algorithm 1), and the mutation std."""

    fitness: jax.Array  # [num_cells], -inf where empty
    solutions: jax.Array  # [num_cells, dim]
    mean: jax.Array  # [dim]: the best elite (the initial mean while the grid is empty)
    sigma: jax.Array  # mutation std


def map_elites_init(key, mean, args) -> MapElitesState:
    """An empty archive (fitness -inf everywhere); mean [dim] is the parent while no cell is filled."""
    cells = args.num_bins**2
    return MapElitesState(
        jnp.full(cells, -jnp.inf), jnp.zeros((cells, mean.shape[0])), mean, jnp.asarray(args.sigma_init, jnp.float32)
    )


def map_elites_cell(descriptor: jax.Array, bounds, num_bins: int) -> jax.Array:
    """Index of the grid cell [0, num_bins²) of descriptors [..., 2], each axis cut into num_bins equal bins."""
    low, high = jnp.array([b[0] for b in bounds]), jnp.array([b[1] for b in bounds])
    bins = jnp.clip(jnp.floor((descriptor - low) / (high - low) * num_bins), 0, num_bins - 1).astype(jnp.int32)
    return bins[..., 0] * num_bins + bins[..., 1]


def map_elites_ask(key, state: MapElitesState, args):
    """x_i = x_parent + σ ε_i, the parent a uniformly chosen filled cell (the initial mean while none is)."""
    filled = jnp.isfinite(state.fitness)

    def member(i):
        key_parent, key_noise = jax.random.split(jax.random.fold_in(key, i))
        cell = jax.random.choice(key_parent, filled.shape[0], p=filled / jnp.maximum(filled.sum(), 1))
        parent = jnp.where(filled.any(), state.solutions[cell], state.mean)
        return parent + state.sigma * jax.random.normal(key_noise, parent.shape)

    return jax.vmap(member)(jnp.arange(args.pop_size)), state


def map_elites_tell(key, state: MapElitesState, population, fitness, descriptors, args):
    """Locate each member's cell and keep it where it beats the cell's elite (the first of equals in a batch).
    An elite keeps the fitness of the one evaluation that placed it: on noisy problems the archive's values
    are biased upwards (the winner's curse), which is why the loop re-evaluates the best elite every generation."""
    num_cells, n = state.fitness.shape[0], fitness.shape[0]
    fitness = jnp.where(jnp.isnan(fitness), -jnp.inf, fitness)
    cells = map_elites_cell(descriptors, descriptor_bounds(args), args.num_bins)
    best = jax.ops.segment_max(fitness, cells, num_cells)  # best new fitness per cell (-inf: none)
    winner = jax.ops.segment_min(jnp.where(fitness >= best[cells], jnp.arange(n), n), cells, num_cells)
    improved = best > state.fitness
    solutions = jnp.where(improved[:, None], population[jnp.clip(winner, 0, n - 1)], state.solutions)
    archive = jnp.where(improved, best, state.fitness)
    mean = jnp.where(jnp.isfinite(archive).any(), solutions[jnp.argmax(archive)], state.mean)
    return MapElitesState(archive, solutions, mean, state.sigma), GO_ON


# ---- evosax 0.3.2 strategies behind the same three functions ----
class EvosaxState(NamedTuple):
    """An evosax strategy's own state, with its mean and std exposed as every method's `mean` and `sigma`."""

    inner: Any  # evosax's own state
    mean: jax.Array  # [dim]
    sigma: jax.Array  # evosax's std (scalar or [dim])


def evosax_strategy(args: Args, num_dims: int):
    """(strategy, params) for --algo evosax:<Name>, with the written-out twin's hyperparameters where evosax has
    them: std_init = --sigma-init; Open_ES: Adam(--learning-rate decayed by --lr-decay) and σ decayed by
    --sigma-decay to --sigma-limit (one generation later than openai-es), no weight decay, and a gradient with
    1/σ (Adam divides it by its running RMS). The others keep their own learning rates."""
    import optax
    from evosax.algorithms import algorithms

    name, kwargs = args.algo[7:], {}
    if name == "Open_ES":
        kwargs = dict(
            optimizer=optax.adam(optax.exponential_decay(args.learning_rate, 1, args.lr_decay)),
            std_schedule=optax.exponential_decay(args.sigma_init, 1, args.sigma_decay, end_value=args.sigma_limit),
        )
    es = algorithms[name](population_size=args.pop_size, solution=jnp.zeros(num_dims), **kwargs)
    params = es.default_params  # Open_ES has no parameters: its σ comes from the schedule
    return es, params if name == "Open_ES" else params.replace(std_init=jnp.asarray(args.sigma_init, jnp.float32))


def evosax_init(key, mean, args) -> EvosaxState:
    """evosax's init at mean [dim] (evosax_strategy's settings)."""
    es, params = evosax_strategy(args, mean.shape[0])
    inner = es.init(key, mean, params)
    return EvosaxState(inner, inner.mean, jnp.asarray(inner.std, jnp.float32))


def evosax_ask(key, state: EvosaxState, args):
    """evosax's ask: (population [pop, dim], state)."""
    es, params = evosax_strategy(args, state.mean.shape[0])
    population, inner = es.ask(key, state.inner, params)
    return population, state._replace(inner=inner)


def evosax_tell(key, state: EvosaxState, population, fitness, descriptors, args):
    """evosax's tell with -fitness (evosax minimises); it never asks to stop."""
    es, params = evosax_strategy(args, state.mean.shape[0])
    inner = es.tell(key, population, -fitness, state.inner, params)[0]  # evosax minimises
    return EvosaxState(inner, inner.mean, jnp.asarray(inner.std, jnp.float32)), GO_ON


METHODS = {  # algo: (init, ask, tell)
    "cem": (diagonal_init, gaussian_ask, cem_tell),
    "cma-es": (cma_init, cma_ask, cma_tell),
    "openai-es": (gradient_es_init, openai_es_ask, openai_es_tell),
    "snes": (diagonal_init, gaussian_ask, snes_tell),
    "map-elites": (map_elites_init, map_elites_ask, map_elites_tell),
    "evosax": (evosax_init, evosax_ask, evosax_tell),
}  # ite builds its map with map-elites' three; each POET pair steps with openai-es' ask and tell


def es_generation(algo: str, state, key_ask, key_tell, evaluate: Callable, args: Args):
    """One generation of a method, the step every loop in this file takes (Salimans et al. Algorithm 1): ask for
    a population [pop, dim], evaluate it, tell the method the fitnesses. evaluate(population) -> (fitness [pop],
    descriptors [pop, 2] or None, anything else the caller needs). Returns (state, stop code, fitness, that else)."""
    _, ask, tell = METHODS[algo.split(":")[0]]
    population, state = ask(key_ask, state, args)
    fitness, descriptors, other = evaluate(population)
    state, stop = tell(key_tell, state, population, fitness, descriptors, args)
    return state, stop, fitness, other


# ---- Intelligent Trial and Error (Cully, Clune, Tarapore, Mouret, Nature 2015): M-BOA over a MAP-Elites map ----
ITE_NOISE = 1e-3  # σ²_noise of the GP, as in the paper's hexapod experiments (the arm here is deterministic)
ITE_KAPPA = 0.3  # exploration weight κ of the upper confidence bound μ + κσ (the recode's; the hexapod's 0.05)


def matern52(a: jax.Array, b: jax.Array, length_scale: float) -> jax.Array:
    """Matérn 5/2 kernel [n, m] between points a [n, d] and b [m, d], k(x, x) = 1 (Cully et al., Methods):
    k = (1 + √5 r/ρ + 5r²/(3ρ²)) exp(-√5 r/ρ), r = ‖a - b‖."""
    s = jnp.sqrt(jnp.sum((a[:, None] - b[None]) ** 2, -1)) * math.sqrt(5) / length_scale
    return (1 + s + s**2 / 3) * jnp.exp(-s)


def gp_posterior(points, prior, observed, residuals, mask, length_scale: float, noise: float = ITE_NOISE):
    """Posterior mean [n] and variance [n] at points [n, d] of a GP whose prior mean is `prior` [n] (the map's
    predictions), after observations at `observed` [t, d] of residuals y - prior [t]; slots with mask False are
    ignored (they get an identity row, so the solve is exact for the others). M-BOA (Cully et al., Methods):
        μ(x) = P(x) + kᵀ K⁻¹ (y - P(X)),   σ²(x) = k(x, x) - kᵀ K⁻¹ k,   K = k(X, X) + σ²_noise I."""
    both = mask[:, None] & mask[None, :]
    K = jnp.where(
        both, matern52(observed, observed, length_scale) + noise * jnp.eye(mask.shape[0]), jnp.eye(mask.shape[0])
    )
    k = matern52(points, observed, length_scale) * mask  # [n, t]
    mean = prior + k @ jnp.linalg.solve(K, jnp.where(mask, residuals, 0.0))
    return mean, jnp.maximum(1.0 - jnp.sum(k * jnp.linalg.solve(K, k.T).T, 1), 0.0)


def ite_adapt(behaviours, prior, real, args: Args, use_gp: bool = True):
    """The trials on the damaged robot. behaviours [cells, 2] of the map's elites, prior [cells] their predicted
    performance (-inf where the map is empty), real [cells] what each elite scores on the damaged robot (an
    entry is read only when that elite is tried). Each trial runs the untried elite of highest μ + κσ, the GP
    takes its result, and the loop stops once the best trial reaches --ite-stop-fraction of the highest μ among
    the untried elites, or after --ite-max-trials. use_gp False is the baseline that tries the elites in order of
    their prior (μ = prior, σ = 0) under the same stopping rule.
    Returns (tried [T] cell indices, -1 where unused; their performances [T], -inf where unused)."""
    cells, trials = prior.shape[0], args.ite_max_trials

    def trial(carry, t):
        tried, perf, done = carry
        mask = tried >= 0
        if use_gp:
            mean, var = gp_posterior(
                behaviours, prior, behaviours[tried], perf - prior[tried], mask, args.ite_length_scale
            )
        else:
            mean, var = prior, jnp.zeros(cells)
        untried = jnp.isfinite(prior) & ~jnp.zeros(cells + 1, bool).at[jnp.where(mask, tried, cells)].set(True)[:-1]
        best_predicted = jnp.max(jnp.where(untried, mean, -jnp.inf))
        done = done | (mask.any() & (jnp.max(perf) >= args.ite_stop_fraction * best_predicted)) | ~untried.any()
        pick = jnp.argmax(jnp.where(untried, mean + ITE_KAPPA * jnp.sqrt(var), -jnp.inf))
        tried, perf = tried.at[t].set(jnp.where(done, -1, pick)), perf.at[t].set(jnp.where(done, -jnp.inf, real[pick]))
        return (tried, perf, done), None

    start = (jnp.full(trials, -1), jnp.full(trials, -jnp.inf), jnp.array(False))
    return jax.lax.scan(trial, start, jnp.arange(trials))[0][:2]


# ---- POET (Wang, Lehman, Clune, Stanley 2019): the rules between the pairs' ES steps ----
def minimal_criterion(scores: jax.Array, low: float, high: float) -> jax.Array:
    """POET's minimal criterion: a child environment is kept only if the score of its parent's agent in it lies in
    [low, high], neither too hard nor already solved. scores [n] -> bool [n]."""
    return (scores >= low) & (scores <= high)


def transfer_choice(resident: jax.Array, candidates: jax.Array, allowed: jax.Array):
    """POET's transfer rule for one pair: the best allowed candidate (another pair's agent, directly or after one
    ES step in this environment) replaces the resident agent only if it scores strictly higher.
    resident [] score, candidates [c] scores, allowed bool [c] -> (replace bool, index of the best candidate)."""
    scores = jnp.where(allowed, candidates, -jnp.inf)
    best = jnp.argmax(scores)
    return scores[best] > resident, best


def novelty(candidates: np.ndarray, archive: np.ndarray, k: int = 5) -> np.ndarray:
    """Novelty of environments [n, 2]: mean distance to the k nearest of every environment created so far [m, 2]."""
    distances = np.sort(np.linalg.norm(candidates[:, None] - archive[None], axis=-1), axis=1)
    return distances[:, :k].mean(1)


# ---- Problems. Every problem maps a flat parameter vector x [num_dims] to a fitness to MAXIMISE. ----
FUNCTIONS = {  # fitness F(x) = -f(x) of x [n], optimum 0
    "sphere": lambda x: -jnp.sum(x**2),  # at x = 0
    "rosenbrock": lambda x: -jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2),  # at x = 1, n ≥ 2
    "rastrigin": lambda x: -(10.0 * x.shape[0] + jnp.sum(x**2 - 10.0 * jnp.cos(2.0 * jnp.pi * x))),  # at x = 0
}
# Starting mean x₀ = c·1 of the search, and the domain [low, high] that bounds MAP-Elites' descriptor (x₀, x₁).
FUNCTION_START = {"sphere": 3.0, "rosenbrock": 0.0, "rastrigin": 3.0}
FUNCTION_DOMAIN = {"sphere": (-5.12, 5.12), "rosenbrock": (-2.048, 2.048), "rastrigin": (-5.12, 5.12)}


class ObsStats(NamedTuple):
    """Observation statistics as sums, initialised like Salimans et al.'s RunningStat (eps = 1e-2)."""

    total: jax.Array  # Σo [obs_dim]
    total_sq: jax.Array  # Σo² [obs_dim]
    count: jax.Array  # number of observations, scalar


def normalize_obs(obs: jax.Array, stats: ObsStats, enabled: bool) -> jax.Array:
    """clip((o - mean)/std, ±5), std = √max(Σo²/n - mean², 1e-2) (the reference's floor); identity if not enabled."""
    if not enabled:
        return obs
    mean = stats.total / stats.count
    std = jnp.sqrt(jnp.maximum(stats.total_sq / stats.count - mean**2, 1e-2))
    return jnp.clip((obs - mean) / std, -5.0, 5.0)


# ---- Environments: dpo.py's gymnax interface, for a single environment (vmap for many).
#   reset(key) -> (obs, state);  step(key, state, action) -> (obs, state, reward, done, truncated)
# step resets an ended episode; an episode here ends at its first done (make_policy_problem masks the rest).
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
        """-> (obs [obs_dim], state)."""
        obs, state = self.env.reset(key, self.params)
        return obs.reshape(-1).astype(jnp.float32), state

    def step(self, key, state, action):
        """-> (obs [obs_dim], state, reward, done, truncated), the last three float32 scalars."""
        obs, state, reward, terminated, truncated, _ = self.env.step(key, state, action, self.params)
        done = jnp.logical_or(terminated, truncated).astype(jnp.float32)
        truncated = jnp.logical_and(truncated, jnp.logical_not(terminated)).astype(jnp.float32)
        return obs.reshape(-1).astype(jnp.float32), state, jnp.squeeze(reward).astype(jnp.float32), done, truncated


def init_policy(key: jax.Array, obs_dim: int, hidden: tuple[int, ...], action_dim: int) -> list:
    """Weights of the deterministic MLP: a list of (w [in, out], b [out]); w ~ N(0, 1/in), b = 0."""
    sizes = (obs_dim,) + tuple(hidden) + (action_dim,)
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (jax.random.normal(k, (n_in, n_out)) / jnp.sqrt(n_in), jnp.zeros(n_out))
        for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:])
    ]


def policy_action(params: list, obs: jax.Array, env) -> jax.Array:
    """The policy's action for obs [obs_dim]: argmax of the outputs (discrete) or tanh scaled to the bounds."""
    h = obs
    for w, b in params[:-1]:
        h = jnp.tanh(h @ w + b)
    out = h @ params[-1][0] + params[-1][1]
    if env.discrete:
        return jnp.argmax(out)
    return env.action_low + (jnp.tanh(out) + 1.0) * 0.5 * (env.action_high - env.action_low)


class Episode(NamedTuple):
    """What one episode of a policy returns; the sums run over the steps before the episode ended."""

    ret: jax.Array  # scalar, undiscounted return
    last_obs: jax.Array  # [obs_dim], the last observation the policy acted on
    obs_sum: jax.Array  # [obs_dim], raw observations
    obs_sq_sum: jax.Array  # [obs_dim]
    steps: jax.Array  # scalar


# Behaviour descriptors for MAP-Elites: fn(episode) -> [2], and the range of each axis (values are clipped).
# CartPole-v1 (obs: x, ẋ, θ, θ̇): where the cart ended, and the mean pole angle, in the ranges the episode
# terminates at (|x| ≤ 2.4, |θ| ≤ 12° ≈ 0.2095 rad).
DESCRIPTORS = {
    "CartPole-v1": (
        lambda ep: jnp.stack([ep.last_obs[0], ep.obs_sum[2] / jnp.maximum(ep.steps, 1.0)]),
        ((-2.4, 2.4), (-0.2095, 0.2095)),
    ),
}


def descriptor_bounds(args: Args):
    """((low₀, high₀), (low₁, high₁)) of the problem's behaviour descriptor."""
    if args.problem in TEST_FUNCTIONS or args.problem == "arm":  # "arm": ite's map of hand positions
        return (FUNCTION_DOMAIN.get(args.problem, (-1.0, 1.0)),) * 2
    return DESCRIPTORS[args.problem][1]


class Problem(NamedTuple):
    """A problem as the generation loop sees it (see make_problem)."""

    num_dims: int
    init_mean: jax.Array  # [num_dims], the search's starting mean
    # evaluate(x [num_dims], key, obs_stats) -> (fitness, descriptor [2], (Σo [obs_dim], Σo² [obs_dim], steps))
    evaluate: Callable
    evaluate_center: Callable  # (x, key, obs_stats) -> fitness of x on --num-eval-episodes new episodes
    obs_dim: int  # 1 for test functions (statistics unused)


def make_policy_problem(args: Args) -> Problem:
    """Policy search: x is the flattened MLP; fitness = the return of one episode, run to its end or the time
    limit. Members evaluated with the same key share their episodes' reset and step keys
    (common random numbers). The starting mean is init_policy(PRNGKey(seed)), flattened."""
    env = GymnaxEnv(args.problem)
    init_mean, unravel = ravel_pytree(
        init_policy(jax.random.PRNGKey(args.seed), env.obs_dim, args.hidden, env.action_dim)
    )
    descriptor_fn = DESCRIPTORS.get(args.problem, (lambda ep: jnp.zeros(2), None))[0]

    def episode(x, key, obs_stats) -> Episode:
        params = unravel(x)
        key_reset, key_steps = jax.random.split(key)
        obs, state = env.reset(key_reset)

        def step(carry, key):
            obs, state, alive, ep = carry
            action = policy_action(params, normalize_obs(obs, obs_stats, args.normalize_observations), env)
            next_obs, state, reward, done, _ = env.step(key, state, action)
            ep = Episode(
                ep.ret + alive * reward,
                jnp.where(alive > 0, obs, ep.last_obs),
                ep.obs_sum + alive * obs,
                ep.obs_sq_sum + alive * obs**2,
                ep.steps + alive,
            )
            return (next_obs, state, alive * (1.0 - done), ep), None

        zeros = jnp.zeros(env.obs_dim)
        start = Episode(jnp.zeros(()), zeros, zeros, zeros, jnp.zeros(()))
        keys = jax.random.split(key_steps, env.max_episode_steps)
        return jax.lax.scan(step, (obs, state, jnp.ones(()), start), keys)[0][3]

    def episodes(x, key, obs_stats, n):
        return jax.vmap(episode, in_axes=(None, 0, None))(x, jax.random.split(key, n), obs_stats)

    def evaluate(x, key, obs_stats):
        eps = episodes(x, key, obs_stats, 1)
        return (
            eps.ret.mean(),
            jax.vmap(descriptor_fn)(eps).mean(0),
            (eps.obs_sum.sum(0), eps.obs_sq_sum.sum(0), eps.steps.sum()),
        )

    def evaluate_center(x, key, obs_stats):
        return episodes(x, key, obs_stats, args.num_eval_episodes).ret.mean()

    return Problem(int(init_mean.shape[0]), init_mean, evaluate, evaluate_center, env.obs_dim)


def make_problem(args: Args) -> Problem:
    """The problem named by args.problem (resolved args). A test function: fitness -f(x), descriptor (x₀, x₁)
    clipped to the function's domain, starting mean FUNCTION_START·1."""
    if args.problem not in TEST_FUNCTIONS:
        return make_policy_problem(args)
    f, (low, high), n = FUNCTIONS[args.problem], FUNCTION_DOMAIN[args.problem], args.num_dims
    no_obs = (jnp.zeros(1), jnp.zeros(1), jnp.zeros(()))

    def evaluate(x, key, obs_stats):
        return f(x), (jnp.clip(x[:2], low, high) if n >= 2 else jnp.zeros(2)), no_obs

    return Problem(n, jnp.full(n, FUNCTION_START[args.problem]), evaluate, lambda x, key, obs_stats: f(x), 1)


# ITE's robot: Cully et al.'s planar arm, 8 joints of ±90° and links of 1/8 (Extended Data Fig. 7), hand at (1, 0)
# when straight. A controller x [8] is a posture, angles (π/2)·clip(x, ±1); its behaviour is where the hand ends;
# the map's own performance is -var(angles) (smooth postures), a reach's is 1 - ‖hand - target‖ (the paper's
# -distance, shifted so that ITE's 90% rule stops within 0.1 + 0.9·(the best predicted distance)). The damages are
# the paper's 14: a joint stuck at 45°, a joint offset by 45°, or one of each (joints counted from the base).
ARM_JOINTS, ARM_TARGET = 8, (0.5, 0.5)
ARM_DAMAGES = (  # (stuck, offset): one stuck, one offset, 2 stuck and one offset, one stuck and 2 offset
    [((j,), ()) for j in (5, 4, 3, 2)]
    + [((), (j,)) for j in (5, 4, 3, 2)]
    + [((2,), (j,)) for j in (5, 4, 3)]
    + [((j,), (2,)) for j in (5, 4, 3)]
)


def arm_hand(x: jax.Array, stuck=None, offset=None) -> jax.Array:
    """Hand position [2] of posture x [8]; stuck [8] bool joints held at 45°, offset [8] bool joints turned 45° more."""
    angles = jnp.pi / 2 * jnp.clip(x, -1.0, 1.0)
    if stuck is not None:
        angles = jnp.where(stuck, jnp.pi / 4, angles) + jnp.pi / 4 * offset
    heading = jnp.cumsum(angles)  # each link's direction
    return jnp.stack([jnp.cos(heading).sum(), jnp.sin(heading).sum()]) / x.shape[0]


def reach(hand: jax.Array, target: jax.Array) -> jax.Array:
    """Reach performance 1 - ‖hand - target‖ (≤ 1; the arm is 1 long) of hand positions [..., 2]."""
    return 1.0 - jnp.linalg.norm(hand - target, axis=-1)


def arm_problem() -> Problem:
    """The intact arm for MAP-Elites: fitness -var(angles), descriptor the hand position in [-1, 1]²."""

    def evaluate(x, key, obs_stats):
        return -jnp.var(jnp.pi / 2 * jnp.clip(x, -1, 1)), arm_hand(x), (jnp.zeros(1), jnp.zeros(1), jnp.zeros(()))

    return Problem(ARM_JOINTS, jnp.zeros(ARM_JOINTS), evaluate, lambda x, key, obs_stats: evaluate(x, key, None)[0], 1)


# POET's environment family, pure JAX: a runner on a 10 m track with a gap at 1 m, a wall at 4.5 m, a gap at 6.5 m and
# a wall at 9.3 m. An environment e ∈ [0, 1]² sets both walls to 0.8·e₀ m high and both gaps to 2.2·e₁ m wide;
# e = (0, 0) is a flat track. The agent sets its speed in [0, 3] m/s and jumps (4 m/s
# up, only from the ground; 0.82 m high at most); a run ends when the runner passes a wall below its top or falls
# into a gap, at the end of the track, or after 10 s.
TRACK_END, WALLS, GAPS, WALL_MAX, GAP_MAX = 10.0, (4.5, 9.3), (1.0, 6.5), 0.8, 2.2
RUN_STEPS, DT, MAX_SPEED, JUMP_SPEED, GRAVITY = 200, 0.05, 3.0, 4.0, 9.81
RUNNER = types.SimpleNamespace(discrete=False, action_low=-1.0, action_high=1.0, obs_dim=7, action_dim=2)


def run_track(params: list, env: jax.Array) -> jax.Array:
    """Score in [0, 1] (distance covered / 10 m; 1 = reached the end) of a policy on environment env [2].
    Observations [7]: height, vertical speed, distance to the next wall and to the next gap (each /3 m, clipped),
    that wall's height (/0.8 m) and that gap's width (/2.2 m), distance covered / 10 m.
    Actions [2]: speed 1.5·(a₀ + 1) m/s, jump if a₁ > 0."""
    height, width = jnp.full(2, WALL_MAX * env[0]), jnp.full(2, GAP_MAX * env[1])
    walls, gaps = jnp.array(WALLS), jnp.array(GAPS)

    def over_gap(x):
        return jnp.any((x >= gaps) & (x < gaps + width))

    def step(carry, _):
        x, y, vy, alive = carry
        wall, gap = jnp.sum(walls < x), jnp.sum(gaps + width < x)  # the next wall's and gap's index (2: none)
        to_wall, to_gap = jnp.append(walls, x + 3)[wall] - x, jnp.append(gaps, x + 3)[gap] - x  # to_gap < 0 over one
        obs = jnp.stack(
            [
                y,
                vy / JUMP_SPEED,
                jnp.minimum(to_wall, 3.0) / 3,
                jnp.clip(to_gap, -1.5, 3.0) / 3,
                jnp.append(height, 0.0)[wall] / WALL_MAX,
                jnp.append(width, 0.0)[gap] / GAP_MAX,
                x / TRACK_END,
            ]
        )
        action = policy_action(params, obs, RUNNER)
        grounded = (y <= 0) & ~over_gap(x)
        vy = jnp.where(grounded, JUMP_SPEED * (action[1] > 0), vy - GRAVITY * DT)
        new_x, new_y = x + MAX_SPEED * (action[0] + 1) / 2 * DT, y + vy * DT
        new_y = jnp.where(over_gap(new_x), new_y, jnp.maximum(new_y, 0.0))  # lands unless over a gap
        crashed = jnp.any((x < walls) & (new_x >= walls) & (new_y < height))
        alive = alive & ~crashed & ~(over_gap(new_x) & (new_y < 0)) & (x < TRACK_END)
        return (jnp.where(alive, new_x, x), new_y, vy, alive), None

    x = jax.lax.scan(step, (jnp.zeros(()), jnp.zeros(()), jnp.zeros(()), jnp.array(True)), None, RUN_STEPS)[0][0]
    return jnp.minimum(x, TRACK_END) / TRACK_END


# ---- Defaults for the None fields: DEFAULTS[kind of problem][method]; pop_size None: 4 + ⌊3 ln n⌋ (Hansen; Schaul)
ON_FUNCTIONS, ON_POLICIES = dict(pop_size=50, num_generations=1000), dict(pop_size=64, num_generations=50)
ES_ON_FUNCTIONS = dict(ON_FUNCTIONS, sigma_decay=0.99, sigma_limit=1e-3, learning_rate=0.1, lr_decay=0.99)
ES_ON_POLICIES = dict(ON_POLICIES, sigma_init=0.1, sigma_decay=1.0, sigma_limit=0.01, learning_rate=0.03, lr_decay=1.0)
DEFAULTS = {
    "function": {
        "cem": dict(ON_FUNCTIONS, sigma_init=2.0, elite_ratio=0.2, cem_noise=1e-4),
        "cma-es": dict(pop_size=None, num_generations=2000, sigma_init=1.0),
        "openai-es": dict(ES_ON_FUNCTIONS, sigma_init=0.2, weight_decay=0.0),
        "snes": dict(pop_size=None, num_generations=2000, sigma_init=1.0),
        "map-elites": dict(ON_FUNCTIONS, sigma_init=0.3),
    },
    "policy": {
        "cem": dict(ON_POLICIES, sigma_init=0.5, elite_ratio=0.2, cem_noise=1e-3),
        "cma-es": dict(ON_POLICIES, sigma_init=0.5),
        "openai-es": dict(ES_ON_POLICIES, weight_decay=0.005),
        "snes": dict(ON_POLICIES, sigma_init=0.1),
        "map-elites": dict(ON_POLICIES, sigma_init=0.1),
    },
}
DEFAULTS["own"] = {  # the methods that bring their own problem: the planar arm (ite) and the track family (poet)
    "ite": dict(pop_size=256, num_generations=1000, sigma_init=0.1, num_bins=64),
    "poet": dict(DEFAULTS["policy"]["openai-es"], num_generations=800),
}
EVOSAX_TWIN = {"CMA_ES": "cma-es", "Sep_CMA_ES": "cma-es", "SNES": "snes", "xNES": "snes", "Open_ES": "openai-es"}


RANGES = (  # every numeric flag's valid values (a tuple flag: each entry), checked by resolve_args; None: unset
    (("seed", "process_id", "weight_decay", "cem_noise"), lambda x: x >= 0, ">= 0"),
    (("obs_stats_fraction", "elite_ratio", "ite_stop_fraction"), lambda x: 0 < x <= 1, "in (0, 1]"),
    (("poet_max_pairs",), lambda x: x >= 2, ">= 2 (transfers need another pair)"),
    (
        ("num_dims", "pop_size", "num_generations", "num_eval_episodes", "hidden", "num_bins", "num_processes")
        + ("init_timeout", "sigma_init", "sigma_decay", "sigma_limit", "learning_rate", "lr_decay", "ite_max_trials")
        + ("ite_length_scale", "poet_mutate_every", "poet_transfer_every"),
        lambda x: x > 0,
        "> 0",
    ),
)


class ArgsError(ValueError):
    """A user's mistake in the arguments or files: main prints it as one line and exits with code 2 (as tyro)."""


def resolve_args(args: Args) -> Args:
    """Fill the None fields with the defaults of this method and problem, and check what tyro cannot.

    Raises:
        ArgsError: a number outside its range (RANGES); a population too small for CEM's elite fraction or
            CMA-ES's parents, odd where antithetic pairs need it, or not dividing over the devices;
            MAP-Elites on a problem without a behaviour descriptor.
    """
    kind = "own" if args.algo in DEFAULTS["own"] else "function" if args.problem in TEST_FUNCTIONS else "policy"
    on_function = kind == "function"
    twin = EVOSAX_TWIN.get(args.algo[7:], args.algo)  # evosax:<Name> takes its written-out twin's defaults
    filled = {k: v for k, v in dict(dict(num_bins=20), **DEFAULTS[kind][twin]).items() if getattr(args, k) is None}
    if on_function and args.num_dims is None:
        filled["num_dims"] = 10
    if args.normalize_observations is None:
        filled["normalize_observations"] = twin == "openai-es" and not on_function
    args = dataclasses.replace(args, **filled)
    for names, valid, text in RANGES:  # pop_size is still None for CMA-ES and SNES on functions
        for name in names:
            value = getattr(args, name)
            entries = value if isinstance(value, tuple) else () if value is None else (value,)
            if not all(math.isfinite(v) and valid(v) for v in entries):
                raise ArgsError(f"--{name.replace('_', '-')} {value} must be finite and {text}")
    if args.pop_size is None:  # CMA-ES and SNES on a test function: 4 + ⌊3 ln n⌋
        args = dataclasses.replace(args, pop_size=4 + int(3 * math.log(args.num_dims)))
    if args.algo == "cem" and int(args.elite_ratio * args.pop_size) < 2:
        raise ArgsError(
            f"--pop-size {args.pop_size} with --elite-ratio {args.elite_ratio} leaves "
            f"{int(args.elite_ratio * args.pop_size)} elites; CEM needs 2 to pop_size to fit a variance"
        )
    if twin in ("cma-es", "snes") and args.pop_size < 4:
        raise ArgsError(f"--pop-size {args.pop_size} is too small for {args.algo} (at least 4: 2 parents)")
    if twin in ("openai-es", "poet") and args.pop_size % 2:
        raise ArgsError(f"--pop-size must be even for antithetic sampling ({args.algo}), got {args.pop_size}")
    if args.algo == "map-elites":
        if on_function and args.num_dims < 2:
            raise ArgsError("map-elites on a test function needs --num-dims ≥ 2 (the descriptor is (x₀, x₁))")
        if not on_function and args.problem not in DESCRIPTORS:
            raise ArgsError(
                f"map-elites has no behaviour descriptor for {args.problem!r}; valid: "
                f"{', '.join(TEST_FUNCTIONS + tuple(DESCRIPTORS))}"
            )
    if args.pop_size % jax.device_count():
        raise ArgsError(f"--pop-size {args.pop_size} does not divide over the {jax.device_count()} JAX devices")
    return args


# ---- The generation loop, distributed over devices with shared seeds (Salimans et al. Algorithm 2). ----
class LoopState(NamedTuple):
    """What the generation loop carries from one generation to the next (replicated on every device)."""

    es: Any  # the method's state
    obs_stats: ObsStats  # observation statistics
    stop: jax.Array  # int32: 0 while running, else the STOP_REASONS index the method returned (state then frozen)


class GenerationOutput(NamedTuple):
    """What one generation reports (stacked over generations: a leading [T] axis)."""

    fitness: jax.Array  # [pop], this generation's members
    center_fitness: jax.Array  # the centre after the update (policies: new episodes; MAP-Elites: best elite)
    elite_fitness: jax.Array  # MAP-Elites: the best elite's archived fitness (NaN for the other methods)
    sigma: jax.Array  # mean σ the members were drawn with
    archive_cells: jax.Array  # MAP-Elites: filled cells after the update (-1 for the other methods)
    stop: jax.Array  # LoopState.stop after this generation


def generation_keys(seed: int, first: int, count: int) -> jax.Array:
    """Keys of generations first..first+count-1 [count, 2]; generation g's is fold_in(PRNGKey(seed), g)."""
    return jax.vmap(lambda g: jax.random.fold_in(jax.random.PRNGKey(seed), g))(jnp.arange(first, first + count))


def init_loop_state(args: Args, problem: Problem) -> LoopState:
    """The method's initial state at problem.init_mean; observation statistics as the reference's RunningStat
    starts them (mean 0, variance 1: sums 0, 1e-2, count 1e-2)."""
    es = METHODS[args.algo.split(":")[0]][0](jax.random.PRNGKey(args.seed), problem.init_mean, args)
    d = problem.obs_dim
    return LoopState(es, ObsStats(jnp.zeros(d), jnp.full(d, 1e-2), jnp.array(1e-2)), jnp.int32(0))


def make_generations(args: Args, problem: Problem) -> Callable:
    """generations(loop_state, keys [T, 2]) -> (loop_state, GenerationOutput stacked over T): T generations in
    one compiled lax.scan. Over D > 1 devices (jax.shard_map on a 1-D mesh) every device holds the whole state,
    rebuilds the whole population from the generation key, evaluates its own pop/D members (with the same episode
    keys as every other member), all-gathers the pop fitnesses (MAP-Elites: and descriptors; with observation
    normalisation: each member's Σo, Σo², steps), which is all it exchanges, and applies the identical update.
    Once the method returned a stop code, the state stays as it was."""
    devices = jax.devices()
    num_devices, per_device = len(devices), args.pop_size // len(devices)
    evaluate = jax.vmap(problem.evaluate, in_axes=(0, None, None))
    is_map_elites = args.algo == "map-elites"

    def gather(x):  # every device's members, in member order (gathered, not summed: every device adds up alike)
        return jax.lax.all_gather(x, "devices", tiled=True) if num_devices > 1 else x

    def generation(loop: LoopState, key):
        key_ask, key_eval, key_tell, key_center, key_stats = jax.random.split(key, 5)

        def evaluate_mine(population):  # every device asked for all members; it evaluates its own
            first = jax.lax.axis_index("devices") * per_device if num_devices > 1 else 0
            mine = jax.lax.dynamic_slice_in_dim(population, first, per_device)
            fitness, descriptors, obs_sums = evaluate(mine, key_eval, loop.obs_stats)
            if is_map_elites:
                descriptors = gather(descriptors)
            if args.normalize_observations:
                obs_sums = gather(obs_sums)
            return gather(fitness), descriptors, obs_sums

        new_es, stop, fitness, obs_sums = es_generation(args.algo, loop.es, key_ask, key_tell, evaluate_mine, args)
        running = loop.stop == 0
        new_es = jax.tree.map(lambda new, old: jnp.where(running, new, old), new_es, loop.es)
        obs_stats = loop.obs_stats
        if args.normalize_observations:  # Salimans et al.'s code: from a random fraction of the members' episodes
            chosen = (jax.random.uniform(key_stats, (args.pop_size,)) < args.obs_stats_fraction) & running
            obs_stats = ObsStats(*(s + chosen.astype(jnp.float32) @ b for s, b in zip(obs_stats, obs_sums)))
        center_fitness = problem.evaluate_center(new_es.mean, key_center, obs_stats)
        out = GenerationOutput(
            fitness,
            center_fitness,
            new_es.fitness.max() if is_map_elites else jnp.float32(jnp.nan),
            jnp.mean(loop.es.sigma),
            jnp.isfinite(new_es.fitness).sum() if is_map_elites else jnp.int32(-1),
            jnp.where(running, stop, loop.stop),
        )
        return LoopState(new_es, obs_stats, out.stop), out

    def generations(loop: LoopState, keys):
        return jax.lax.scan(generation, loop, keys)

    if num_devices == 1:
        return jax.jit(generations)
    mesh = jax.sharding.Mesh(np.array(devices), ("devices",))
    replicated = jax.sharding.PartitionSpec()
    return jax.jit(
        jax.shard_map(generations, mesh=mesh, in_specs=(replicated, replicated), out_specs=replicated, check_vma=False)
    )


def run_generations(
    args: Args,
    problem: Problem,
    on_chunk: Callable | None = None,
    chunk: int | None = None,
    checkpoint: str | None = None,
    resume: bool = False,
) -> tuple[LoopState, GenerationOutput]:
    """Run resolved args for --num-generations, `chunk` per compiled call (default: 1 on policies, 100 on
    the rest) between progress reports, ending early after the generation whose update returned a stop code.
    Returns the final loop state and every generation's output (numpy, stacked over the generations run);
    on_chunk(first_generation, outputs, restored) after each call (restored: outputs read from the checkpoint).

    With a checkpoint path, the loop state and the outputs so far are saved there every 2% of the run; with
    resume, a run that finds the file continues from it: generation g's key depends on (seed, g) alone and the
    chunks end where an uninterrupted run's do, so the numbers are an uninterrupted run's. The restored outputs
    are reported first, as one chunk. Raises ArgsError if the checkpoint is damaged or from other settings, or at
    a generation in which no member's fitness is finite or σ is not."""
    generations = make_generations(args, problem)
    loop = init_loop_state(args, problem)
    outputs = []
    if resume and os.path.exists(checkpoint):
        loop, restored = read_checkpoint(checkpoint, lambda saved: restore_loop(saved, loop))
        outputs.append(restored)
        if on_chunk is not None:
            on_chunk(0, restored, True)
    generations_done = sum(len(out.stop) for out in outputs)
    stopped = bool(outputs) and bool(outputs[-1].stop[-1])
    every = max(1, args.num_generations // 50) if checkpoint else args.num_generations
    while generations_done < args.num_generations and not stopped:
        count = min(
            chunk or (1 if args.problem in get_args(GymnaxEnvId) else 100),
            every - generations_done % every,
            args.num_generations - generations_done,
        )
        loop, out = generations(loop, generation_keys(args.seed, generations_done, count))
        out = jax.tree.map(np.asarray, out)
        diverged = np.flatnonzero(~np.isfinite(out.fitness).any(axis=1) | ~np.isfinite(out.sigma))
        if diverged.size:  # a single non-finite member only ranks last; a whole generation of them stops the run
            raise ArgsError(
                f"generation {generations_done + int(diverged[0]) + 1}: no member's fitness is finite, or σ is not "
                "(the run diverges); the last checkpoint is kept"
            )
        stops = np.flatnonzero(out.stop)
        stopped = bool(stops.size)
        if stopped:  # keep the generations up to and including the one that stopped
            out = jax.tree.map(lambda a, kept=int(stops[0]) + 1: a[:kept], out)
        outputs.append(out)
        generations_done += len(out.stop)
        if checkpoint is not None and (generations_done % every == 0 or stopped):
            outputs = [jax.tree.map(lambda *a: np.concatenate(a), *outputs)]
            write_checkpoint(checkpoint, dict(loop=jax.tree.map(np.asarray, loop), outputs=outputs[0]))
        if on_chunk is not None:
            on_chunk(generations_done - len(out.stop), out, False)
    return loop, jax.tree.map(lambda *a: np.concatenate(a), *outputs)


# ---- ITE's trials after damage and its baseline ----
def es_from_scratch(score: Callable, x0: jax.Array, args: Args, budget: int) -> np.ndarray:
    """The baseline ES from scratch: the written-out CMA-ES (λ = 4 + ⌊3 ln n⌋, σ₀ = 0.5) from x0 [n] on score(x [n]),
    generation g keyed as the generation loop's, run op by op (compiled, eigh may return B with other signs, and so
    other samples of the same distribution). Returns the best fitness after each of the first `budget` trials
    [budget]."""
    es_args = dataclasses.replace(args, algo="cma-es", pop_size=4 + int(3 * math.log(x0.shape[0])), sigma_init=0.5)
    state, trials = cma_init(None, x0, es_args), []

    def evaluate(population):
        return jax.vmap(score)(population), None, None

    for key in generation_keys(args.seed, 0, -(-budget // es_args.pop_size)):
        state, _, fitness, _ = es_generation("cma-es", state, key, key, evaluate, es_args)
        trials += np.asarray(fitness).tolist()
    return np.maximum.accumulate(trials[:budget])


def ite_damages(args: Args, archive: MapElitesState) -> tuple[jax.Array, jax.Array, list[dict]]:
    """ITE's adaptation step (Cully et al., Methods) with the map `archive` of the intact arm: on each of the 14
    ARM_DAMAGES, ITE, the elites in order of prediction, and CMA-ES from scratch try to reach ARM_TARGET in at most
    --ite-max-trials trials. Returns (behaviours [cells, 2], prior [cells] the predicted reach, -inf where empty,
    one row per damage: its joints, trials and best reach of each, and the best reach of any elite of the map)."""
    filled, postures, target = jnp.isfinite(archive.fitness), archive.solutions, jnp.array(ARM_TARGET)
    behaviours = jnp.where(filled[:, None], jax.vmap(arm_hand)(postures), 0.0)
    prior = jnp.where(filled, reach(behaviours, target), -jnp.inf)
    adapt = {gp: jax.jit(lambda b, p, r, gp=gp: ite_adapt(b, p, r, args, gp)) for gp in (True, False)}
    rows = []
    for stuck, offset in ARM_DAMAGES:
        damage = (
            jnp.zeros(ARM_JOINTS, bool).at[jnp.array(stuck, int)].set(True),
            jnp.zeros(ARM_JOINTS).at[jnp.array(offset, int)].set(1.0),
        )

        def damaged(x, damage=damage):
            return reach(arm_hand(x, *damage), target)

        real = jnp.where(filled, jax.vmap(damaged)(postures), -jnp.inf)
        row = dict(stuck=" ".join(map(str, stuck)), offset=" ".join(map(str, offset)))
        for name, gp in (("ite", True), ("ordered", False)):
            tried, perf = adapt[gp](behaviours, prior, real)
            row[f"{name}_trials"], row[f"{name}_best"] = int((tried >= 0).sum()), float(perf.max())
        es = es_from_scratch(damaged, jnp.zeros(ARM_JOINTS), args, args.ite_max_trials)
        row.update(
            es_trials=args.ite_max_trials,
            es_best=float(es[-1]),
            es_at_ite_trials_best=float(es[max(row["ite_trials"], 1) - 1]),
            best_in_map_best=float(real.max()),
        )  # the last: trying every elite
        rows.append(row)
        print(", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    return behaviours, prior, rows


# ---- POET's loop (Wang et al. 2019; the lecture's Algorithm 2) on the track family ----
POET_ADMITTED, POET_HARDEST, POET_STEP = 2, 3, (-0.1, 0.3)  # admitted per mutation; re-run by ES; e₀, e₁ changes
POET_CHILDREN, POET_MC = 16, (0.25, 0.95)  # children proposed per mutation; the minimal criterion's score bounds


@dataclasses.dataclass
class PoetState:
    """Everything POET's iterations change: --poet-max-pairs slots of agents and environments, and the records."""

    agents: GradientESState  # [slots] each slot's OpenAI-ES state (empty slots are stepped too, and ignored)
    envs: np.ndarray  # [slots, 2] each slot's environment e
    slot_env: np.ndarray  # [slots] each slot's environment id (an index of `created`), -1 where empty
    rng: np.random.RandomState  # the mutations' random numbers
    created: list  # every environment admitted: id, wall, gap, parent, iteration, best_score, evaluations_to_solve
    rejected: list  # [wall, gap] of every child that failed the minimal criterion
    history: list  # (iteration, env id, wall, gap, score) of every active pair after every iteration
    evaluations: int = 0  # track runs so far, POET's whole budget
    transfers: int = 0
    iteration: int = 0  # iterations done


def track_policy(args: Args) -> tuple[jax.Array, Callable]:
    """(θ₀ [dim], unravel): the runner's initial MLP, init_policy(PRNGKey(seed)) with --hidden, flattened."""
    return ravel_pytree(init_policy(jax.random.PRNGKey(args.seed), RUNNER.obs_dim, args.hidden, RUNNER.action_dim))


def track_es_step(agent: GradientESState, env: jax.Array, key: jax.Array, unravel: Callable, args: Args):
    """ES_STEP (POET's Algorithm 2): one OpenAI-ES generation of an agent on environment env [2], the members scored
    by run_track; ask and tell share the key. Returns the agent's new state."""

    def evaluate(population):
        return jax.vmap(lambda x: run_track(unravel(x), env))(population), None, None

    return es_generation("openai-es", agent, key, key, evaluate, args)[0]


def poet_init(args: Args) -> PoetState:
    """One pair: θ₀ on the flat track (environment 0), the other slots empty."""
    cap = args.poet_max_pairs
    agents = jax.tree.map(lambda a: jnp.stack([a] * cap), gradient_es_init(None, track_policy(args)[0], args))
    created = [dict(id=0, wall=0.0, gap=0.0, parent=-1, iteration=0, best_score=0.0, evaluations_to_solve=None)]
    slot_env = np.array([0] + [-1] * (cap - 1))
    return PoetState(
        agents, np.zeros((cap, 2), np.float32), slot_env, np.random.RandomState(args.seed), created, [], []
    )


def poet_loop(args: Args, poet: PoetState, on_iteration: Callable) -> PoetState:
    """POET's iterations after poet.iteration up to --num-generations. Every iteration each pair's agent takes one
    ES_STEP in its environment; every --poet-mutate-every iterations the environments whose agent solves them (score
    1) propose POET_CHILDREN children (e + U(POET_STEP) per knob), those passing the minimal criterion are ranked
    by novelty and at most POET_ADMITTED join, each with the best current agent in it, the oldest pair archived
    beyond --poet-max-pairs; every --poet-transfer-every iterations each agent is replaced by a better one from
    another pair, taken directly or after one ES step in this environment. Iteration it's keys are
    fold_in(PRNGKey(seed), it), so a longer run repeats a shorter one. on_iteration(poet) after each iteration."""
    _, unravel = track_policy(args)
    cap = args.poet_max_pairs
    score = jax.jit(jax.vmap(lambda x, env: run_track(unravel(x), env)))  # agents [n, dim] in envs [n, 2] -> [n]

    @jax.jit
    def step_all(agents, envs, key):  # every slot, active or not: agents [cap], envs [cap, 2]
        agents = jax.vmap(lambda a, e, k: track_es_step(a, e, k, unravel, args))(
            agents, envs, jax.random.split(key, cap)
        )
        return agents, score(agents.mean, envs)

    @jax.jit
    def transfer_all(agents, envs, scores, active, key):
        def into(env, t):  # every other active agent in pair t's environment, directly and after one ES step
            tuned = jax.vmap(lambda agent: track_es_step(agent, env, key, unravel, args))(agents)
            here = jnp.tile(env, (cap, 1))
            tried = jnp.concatenate([score(agents.mean, here), score(tuned.mean, here)])
            replace, best = transfer_choice(scores[t], tried, jnp.tile(active & (jnp.arange(cap) != t), 2))
            replace = replace & active[t]
            chosen = jax.tree.map(lambda a, b: jnp.where(replace, jnp.concatenate([a, b])[best], a[t]), agents, tuned)
            return chosen, replace

        return jax.vmap(into)(envs, jnp.arange(cap))

    for it in range(poet.iteration + 1, args.num_generations + 1):
        active = poet.slot_env >= 0
        key_step, key_transfer = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(args.seed), it))
        poet.agents, scores = step_all(poet.agents, jnp.asarray(poet.envs), key_step)
        scores = np.asarray(scores)
        poet.evaluations += int(active.sum()) * (args.pop_size + 1)
        for slot in np.flatnonzero(active):
            e = poet.created[poet.slot_env[slot]]
            e["best_score"] = max(e["best_score"], float(scores[slot]))
            if e["evaluations_to_solve"] is None and scores[slot] >= 1.0:  # POET's whole budget spent so far
                e["evaluations_to_solve"] = poet.evaluations
            poet.history.append((it, int(poet.slot_env[slot]), *poet.envs[slot].tolist(), float(scores[slot])))
        eligible = np.flatnonzero(active & (scores >= 1.0))
        if it % args.poet_mutate_every == 0 and eligible.size:
            mutate_envs(args, poet, eligible, score, it)
        if it % args.poet_transfer_every == 0:
            active = poet.slot_env >= 0
            poet.agents, replaced = transfer_all(
                poet.agents, jnp.asarray(poet.envs), jnp.asarray(scores), jnp.asarray(active), key_transfer
            )
            poet.transfers += int(replaced.sum())
            poet.evaluations += int(active.sum()) ** 2 * (args.pop_size + 2)
        poet.iteration = it
        on_iteration(poet)
    return poet


def mutate_envs(args: Args, poet: PoetState, eligible: np.ndarray, score: Callable, it: int):
    """MUTATE_ENVS (POET's Algorithm 2) at iteration it: children of the eligible slots' environments, the minimal
    criterion, novelty ranking, and each admitted child paired with the best current agent in it (poet updated)."""
    cap = args.poet_max_pairs
    parents = poet.rng.choice(eligible, POET_CHILDREN)
    children = np.clip(poet.envs[parents] + poet.rng.uniform(*POET_STEP, (len(parents), 2)), 0, 1).astype(np.float32)
    in_children = score(poet.agents.mean[parents], jnp.asarray(children))
    passed = np.asarray(minimal_criterion(in_children, *POET_MC))
    poet.rejected += children[~passed].tolist()
    poet.evaluations += len(parents)
    order = np.argsort(-novelty(children, np.array([[e["wall"], e["gap"]] for e in poet.created])))
    for c in [c for c in order if passed[c]][:POET_ADMITTED]:
        in_child = np.asarray(score(poet.agents.mean, jnp.tile(children[c], (cap, 1))))
        in_child = np.where(poet.slot_env >= 0, in_child, -1)
        free = np.flatnonzero(poet.slot_env < 0)  # or archive the oldest pair
        slot = free[0] if free.size else min(np.flatnonzero(poet.slot_env >= 0), key=lambda s: poet.slot_env[s])
        best = int(np.argmax(in_child))
        poet.agents = jax.tree.map(lambda a, slot=slot, best=best: a.at[slot].set(a[best]), poet.agents)
        poet.created.append(
            dict(
                id=len(poet.created),
                wall=float(children[c][0]),
                gap=float(children[c][1]),
                parent=int(poet.slot_env[parents[c]]),
                iteration=it,
                best_score=float(in_child.max()),
                evaluations_to_solve=poet.evaluations if in_child.max() >= 1.0 else None,
            )
        )
        poet.envs[slot], poet.slot_env[slot] = children[c], len(poet.created) - 1
        poet.evaluations += cap


def direct_es(args: Args, envs: list, generations: int) -> list[np.ndarray]:
    """POET's control: OpenAI-ES from θ₀ on each environment of envs (each [2]) alone, for `generations` ES_STEPs
    (Wang et al.: POET's whole evaluation budget). Returns each one's centre score after each generation
    [generations]."""
    theta0, unravel = track_policy(args)

    @jax.jit
    def curve(env):
        def generation(agent, key):
            agent = track_es_step(agent, env, key, unravel, args)
            return agent, run_track(unravel(agent.mean), env)

        keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(args.seed), 0), generations)
        return jax.lax.scan(generation, gradient_es_init(None, theta0, args), keys)[1]

    return [np.asarray(curve(jnp.asarray(env))) for env in envs]


# ---- Plumbing: run directories, resume, logs, plots, reports, launch. Nothing below changes a number.
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


def write_csv(path: str, rows: list, mode: str = "w"):
    """rows (a header, then the data rows) into a new file, or with mode "a" after its rows. Process 0 only."""
    if jax.process_index():
        return
    with open(path, mode, newline="") as f:
        csv.writer(f).writerows(rows)


def write_checkpoint(path: str, state: dict):
    """state (numpy arrays, numbers, strings, and dicts and NamedTuples of them) into path as msgpack, atomically."""
    atomic_write(path, flax.serialization.msgpack_serialize(flax.serialization.to_state_dict(state)))


def read_checkpoint(path: str, restore: Callable):
    """restore(the dict write_checkpoint wrote to path). Raises ArgsError if the file is damaged or restore fails
    (a checkpoint of other settings)."""
    try:
        with open(path, "rb") as f:
            return restore(flax.serialization.msgpack_restore(f.read()))
    except Exception as e:  # msgpack, key and shape errors all mean the same thing to the user
        raise ArgsError(f"checkpoint {path} is damaged or from other settings ({type(e).__name__})") from None


def restore_loop(saved: dict, template: LoopState) -> tuple[LoopState, GenerationOutput]:
    """(loop state, outputs so far) of run_generations' checkpoint, in the template's structure and shapes."""
    loop = flax.serialization.from_state_dict(template, saved["loop"])
    if jax.tree.map(np.shape, loop) != jax.tree.map(np.shape, template):
        raise ValueError("shapes differ")
    return loop, GenerationOutput(**saved["outputs"])


def columns(out: GenerationOutput, first: int, pop_size: int) -> dict:
    """generations.csv's columns [T] for T generations after `first`; the population mean leaves non-finite
    members out (NaN if none is finite), best_fitness ranks NaN as -inf."""
    finite = np.isfinite(out.fitness)
    generation = first + 1 + np.arange(len(out.stop))
    return dict(
        generation=generation,
        evaluations=generation * pop_size,
        best_fitness=np.where(np.isnan(out.fitness), -np.inf, out.fitness).max(1),
        mean_fitness=np.where(finite, out.fitness, 0).sum(1) / np.where(finite.any(1), finite.sum(1), np.nan),
        center_fitness=out.center_fitness,
        elite_fitness=out.elite_fitness,
        sigma=out.sigma,
        archive_cells=out.archive_cells,
    )


def evolve(args: Args, problem: Problem, run_dir: str, quiet: bool = False) -> tuple[LoopState, GenerationOutput, dict]:
    """run_generations into run_dir behind a progress bar: generations.csv written chunk by chunk, checkpoint.msgpack
    (continued with --resume). Returns the final loop state, the outputs, and the timings wall_seconds,
    first_call_seconds (compilation included) and generations_per_second (after the first call; None for one call)."""
    from tqdm import tqdm

    csv_path, start = os.path.join(run_dir, "generations.csv"), time.time()
    bar = tqdm(total=args.num_generations, desc=args.algo, file=sys.stdout, mininterval=0.5, disable=quiet)
    ran = []  # (time, generations) of each chunk this process ran, not restored from the checkpoint

    def on_chunk(first, out, restored):
        if not restored:
            ran.append((time.time(), len(out.stop)))
        table = columns(out, first, args.pop_size)
        write_csv(csv_path, ([list(table)] if first == 0 else []) + list(zip(*table.values())), "a" if first else "w")
        bar.update(len(out.stop))
        bar.set_postfix({k.split("_")[0]: f"{v[-1]:.4g}" for k, v in table.items() if k.endswith("fitness")})

    checkpoint = os.path.join(run_dir, "checkpoint.msgpack")
    loop, out = run_generations(args, problem, on_chunk, checkpoint=checkpoint, resume=bool(args.resume))
    bar.close()
    return (
        loop,
        out,
        dict(
            wall_seconds=time.time() - start,
            first_call_seconds=ran[0][0] - start if ran else 0.0,
            generations_per_second=sum(n for _, n in ran[1:]) / (ran[-1][0] - ran[0][0]) if len(ran) > 1 else None,
        ),
    )


def report(run_dir: str, summary: dict, figure: str, draw: Callable, ncols: int = 1) -> dict:
    """Write summary to run_dir/summary.json (non-finite numbers as null), and only then import matplotlib (Agg
    backend: no display) and save draw(*axes) on a figure of ncols panels as run_dir/figure, so that a plotting
    failure cannot lose the results. Process 0 only draws. Returns the summary as written."""
    summary = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in summary.items()}
    write_json(os.path.join(run_dir, "summary.json"), summary)
    if jax.process_index() == 0:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, ncols, figsize=(6.5 if ncols == 1 else 11, 4.2), squeeze=False)
        draw(*axes[0])
        fig.tight_layout()
        fig.savefig(os.path.join(run_dir, figure), dpi=110)
        plt.close(fig)
    return summary


def run(args: Args, run_dir: str, quiet: bool = False) -> dict:
    """One ES run (resolved args) into run_dir: generations.csv and checkpoint.msgpack (evolve), params.npz,
    summary.json (also returned), then fitness_curve.png."""
    problem = make_problem(args)
    print(
        f"{args.algo} on {args.problem}: {problem.num_dims} parameters, population {args.pop_size} over "
        f"{jax.device_count()} {jax.default_backend()} device(s), up to {args.num_generations} generations"
    )
    loop, out, timings = evolve(args, problem, run_dir, quiet)
    table = columns(out, 0, args.pop_size)
    stop = STOP_REASONS[int(out.stop[-1])] or None
    if stop:
        print(f"stopped after generation {len(out.stop)}: {stop} (Hansen's termination criterion)")
    params = io.BytesIO()
    obs_stats = {f"obs_{k}": np.asarray(v) for k, v in loop.obs_stats._asdict().items()}
    np.savez(params, center=np.asarray(loop.es.mean), **obs_stats)
    atomic_write(os.path.join(run_dir, "params.npz"), params.getvalue())
    summary = dict(
        algo=args.algo,
        problem=args.problem,
        seed=args.seed,
        num_dims=problem.num_dims,
        pop_size=args.pop_size,
        num_generations=len(out.stop),
        evaluations=len(out.stop) * args.pop_size,
        stop_reason=stop,
        best_fitness=float(table["best_fitness"].max()),
        final_mean_fitness=float(table["mean_fitness"][-1]),
        final_center_fitness=float(out.center_fitness[-1]),
        final_elite_fitness=float(out.elite_fitness[-1]),
        final_archive_cells=int(out.archive_cells[-1]) if args.algo == "map-elites" else None,
        **timings,
        num_devices=jax.device_count(),
        device=jax.devices()[0].device_kind,
    )
    print(f"best member {summary['best_fitness']}; final centre {summary['final_center_fitness']}")

    def draw(ax):  # centre, population mean and best member (test functions: f = -fitness, log scale)
        sign = -1.0 if args.problem in TEST_FUNCTIONS else 1.0
        for key, label in (("center_fitness", "centre"), ("mean_fitness", "population mean"), ("best_fitness", "best")):
            ax.plot(table["generation"], sign * table[key], label=label)
        ylabel = "f(x) = -fitness" if sign < 0 else "return (fitness)"
        ax.set(xlabel="generation", ylabel=ylabel, title=args.problem, yscale="log" if sign < 0 else "linear")
        ax.legend(fontsize=8)

    return report(run_dir, summary, "fitness_curve.png", draw)


def run_ite(args: Args, run_dir: str) -> dict:
    """--algo ite into run_dir: MAP-Elites maps the intact arm (hand position -> smoothest posture, --num-generations
    of --pop-size; generations.csv and checkpoint.msgpack by evolve), then ite_damages. Writes ite_damages.csv,
    summary.json (performances as fractions of the undamaged best; also returned), ite.png."""
    loop, out, _ = evolve(dataclasses.replace(args, algo="map-elites", problem="arm"), arm_problem(), run_dir)
    filled = np.asarray(jnp.isfinite(loop.es.fitness))
    behaviours, prior, rows = ite_damages(args, loop.es)
    undamaged = float(prior.max())
    print(f"map: {int(filled.sum())} of {args.num_bins**2} cells filled; best predicted reach {undamaged:.3f}")
    write_csv(os.path.join(run_dir, "ite_damages.csv"), [list(rows[0])] + [list(r.values()) for r in rows])
    summary = dict(
        algo="ite",
        seed=args.seed,
        cells_filled=int(filled.sum()),
        map_evaluations=len(out.stop) * args.pop_size,
        target=ARM_TARGET,
        undamaged_best=undamaged,
        num_damages=len(rows),
    )
    for name in ("ite", "ordered", "es", "es_at_ite_trials", "best_in_map"):
        fraction = np.array([r[f"{name}_best"] for r in rows]) / undamaged
        summary[f"{name}_recovered_fraction"] = float(fraction.mean())
        summary[f"{name}_recovered_fraction_per_damage"] = fraction.round(4).tolist()
        if f"{name}_trials" in rows[0]:
            summary[f"{name}_trials"] = float(np.mean([r[f"{name}_trials"] for r in rows]))

    def draw(left, right):  # the map, coloured by predicted reach; the recovered fraction per damage
        dots = left.scatter(*np.asarray(behaviours)[filled].T, c=np.asarray(prior)[filled], s=2)
        left.plot(*ARM_TARGET, "r*", ms=12)
        left.set(aspect="equal", title="map: the elites' hand positions and predicted reach", xlabel="x", ylabel="y")
        left.figure.colorbar(dots, ax=left)
        for i, (name, label) in enumerate((("ite", "IT&E"), ("ordered", "elites in order"), ("es", "CMA-ES"))):
            fraction = [r[f"{name}_best"] / undamaged for r in rows]
            label = f"{label} ({summary[f'{name}_trials']:.1f} trials)"
            right.bar(np.arange(len(rows)) + (i - 1) * 0.27, fraction, 0.27, label=label)
        right.set_xticks(range(len(rows)), [f"s{r['stuck']} o{r['offset']}" for r in rows], rotation=60, fontsize=7)
        right.set(ylabel="recovered / undamaged best", title="damages (s: stuck joints, o: offset joints)")
        right.legend(fontsize=8, loc="lower left")

    return report(run_dir, summary, "ite.png", draw, ncols=2)


def restore_poet(saved: dict, template: PoetState) -> PoetState:
    """The PoetState of run_poet's checkpoint, its agents in the template's structure."""
    agents = jax.tree.map(jnp.asarray, flax.serialization.from_state_dict(template.agents, saved["agents"]))
    rng = np.random.RandomState()
    rng.set_state(saved["rng"])
    records = json.loads(saved["records"])
    return PoetState(agents, np.array(saved["envs"]), np.array(saved["slot_env"]), rng, *records)


def run_poet(args: Args, run_dir: str) -> dict:
    """--algo poet into run_dir: poet_loop from one pair on the flat track behind a progress bar (checkpointed every
    2% of the iterations, continued with --resume), then direct_es with POET's whole evaluation budget on the
    POET_HARDEST hardest solved environments. Writes poet_envs.csv, poet_history.csv, summary.json (also returned),
    poet.png."""
    from tqdm import tqdm

    poet = poet_init(args)
    checkpoint = os.path.join(run_dir, "checkpoint.msgpack")
    if args.resume and os.path.exists(checkpoint):
        poet = read_checkpoint(checkpoint, lambda saved: restore_poet(saved, poet))
    bar = tqdm(total=args.num_generations, initial=poet.iteration, desc="poet", file=sys.stdout, mininterval=0.5)

    def on_iteration(poet):
        if poet.iteration % max(1, args.num_generations // 50) == 0:
            records = [poet.created, poet.rejected, poet.history, poet.evaluations, poet.transfers, poet.iteration]
            state = dict(
                agents=jax.tree.map(np.asarray, poet.agents),
                envs=poet.envs,
                slot_env=poet.slot_env,
                rng=poet.rng.get_state(legacy=False),
                records=json.dumps(records),
            )
            write_checkpoint(checkpoint, state)
        bar.update(1)
        solved = sum(e["best_score"] >= 1 for e in poet.created)
        bar.set_postfix(pairs=int((poet.slot_env >= 0).sum()), envs=len(poet.created), solved=solved)

    poet = poet_loop(args, poet, on_iteration)
    bar.close()
    created, history = poet.created, poet.history
    solved = [e for e in created if e["best_score"] >= 1.0]
    hardest = sorted(solved, key=lambda e: -(e["wall"] + e["gap"]))[:POET_HARDEST]
    generations = poet.evaluations // (args.pop_size + 1)  # direct ES: POET's whole budget on each environment
    write_csv(os.path.join(run_dir, "poet_envs.csv"), [list(created[0])] + [list(e.values()) for e in created])
    for e, curve in zip(hardest, direct_es(args, [[e["wall"], e["gap"]] for e in hardest], generations)):
        solved_at = np.flatnonzero(curve >= 1.0)
        e.update(
            direct_es_best_score=float(curve.max()),
            direct_es_evaluations_to_solve=(int(solved_at[0]) + 1) * (args.pop_size + 1) if solved_at.size else None,
        )
    write_csv(os.path.join(run_dir, "poet_history.csv"), [("iteration", "env_id", "wall", "gap", "score")] + history)
    summary = dict(
        algo="poet",
        seed=args.seed,
        iterations=args.num_generations,
        evaluations=poet.evaluations,
        environments_created=len(created),
        environments_solved=len(solved),
        children_rejected=len(poet.rejected),
        transfers=poet.transfers,
        direct_es_generations=generations,
        hardest_solved=hardest,
        direct_es_solved=sum(e["direct_es_best_score"] >= 1 for e in hardest),
    )

    def draw(left, right):  # the environments created and the children rejected; each pair's score
        left.scatter(*np.array(poet.rejected).reshape(-1, 2).T, c="0.7", marker="x", s=12, label="failed the criterion")
        for e in created:
            left.scatter(e["wall"], e["gap"], s=30, c="tab:green" if e["best_score"] >= 1 else "tab:red")
        for e in hardest:
            solved = e["direct_es_best_score"] >= 1
            label = "hardest: direct ES solved it" if solved else "hardest: direct ES did not"
            style = dict(marker="s", facecolors="none") if solved else dict(marker="X", facecolors="k")
            left.scatter(e["wall"], e["gap"], s=90, edgecolors="k", label=label, **style)
        left.set(xlabel=f"walls e₀ (× {WALL_MAX} m)", ylabel=f"gaps e₁ (× {GAP_MAX} m)", xlim=(-0.05, 1.1))
        left.set(ylim=(-0.05, 1.1), title="environments created: green solved, red not")
        handles = dict(zip(*left.get_legend_handles_labels()[::-1]))  # one entry per label
        left.legend(handles.values(), handles.keys(), fontsize=7, loc="lower right")
        rows = np.array(history)
        for env_id in np.unique(rows[:, 1]):
            right.plot(*rows[rows[:, 1] == env_id][:, [0, 4]].T, lw=0.8)
        right.set(xlabel="iteration", ylabel="score of the pair's agent (1 = solved)", title="pairs")

    return report(run_dir, summary, "poet.png", draw, ncols=2)


LAUNCH_FIELDS = ("coordinator_address", "num_processes", "process_id", "init_timeout")


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


def main(args: Args) -> str:
    """Run one method (or continue one with --resume); returns the run directory. Bad arguments: one line on
    stderr, exit code 2."""
    try:
        start_processes(args)
        args = resolve_args(resumed_args(args) if args.resume else args)
        problem = dict(ite="arm", poet="track").get(args.algo, args.problem)
        run_dir = args.run_dir or os.path.join(
            "runs", f"{problem}__{args.algo.replace(':', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
        )
        refuse_occupied(run_dir, args)
        write_json(os.path.join(run_dir, "args.json"), dataclasses.asdict(args))
        dict(ite=run_ite, poet=run_poet).get(args.algo, run)(args, run_dir)
    except ArgsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"run directory: {run_dir}")
    return run_dir


if __name__ == "__main__":
    main(tyro.cli(Args))
