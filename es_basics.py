"""Evolution strategies for policy search, written out from the equations and run beside evosax.

An evolution strategy treats the return of a policy (or any black-box objective) as a function F(θ) of
a flat parameter vector and improves a search distribution over θ from sampled fitnesses alone: the
cross-entropy method refits a Gaussian to the elite, CMA-ES adapts a full covariance and a step size,
NES / OpenAI-ES follow the Monte-Carlo gradient (1/σ)·E[F(μ + σε)·ε], and MAP-Elites keeps the best
solution found in each cell of a behaviour grid. Each method is a NamedTuple state with pure
`<algo>_init`, `<algo>_ask` and `<algo>_tell` functions, the equation in the docstring, and one
generation loop runs them and evosax's implementations (`--algo evosax:CMA_ES`) on the same problems.

Sources: CMU 10-403 (Deep Reinforcement Learning) lecture on evolutionary methods (CEM, CMA-ES, NES,
MAP-Elites); Tim Salimans, Jonathan Ho, Xi Chen, Szymon Sidor, Ilya Sutskever, "Evolution Strategies as
a Scalable Alternative to Reinforcement Learning", arXiv:1703.03864 (Algorithms 1 and 2); Nikolaus
Hansen, "The CMA Evolution Strategy: A Tutorial", arXiv:1604.00772; Jean-Baptiste Mouret, Jeff Clune,
"Illuminating search spaces by mapping elites", arXiv:1504.04909; Karpathy's 60-line NES example.
This is the outer loop that lpo.py and epg.py run around their inner loops, on its own problems.

Convention: every problem returns a fitness to MAXIMISE. For policies it is the mean episodic return;
for the test functions it is -f(x), so their optimum is fitness 0. evosax minimises: its adapter
negates the fitness at the boundary.

Example:
    python es_basics.py --algo openai-es --problem CartPole-v1
    python es_basics.py --algo cma-es --problem rosenbrock --num-dims 10
    python es_basics.py --compare cem,cma-es,nes,openai-es,evosax:CMA_ES --problem sphere --num-seeds 3
"""

import csv
import dataclasses
import inspect
import io
import json
import math
import os
import sys
import time
from typing import Any, Callable, NamedTuple, Optional, Tuple

# jaxlib 0.10.2 on CPU runs batched LAPACK calls (here: CMA-ES's eigendecomposition) as tasks on XLA's
# intra-op thread pool, whose size is the number of cores; when every pool thread waits inside such a
# call the run deadlocks at 0% CPU. A pool of at least 16 threads leaves spare threads. Must be set
# before JAX starts its CPU backend; it does nothing on GPU.
os.environ.setdefault("NPROC", "16")

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from jax.flatten_util import ravel_pytree

ALGOS = ("cem", "cma-es", "nes", "openai-es", "map-elites")
# evosax 0.3.2 strategies the adapter runs (distribution-based, built from (population_size, solution)).
EVOSAX_NAMES = (
    "ARS", "CMA_ES", "CR_FM_NES", "DES", "HillClimbing", "LM_MA_ES", "MA_ES", "Open_ES", "PGPE", "Rm_ES",
    "SNES", "Sep_CMA_ES", "SimpleES", "SimulatedAnnealing", "iAMaLGaM_Full", "iAMaLGaM_Univariate", "xNES",
)
EVOSAX_EVEN = ("ARS", "CR_FM_NES", "Open_ES", "PGPE")  # antithetic: evosax asserts an even population
TEST_FUNCTIONS = ("quadratic", "sphere", "rosenbrock", "rastrigin")
BRAX_ENVS = (
    "ant", "halfcheetah", "hopper", "humanoid", "humanoidstandup", "inverted_pendulum",
    "inverted_double_pendulum", "pusher", "reacher", "swimmer", "walker2d",
)
GYMNAX_ENVS = (
    "CartPole-v1", "Acrobot-v1", "MountainCar-v0", "Pendulum-v1", "MountainCarContinuous-v0",
    "Breakout-MinAtar", "Asterix-MinAtar", "Freeway-MinAtar", "SpaceInvaders-MinAtar", "Seaquest-MinAtar",
)
PROBLEMS = TEST_FUNCTIONS + GYMNAX_ENVS + BRAX_ENVS
BACKENDS = ("generalized", "positional", "spring", "mjx")


@dataclasses.dataclass
class Args:
    # ---- run ----
    exp_name: str = "es_basics"
    """name of this experiment, part of the run name"""
    seed: int = 1
    """seed: generation g draws everything from fold_in(PRNGKey(seed), g); a policy's initial weights too"""
    run_dir: Optional[str] = None
    """where to write results (default: runs/{problem}__{algo}__{seed}__{unix time})"""
    compare: Optional[str] = None
    """comma-separated methods to run one after another on --problem (e.g. cem,cma-es,openai-es,evosax:CMA_ES),
    each into a subdirectory, with one comparison figure and compare.json"""
    num_seeds: int = 1
    """--compare: runs per method, with seeds --seed, --seed+1, ...; reported as mean ± std"""
    distributed: bool = False
    """call jax.distributed.initialize() first, so that the devices of several hosts share the population"""

    # ---- problem ----
    problem: str = "sphere"
    """test function (quadratic, sphere, rosenbrock, rastrigin) or env id: gymnax (CartPole-v1, Acrobot-v1,
    MountainCar-v0, Pendulum-v1, MountainCarContinuous-v0, Breakout-MinAtar, Asterix-MinAtar, Freeway-MinAtar,
    SpaceInvaders-MinAtar, Seaquest-MinAtar) or Brax (ant, halfcheetah, hopper, humanoid, ...)"""
    num_dims: Optional[int] = None
    """test functions: dimension of x (default 3 for quadratic, 10 otherwise); policies: set by the network"""
    num_rollouts: int = 1
    """policies: episodes per member, fitness = their mean return; every member gets the same reset keys"""
    num_eval_episodes: int = 10
    """policies: episodes of the noiseless mean policy, evaluated every generation (new keys each time)"""
    hidden: Tuple[int, ...] = (32, 32)
    """policies: hidden layer sizes of the deterministic tanh MLP"""
    normalize_observations: Optional[bool] = None
    """policies: normalise observations by running statistics (default: on for openai-es, off otherwise)"""
    backend: str = "positional"
    """Brax physics backend: generalized, positional, spring or mjx"""
    episode_length: int = 1000
    """Brax: steps per episode (gymnax envs use their own time limit)"""
    target: Optional[float] = None
    """fitness at which a run counts as solved, for generations/evaluations-to-target (default per problem)"""

    # ---- evolution strategy (None: the default for this method and problem, saved in args.json) ----
    algo: str = "openai-es"
    """cem, cma-es, nes, openai-es, map-elites, or evosax:<Name> (e.g. evosax:Open_ES, evosax:CMA_ES, evosax:SNES)"""
    pop_size: Optional[int] = None
    """population size per generation; must divide over the JAX devices"""
    num_generations: Optional[int] = None
    """generations to run"""
    sigma_init: Optional[float] = None
    """initial noise scale σ (CEM: per-coordinate std; CMA-ES: step size; MAP-Elites: mutation std)"""
    sigma_decay: Optional[float] = None
    """σ multiplier per generation (nes, openai-es, evosax strategies with a σ schedule)"""
    sigma_limit: Optional[float] = None
    """floor of the decayed σ"""
    learning_rate: Optional[float] = None
    """step size α of the mean (nes: plain gradient ascent; openai-es and evosax Open_ES/ARS: Adam)"""
    lr_decay: Optional[float] = None
    """learning-rate multiplier per generation (nes, openai-es)"""
    weight_decay: Optional[float] = None
    """openai-es: L2 coefficient λ, the update ascends g - λ·μ (Salimans et al.: 0.005)"""
    elite_ratio: Optional[float] = None
    """cem: elite fraction ρ, the top ⌊ρ·pop⌋ members refit the Gaussian"""
    cem_noise: Optional[float] = None
    """cem: η added to the elite variance each generation, so σ never collapses"""
    num_bins: int = 20
    """map-elites: cells per descriptor axis (the grid has num_bins² cells)"""


# Defaults for the None fields, by method and by kind of problem ("function" or "policy").
FUNCTION_DEFAULTS = {
    "cem": dict(pop_size=50, num_generations=400, sigma_init=2.0, elite_ratio=0.2, cem_noise=1e-4),
    "cma-es": dict(pop_size=None, num_generations=400, sigma_init=1.0),  # pop None: 4 + ⌊3 ln n⌋ (Hansen)
    "nes": dict(pop_size=50, num_generations=400, sigma_init=0.5, sigma_decay=0.99, sigma_limit=1e-3,
                learning_rate=0.1, lr_decay=0.98),
    "openai-es": dict(pop_size=50, num_generations=400, sigma_init=0.2, sigma_decay=0.99, sigma_limit=1e-3,
                      learning_rate=0.1, lr_decay=0.99, weight_decay=0.0),
    "map-elites": dict(pop_size=50, num_generations=400, sigma_init=0.3),
    "evosax": dict(pop_size=50, num_generations=400, sigma_init=1.0, sigma_decay=0.98, sigma_limit=1e-3,
                   learning_rate=0.1),
}
POLICY_DEFAULTS = {
    "cem": dict(pop_size=64, num_generations=50, sigma_init=0.5, elite_ratio=0.2, cem_noise=1e-3),
    "cma-es": dict(pop_size=64, num_generations=50, sigma_init=0.5),
    "nes": dict(pop_size=64, num_generations=50, sigma_init=0.1, sigma_decay=1.0, sigma_limit=0.01,
                learning_rate=0.05, lr_decay=1.0),
    "openai-es": dict(pop_size=64, num_generations=50, sigma_init=0.1, sigma_decay=1.0, sigma_limit=0.01,
                      learning_rate=0.03, lr_decay=1.0, weight_decay=0.005),
    "map-elites": dict(pop_size=64, num_generations=50, sigma_init=0.1),
    "evosax": dict(pop_size=64, num_generations=50, sigma_init=0.1, sigma_decay=1.0, sigma_limit=0.01,
                   learning_rate=0.03),
}
TARGETS = {"quadratic": -1e-3, "sphere": -1e-3, "rosenbrock": -1e-3, "rastrigin": -1.0, "CartPole-v1": 475.0,
           "Acrobot-v1": -100.0, "MountainCar-v0": -110.0, "Pendulum-v1": -200.0}


class ArgsError(ValueError):
    """A user's mistake in the arguments: reported as one line, before anything is compiled."""


def algo_family(algo: str) -> str:
    """'evosax' for evosax:<Name>, else the algo itself."""
    return "evosax" if algo.startswith("evosax:") else algo


def resolve_args(args: Args) -> Args:
    """Fill the None fields with the defaults of this method and problem, and check every value.

    Raises:
        ArgsError: unknown method, evosax strategy, problem or backend; a population too small for the
            elite fraction, odd where antithetic pairs need it, or not dividing over the devices; MAP-Elites
            on a problem without a behaviour descriptor; a non-positive size.
    """
    family = algo_family(args.algo)
    if family not in ALGOS + ("evosax",):
        raise ArgsError(f"unknown --algo {args.algo!r}; valid: {', '.join(ALGOS)}, evosax:<Name>")
    if family == "evosax" and args.algo[len("evosax:"):] not in EVOSAX_NAMES:
        raise ArgsError(f"unknown evosax strategy {args.algo[len('evosax:'):]!r}; valid: {', '.join(EVOSAX_NAMES)}")
    if args.problem not in PROBLEMS:
        raise ArgsError(f"unknown --problem {args.problem!r}; valid: {', '.join(PROBLEMS)}")
    if args.backend not in BACKENDS:
        raise ArgsError(f"unknown --backend {args.backend!r}; valid: {', '.join(BACKENDS)}")
    on_function = args.problem in TEST_FUNCTIONS
    defaults = (FUNCTION_DEFAULTS if on_function else POLICY_DEFAULTS)[
        "cma-es" if args.algo == "evosax:CMA_ES" else family]  # evosax's CMA-ES runs the written-out one's setting
    filled = {k: v for k, v in defaults.items() if getattr(args, k) is None}
    if on_function and args.num_dims is None:
        filled["num_dims"] = 3 if args.problem == "quadratic" else 10
    if args.normalize_observations is None:
        filled["normalize_observations"] = family == "openai-es" and not on_function
    if args.target is None and args.problem in TARGETS:
        filled["target"] = TARGETS[args.problem]
    args = dataclasses.replace(args, **filled)
    if args.pop_size is None:  # CMA-ES on a test function: Hansen's default population 4 + ⌊3 ln n⌋
        args = dataclasses.replace(args, pop_size=4 + int(3 * math.log(args.num_dims)))
    for name in ("pop_size", "num_generations", "num_rollouts", "num_eval_episodes", "num_bins", "num_seeds",
                 "episode_length"):
        if getattr(args, name) <= 0:
            raise ArgsError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if on_function and args.num_dims <= 0:
        raise ArgsError(f"--num-dims must be positive, got {args.num_dims}")
    if any(h <= 0 for h in args.hidden):
        raise ArgsError(f"--hidden sizes must be positive, got {args.hidden}")
    for name in ("sigma_init", "sigma_decay", "sigma_limit", "learning_rate", "lr_decay", "elite_ratio"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ArgsError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if family == "cem":
        if not args.elite_ratio <= 1:
            raise ArgsError(f"--elite-ratio must lie in (0, 1], got {args.elite_ratio}")
        if num_elites(args) < 2:
            raise ArgsError(f"--pop-size {args.pop_size} is too small for the elite fraction {args.elite_ratio}: "
                            f"⌊ρ·pop⌋ = {num_elites(args)} elites, CEM needs at least 2 to fit a variance")
        if args.cem_noise < 0:
            raise ArgsError(f"--cem-noise must be non-negative, got {args.cem_noise}")
    if family == "cma-es" and args.pop_size < 4:
        raise ArgsError(f"--pop-size {args.pop_size} is too small for CMA-ES (at least 4: 2 parents)")
    if (family == "openai-es" or args.algo[len("evosax:"):] in EVOSAX_EVEN) and args.pop_size % 2:
        raise ArgsError(f"--pop-size must be even for antithetic sampling ({args.algo}), got {args.pop_size}")
    if family == "map-elites":
        if on_function and args.num_dims < 2:
            raise ArgsError("map-elites on a test function needs --num-dims ≥ 2 (the descriptor is (x₀, x₁))")
        if not on_function and args.problem not in DESCRIPTORS:
            raise ArgsError(f"map-elites has no behaviour descriptor for {args.problem!r}; valid: "
                            f"{', '.join(TEST_FUNCTIONS + tuple(DESCRIPTORS))}")
    if args.pop_size % jax.device_count():
        raise ArgsError(f"--pop-size {args.pop_size} does not divide over the {jax.device_count()} JAX devices")
    return args


def num_elites(args: Args) -> int:
    """CEM's elite count ⌊ρ·pop⌋."""
    return int(args.elite_ratio * args.pop_size)


# --------------------------------------------------------------------------------------------------
# Problems. Every problem maps a flat parameter vector x [num_dims] to a fitness to MAXIMISE and a
# behaviour descriptor [2] (for MAP-Elites):  evaluate(x, key, obs_stats) -> (fitness, descriptor).
# --------------------------------------------------------------------------------------------------
QUADRATIC_SOLUTION = (0.5, 0.1, -0.3)  # Karpathy's NES example: w* of the quadratic toy


def quadratic(x: jax.Array) -> jax.Array:
    """Karpathy's toy: F(x) = -‖x - w*‖², w* = (0.5, 0.1, -0.3) repeated to len(x). x [n] -> scalar."""
    solution = jnp.resize(jnp.array(QUADRATIC_SOLUTION, x.dtype), x.shape)
    return -jnp.sum((x - solution) ** 2)


def sphere(x: jax.Array) -> jax.Array:
    """F(x) = -Σ x_i²; optimum 0 at x = 0. x [n] -> scalar."""
    return -jnp.sum(x**2)


def rosenbrock(x: jax.Array) -> jax.Array:
    """F(x) = -Σ_{i<n} [100 (x_{i+1} - x_i²)² + (1 - x_i)²]; optimum 0 at x = 1. x [n ≥ 2] -> scalar."""
    return -jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def rastrigin(x: jax.Array) -> jax.Array:
    """F(x) = -(10 n + Σ [x_i² - 10 cos(2π x_i)]); optimum 0 at x = 0, local optima near integers."""
    return -(10.0 * x.shape[0] + jnp.sum(x**2 - 10.0 * jnp.cos(2.0 * jnp.pi * x)))


FUNCTIONS = {"quadratic": quadratic, "sphere": sphere, "rosenbrock": rosenbrock, "rastrigin": rastrigin}
# Starting mean x₀ = c·1 of the search, and the domain [low, high] that bounds MAP-Elites' descriptor (x₀, x₁).
FUNCTION_START = {"quadratic": 0.0, "sphere": 3.0, "rosenbrock": 0.0, "rastrigin": 3.0}
FUNCTION_DOMAIN = {"quadratic": (-5.0, 5.0), "sphere": (-5.12, 5.12), "rosenbrock": (-2.048, 2.048),
                   "rastrigin": (-5.12, 5.12)}


class RunningStats(NamedTuple):
    """Observation statistics for normalisation (Chan et al.'s parallel update)."""

    mean: jax.Array  # [obs_dim]
    var: jax.Array  # [obs_dim]
    count: jax.Array  # scalar


def init_running_stats(obs_dim: int) -> RunningStats:
    return RunningStats(jnp.zeros(obs_dim), jnp.ones(obs_dim), jnp.array(1e-4))


def update_running_stats(stats: RunningStats, obs_sum: jax.Array, obs_sq_sum: jax.Array, count: jax.Array
                         ) -> RunningStats:
    """Merge a batch, given by its sums Σo [obs_dim], Σo² [obs_dim] and count, into the running statistics."""
    n = jnp.maximum(count, 1.0)
    batch_mean = obs_sum / n
    batch_var = jnp.maximum(obs_sq_sum / n - batch_mean**2, 0.0)
    total = stats.count + count
    delta = batch_mean - stats.mean
    mean = stats.mean + delta * count / total
    var = (stats.var * stats.count + batch_var * count + delta**2 * stats.count * count / total) / total
    return RunningStats(mean, var, total)


def normalize(obs: jax.Array, stats: RunningStats, enabled: bool) -> jax.Array:
    """(obs - mean) / sqrt(var + 1e-8), clipped to [-10, 10]; identity when not enabled."""
    if not enabled:
        return obs
    return jnp.clip((obs - stats.mean) / jnp.sqrt(stats.var + 1e-8), -10.0, 10.0)


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
        """-> (obs, state, reward, done); after done the episode's later steps are masked out by the caller."""
        obs, state, reward, terminated, truncated, _ = self.env.step(key, state, action, self.params)
        done = jnp.maximum(terminated.astype(jnp.float32), truncated.astype(jnp.float32))
        return obs.reshape(-1).astype(jnp.float32), state, jnp.squeeze(reward).astype(jnp.float32), done


class BraxEnv:
    """A Brax environment; an episode is cut at --episode-length steps (the rollout's scan length)."""

    def __init__(self, env_id: str, backend: str, episode_length: int):
        from brax import envs

        self.env = envs.get_environment(env_id, backend=backend)
        self.obs_dim = int(self.env.observation_size)
        self.discrete = False
        self.action_dim = int(self.env.action_size)
        self.action_low, self.action_high = -1.0, 1.0
        self.max_episode_steps = episode_length

    def reset(self, key):
        state = self.env.reset(key)
        return state.obs, state

    def step(self, key, state, action):
        state = self.env.step(state, action)
        return state.obs, state, state.reward, state.done


def make_env(args: Args):
    """The environment named by args.problem (GymnaxEnv or BraxEnv)."""
    if args.problem in BRAX_ENVS:
        return BraxEnv(args.problem, args.backend, args.episode_length)
    return GymnaxEnv(args.problem)


def init_policy(key: jax.Array, obs_dim: int, hidden: Tuple[int, ...], action_dim: int) -> list:
    """Weights of the deterministic MLP: a list of (w [in, out], b [out]); w ~ N(0, 1/in), b = 0."""
    sizes = (obs_dim,) + tuple(hidden) + (action_dim,)
    keys = jax.random.split(key, len(sizes) - 1)
    return [(jax.random.normal(k, (n_in, n_out)) / jnp.sqrt(n_in), jnp.zeros(n_out))
            for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:])]


def policy_action(params: list, obs: jax.Array, env) -> jax.Array:
    """The policy's action for obs [obs_dim]: argmax of the outputs (discrete) or tanh scaled to the bounds."""
    h = obs
    for w, b in params[:-1]:
        h = jnp.tanh(h @ w + b)
    w, b = params[-1]
    out = h @ w + b
    if env.discrete:
        return jnp.argmax(out)
    return env.action_low + (jnp.tanh(out) + 1.0) * 0.5 * (env.action_high - env.action_low)


class Episode(NamedTuple):
    """What one episode of a policy returns; the sums run over the steps before the episode ended."""

    ret: jax.Array  # scalar, undiscounted return
    last_obs: jax.Array  # [obs_dim], the last observation the policy acted on
    obs_sum: jax.Array  # [obs_dim]
    obs_sq_sum: jax.Array  # [obs_dim]
    steps: jax.Array  # scalar


# Behaviour descriptors for MAP-Elites: fn(episode) -> [2], and the range of each axis (values are clipped).
# CartPole-v1 (obs: x, ẋ, θ, θ̇): where the cart ended, and the mean pole angle, in the ranges the episode
# terminates at (|x| ≤ 2.4, |θ| ≤ 12° ≈ 0.2095 rad).
DESCRIPTORS = {
    "CartPole-v1": (lambda ep: jnp.stack([ep.last_obs[0], ep.obs_sum[2] / jnp.maximum(ep.steps, 1.0)]),
                    ((-2.4, 2.4), (-0.2095, 0.2095))),
}


class Problem(NamedTuple):
    """A problem as the generation loop sees it (see make_problem)."""

    name: str
    num_dims: int
    init_mean: jax.Array  # [num_dims], the search's starting mean
    evaluate: Callable  # (x [num_dims], key, obs_stats) -> (fitness, descriptor [2]); the key is the generation's
    evaluate_center: Callable  # (x, key, obs_stats) -> (fitness, (Σobs, Σobs², count)) of the noiseless mean
    descriptor_bounds: Tuple[Tuple[float, float], Tuple[float, float]]
    obs_dim: int  # 1 for test functions (statistics unused)
    unravel: Optional[Callable]  # flat vector -> policy weights (None for test functions)


def make_function_problem(name: str, num_dims: int) -> Problem:
    """A test function as a Problem: fitness -f(x), descriptor (x₀, x₁) clipped to the function's domain."""
    f = FUNCTIONS[name]
    low, high = FUNCTION_DOMAIN[name]
    zeros = (jnp.zeros(1), jnp.zeros(1), jnp.zeros(()))

    def evaluate(x, key, obs_stats):
        descriptor = jnp.clip(x[:2], low, high) if num_dims >= 2 else jnp.zeros(2)
        return f(x), descriptor

    return Problem(name, num_dims, jnp.full(num_dims, FUNCTION_START[name]), evaluate,
                   lambda x, key, obs_stats: (f(x), zeros), ((low, high), (low, high)), 1, None)


def make_policy_problem(args: Args) -> Problem:
    """Policy search on an environment: x is the flattened MLP; fitness = mean return over --num-rollouts
    episodes, each run to its end or the time limit.

    Members evaluated with the same key share their episodes' reset and step keys (common random
    numbers). The starting mean is init_policy(PRNGKey(seed)), flattened.
    """
    env = make_env(args)
    template = init_policy(jax.random.PRNGKey(args.seed), env.obs_dim, args.hidden, env.action_dim)
    init_mean, unravel = ravel_pytree(template)
    descriptor_fn, bounds = DESCRIPTORS.get(args.problem, (lambda ep: jnp.zeros(2), ((0.0, 1.0), (0.0, 1.0))))
    obs_norm = args.normalize_observations

    def episode(x, key, obs_stats) -> Episode:
        params = unravel(x)
        key_reset, key_steps = jax.random.split(key)
        obs, state = env.reset(key_reset)

        def step(carry, key):
            obs, state, alive, ep = carry
            action = policy_action(params, normalize(obs, obs_stats, obs_norm), env)
            next_obs, state, reward, done = env.step(key, state, action)
            ep = Episode(ep.ret + alive * reward, jnp.where(alive > 0, obs, ep.last_obs), ep.obs_sum + alive * obs,
                         ep.obs_sq_sum + alive * obs**2, ep.steps + alive)
            return (next_obs, state, alive * (1.0 - done), ep), None

        zeros = jnp.zeros(env.obs_dim)
        start = Episode(jnp.zeros(()), zeros, zeros, zeros, jnp.zeros(()))
        keys = jax.random.split(key_steps, env.max_episode_steps)
        (_, _, _, ep), _ = jax.lax.scan(step, (obs, state, jnp.ones(()), start), keys)
        return ep

    def episodes(x, key, obs_stats, n):
        return jax.vmap(episode, in_axes=(None, 0, None))(x, jax.random.split(key, n), obs_stats)

    def evaluate(x, key, obs_stats):
        eps = episodes(x, key, obs_stats, args.num_rollouts)
        return eps.ret.mean(), jax.vmap(descriptor_fn)(eps).mean(0)

    def evaluate_center(x, key, obs_stats):
        eps = episodes(x, key, obs_stats, args.num_eval_episodes)
        return eps.ret.mean(), (eps.obs_sum.sum(0), eps.obs_sq_sum.sum(0), eps.steps.sum())

    return Problem(args.problem, int(init_mean.shape[0]), init_mean, evaluate, evaluate_center, bounds, env.obs_dim,
                   unravel)


def make_problem(args: Args) -> Problem:
    """The problem named by args.problem (resolved args)."""
    if args.problem in TEST_FUNCTIONS:
        return make_function_problem(args.problem, args.num_dims)
    return make_policy_problem(args)


# --------------------------------------------------------------------------------------------------
# The methods. Each: a NamedTuple state, <algo>_init, <algo>_ask(key, state, ...) -> (population
# [pop, dim], state), <algo>_tell(state, population, fitness, ...) -> state. Fitness is MAXIMISED.
# Member i's noise comes from fold_in(key, i) alone, so any device can rebuild any member from the
# generation's key: Salimans et al.'s shared random seeds (Algorithm 2).
# --------------------------------------------------------------------------------------------------
def member_noise(key: jax.Array, index, num_dims: int) -> jax.Array:
    """ε ~ N(0, I) [num_dims] of member `index`, from the generation key and the index alone."""
    return jax.random.normal(jax.random.fold_in(key, index), (num_dims,))


def all_noise(key: jax.Array, pop_size: int, num_dims: int) -> jax.Array:
    """Every member's ε [pop_size, num_dims], rebuilt from the seeds."""
    return jax.vmap(member_noise, in_axes=(None, 0, None))(key, jnp.arange(pop_size), num_dims)


def es_gradient(fitness: jax.Array, noise: jax.Array, sigma) -> jax.Array:
    """The score-function estimate of ∇_μ E[F(μ + σε)] = (1/σ)·E[F(μ + σε)·ε]  (Salimans et al., eq. 2):

        g = 1/(nσ) · Σ_i F_i ε_i

    Args: fitness F [n], noise ε [n, dim], σ > 0. Returns g [dim].
    """
    return fitness @ noise / (fitness.shape[0] * sigma)


def centered_ranks(fitness: jax.Array) -> jax.Array:
    """Fitness shaping of Salimans et al.: ranks scaled to [-0.5, 0.5] (worst -0.5, best +0.5). [n] -> [n]."""
    ranks = jnp.argsort(jnp.argsort(fitness)).astype(jnp.float32)
    return ranks / (fitness.shape[0] - 1) - 0.5


# ---- CEM: cross-entropy method with a diagonal Gaussian ----
class CEMState(NamedTuple):
    mean: jax.Array  # μ [dim]
    std: jax.Array  # σ [dim]


def cem_init(mean: jax.Array, sigma_init: float) -> CEMState:
    return CEMState(mean, jnp.full_like(mean, sigma_init))


def cem_ask(key: jax.Array, state: CEMState, pop_size: int) -> Tuple[jax.Array, CEMState]:
    """Sample x_i ~ N(μ, diag σ²):  x_i = μ + σ ⊙ ε_i. Returns ([pop_size, dim], state)."""
    return state.mean + state.std * all_noise(key, pop_size, state.mean.shape[0]), state


def cem_tell(state: CEMState, population: jax.Array, fitness: jax.Array, num_elites: int, noise: float) -> CEMState:
    """Refit the Gaussian to the elite (CMU 10-403; Szita & Lőrincz 2006 for the added noise):

        E = the ⌊ρn⌋ fittest members;  μ ← mean(E);  σ² ← var(E) + η
    """
    elite = population[jnp.argsort(-fitness)[:num_elites]]  # top ⌊ρn⌋ by fitness
    return CEMState(elite.mean(0), jnp.sqrt(elite.var(0) + noise))  # η keeps σ from collapsing


# ---- CMA-ES: full covariance, evolution paths, cumulative step-size adaptation ----
class CMAConstants(NamedTuple):
    """Hansen's default strategy parameters (tutorial arXiv:1604.00772, Table 1), for n dims and λ members."""

    num_parents: int  # μ = ⌊λ/2⌋
    weights: jax.Array  # w_i ∝ ln((λ+1)/2) - ln i, i ≤ μ, Σw = 1
    mu_eff: float  # 1 / Σ w_i²
    c_sigma: float  # cumulation for σ's path
    d_sigma: float  # damping of σ
    c_c: float  # cumulation for the rank-one path
    c_1: float  # rank-one learning rate
    c_mu: float  # rank-μ learning rate
    chi_n: float  # E‖N(0, I)‖ ≈ √n (1 - 1/(4n) + 1/(21n²))


def cma_constants(num_dims: int, pop_size: int) -> CMAConstants:
    n, mu = num_dims, pop_size // 2
    w = np.log((pop_size + 1) / 2) - np.log(np.arange(1, mu + 1))
    w = w / w.sum()
    mu_eff = 1.0 / np.sum(w**2)
    c_sigma = (mu_eff + 2) / (n + mu_eff + 5)
    d_sigma = 1 + 2 * max(0.0, math.sqrt((mu_eff - 1) / (n + 1)) - 1) + c_sigma
    c_c = (4 + mu_eff / n) / (n + 4 + 2 * mu_eff / n)
    c_1 = 2 / ((n + 1.3) ** 2 + mu_eff)
    c_mu = min(1 - c_1, 2 * (mu_eff - 2 + 1 / mu_eff) / ((n + 2) ** 2 + mu_eff))
    chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n**2))
    return CMAConstants(mu, jnp.asarray(w, jnp.float32), float(mu_eff), c_sigma, d_sigma, c_c, c_1, c_mu, chi_n)


class CMAState(NamedTuple):
    mean: jax.Array  # m [n]
    sigma: jax.Array  # step size σ
    C: jax.Array  # covariance [n, n]
    p_sigma: jax.Array  # evolution path of σ [n]
    p_c: jax.Array  # evolution path of C [n]
    B: jax.Array  # eigenvectors of C [n, n] (columns)
    D: jax.Array  # square roots of C's eigenvalues [n]
    generation: jax.Array  # generations told so far


def cma_init(mean: jax.Array, sigma_init: float) -> CMAState:
    n = mean.shape[0]
    eye = jnp.eye(n)
    return CMAState(mean, jnp.asarray(sigma_init, jnp.float32), eye, jnp.zeros(n), jnp.zeros(n), eye, jnp.ones(n),
                    jnp.array(0))


def cma_ask(key: jax.Array, state: CMAState, pop_size: int) -> Tuple[jax.Array, CMAState]:
    """x_i = m + σ·B·(D ⊙ z_i), z_i ~ N(0, I), so x_i ~ N(m, σ²C)  (tutorial eq. 38-40)."""
    z = all_noise(key, pop_size, state.mean.shape[0])
    y = (z * state.D) @ state.B.T  # y_i = B D z_i ~ N(0, C)
    return state.mean + state.sigma * y, state


def cma_tell(state: CMAState, population: jax.Array, fitness: jax.Array, cs: CMAConstants) -> CMAState:
    """One CMA-ES update with positive recombination weights (tutorial eq. 41-47):

        y_i = (x_{i:λ} - m)/σ (sorted, best first);  y_w = Σ_{i≤μ} w_i y_i;  m ← m + σ y_w
        p_σ ← (1-c_σ) p_σ + √(c_σ(2-c_σ)μ_eff) · C^{-1/2} y_w
        σ ← σ · exp((c_σ/d_σ)(‖p_σ‖/E‖N(0,I)‖ - 1))
        p_c ← (1-c_c) p_c + h_σ √(c_c(2-c_c)μ_eff) · y_w
        C ← (1 - c_1 - c_μ + c_1 δ(h_σ)) C + c_1 p_c p_cᵀ + c_μ Σ w_i y_i y_iᵀ
    then C = B D² Bᵀ for the next ask.
    """
    n = state.mean.shape[0]
    y = (population[jnp.argsort(-fitness)[:cs.num_parents]] - state.mean) / state.sigma  # best μ, [μ, n]
    y_w = cs.weights @ y  # weighted recombination of the steps
    mean = state.mean + state.sigma * y_w
    c_inv_sqrt_y_w = state.B @ ((state.B.T @ y_w) / state.D)  # C^{-1/2} y_w
    p_sigma = (1 - cs.c_sigma) * state.p_sigma + math.sqrt(cs.c_sigma * (2 - cs.c_sigma) * cs.mu_eff) * c_inv_sqrt_y_w
    norm_p_sigma = jnp.linalg.norm(p_sigma)
    sigma = state.sigma * jnp.exp((cs.c_sigma / cs.d_sigma) * (norm_p_sigma / cs.chi_n - 1))  # longer path: larger σ
    # h_σ stalls the rank-one path while ‖p_σ‖ is large (σ is growing), so C does not grow along with σ
    h_sigma = (norm_p_sigma / jnp.sqrt(1 - (1 - cs.c_sigma) ** (2 * (state.generation + 1)))
               < (1.4 + 2 / (n + 1)) * cs.chi_n).astype(jnp.float32)
    p_c = (1 - cs.c_c) * state.p_c + h_sigma * math.sqrt(cs.c_c * (2 - cs.c_c) * cs.mu_eff) * y_w
    delta_h = (1 - h_sigma) * cs.c_c * (2 - cs.c_c)
    rank_one = jnp.outer(p_c, p_c)
    rank_mu = (cs.weights[:, None] * y).T @ y  # Σ w_i y_i y_iᵀ
    C = (1 - cs.c_1 - cs.c_mu + cs.c_1 * delta_h) * state.C + cs.c_1 * rank_one + cs.c_mu * rank_mu
    C = (C + C.T) / 2  # keep it exactly symmetric
    eigenvalues, B = jnp.linalg.eigh(C)
    D = jnp.sqrt(jnp.maximum(eigenvalues, 1e-20))
    return CMAState(mean, sigma, C, p_sigma, p_c, B, D, state.generation + 1)


# ---- NES: the plain score-function estimator (CMU 10-403 Algorithm 1; Karpathy's example) ----
class NESState(NamedTuple):
    mean: jax.Array  # μ [dim]
    sigma: jax.Array  # σ
    learning_rate: jax.Array  # α


def nes_init(mean: jax.Array, sigma_init: float, learning_rate: float) -> NESState:
    return NESState(mean, jnp.asarray(sigma_init, jnp.float32), jnp.asarray(learning_rate, jnp.float32))


def nes_ask(key: jax.Array, state: NESState, pop_size: int) -> Tuple[jax.Array, NESState]:
    """x_i = μ + σ ε_i, ε_i ~ N(0, I). Returns ([pop_size, dim], state)."""
    return state.mean + state.sigma * all_noise(key, pop_size, state.mean.shape[0]), state


def nes_tell(state: NESState, population: jax.Array, fitness: jax.Array, sigma_decay: float, sigma_limit: float,
             lr_decay: float) -> NESState:
    """μ ← μ + α/(nσ) Σ_i F̂_i ε_i, with F̂ = (F - mean F)/std F (Karpathy's standardisation: subtracting
    the mean is a baseline, since E[ε] = 0 it leaves the estimate unbiased; dividing by the std makes α
    independent of the fitness scale). Then σ ← max(σ·decay, limit) and α ← α·decay.
    """
    noise = (population - state.mean) / state.sigma  # ε_i, recovered from the members
    shaped = (fitness - fitness.mean()) / (fitness.std() + 1e-8)
    mean = state.mean + state.learning_rate * es_gradient(shaped, noise, state.sigma)
    return NESState(mean, jnp.maximum(state.sigma * sigma_decay, sigma_limit), state.learning_rate * lr_decay)


# ---- OpenAI-ES (Salimans et al. 2017): antithetic pairs, centered ranks, Adam, weight decay ----
class OpenAIESState(NamedTuple):
    mean: jax.Array  # μ [dim]
    sigma: jax.Array  # σ
    learning_rate: jax.Array  # Adam's α
    adam_m: jax.Array  # first moment [dim]
    adam_v: jax.Array  # second moment [dim]
    step: jax.Array  # Adam steps taken


def openai_es_init(mean: jax.Array, sigma_init: float, learning_rate: float) -> OpenAIESState:
    zeros = jnp.zeros_like(mean)
    return OpenAIESState(mean, jnp.asarray(sigma_init, jnp.float32), jnp.asarray(learning_rate, jnp.float32), zeros,
                         zeros, jnp.array(0))


def antithetic_noise(key: jax.Array, pop_size: int, num_dims: int) -> jax.Array:
    """[ε_1..ε_{n/2}, -ε_1..-ε_{n/2}]: member i and i + n/2 are a mirrored pair, ε_j from fold_in(key, j)."""
    half = all_noise(key, pop_size // 2, num_dims)
    return jnp.concatenate([half, -half])


def openai_es_ask(key: jax.Array, state: OpenAIESState, pop_size: int) -> Tuple[jax.Array, OpenAIESState]:
    """x_i = μ ± σ ε_i in antithetic pairs. Returns ([pop_size, dim], state)."""
    return state.mean + state.sigma * antithetic_noise(key, pop_size, state.mean.shape[0]), state


def openai_es_tell(state: OpenAIESState, population: jax.Array, fitness: jax.Array, weight_decay: float,
                   sigma_decay: float, sigma_limit: float, lr_decay: float) -> OpenAIESState:
    """Salimans et al. (Algorithm 1, section 2.2-3): g = 1/(nσ) Σ rank(F_i) ε_i - λμ, then an Adam ascent step:

        m ← β₁m + (1-β₁)g;  v ← β₂v + (1-β₂)g²;  μ ← μ + α·m̂/(√v̂ + ε)   (β = 0.9, 0.999; ε = 1e-8)
    """
    noise = (population - state.mean) / state.sigma
    g = es_gradient(centered_ranks(fitness), noise, state.sigma) - weight_decay * state.mean
    step = state.step + 1
    m = 0.9 * state.adam_m + 0.1 * g
    v = 0.999 * state.adam_v + 0.001 * g**2
    m_hat, v_hat = m / (1 - 0.9**step), v / (1 - 0.999**step)  # bias correction
    mean = state.mean + state.learning_rate * m_hat / (jnp.sqrt(v_hat) + 1e-8)
    return OpenAIESState(mean, jnp.maximum(state.sigma * sigma_decay, sigma_limit), state.learning_rate * lr_decay,
                         m, v, step)


# ---- MAP-Elites: the best solution per cell of a behaviour grid ----
class MapElitesState(NamedTuple):
    fitness: jax.Array  # [num_cells], -inf where empty
    solutions: jax.Array  # [num_cells, dim]
    init_mean: jax.Array  # [dim], the centre of generation 0's samples (while the grid is empty)


def map_elites_init(mean: jax.Array, num_cells: int) -> MapElitesState:
    return MapElitesState(jnp.full(num_cells, -jnp.inf), jnp.zeros((num_cells, mean.shape[0])), mean)


def map_elites_cell(descriptor: jax.Array, bounds, num_bins: int) -> jax.Array:
    """Index of the grid cell [0, num_bins²) of descriptors [..., 2], each axis cut into num_bins equal bins."""
    low, high = jnp.array([b[0] for b in bounds]), jnp.array([b[1] for b in bounds])
    bins = jnp.clip(jnp.floor((descriptor - low) / (high - low) * num_bins), 0, num_bins - 1).astype(jnp.int32)
    return bins[..., 0] * num_bins + bins[..., 1]


def map_elites_ask(key: jax.Array, state: MapElitesState, pop_size: int, sigma: float
                   ) -> Tuple[jax.Array, MapElitesState]:
    """x_i = x_parent + σ ε_i, the parent a uniformly chosen filled cell (the initial mean while none is)."""
    filled = jnp.isfinite(state.fitness)

    def member(i):
        key_parent, key_noise = jax.random.split(jax.random.fold_in(key, i))
        cell = jax.random.choice(key_parent, filled.shape[0], p=filled / jnp.maximum(filled.sum(), 1))
        parent = jnp.where(filled.any(), state.solutions[cell], state.init_mean)
        return parent + sigma * jax.random.normal(key_noise, parent.shape)

    return jax.vmap(member)(jnp.arange(pop_size)), state


def map_elites_tell(state: MapElitesState, population: jax.Array, fitness: jax.Array, descriptors: jax.Array,
                    bounds, num_bins: int) -> MapElitesState:
    """Locate each member's cell and keep it where it beats the cell's elite (the first of equals in a batch)."""
    num_cells = state.fitness.shape[0]
    cells = map_elites_cell(descriptors, bounds, num_bins)
    best = jax.ops.segment_max(fitness, cells, num_cells)  # best new fitness per cell (-inf: none)
    is_best = fitness >= best[cells]
    winner = jax.ops.segment_min(jnp.where(is_best, jnp.arange(fitness.shape[0]), fitness.shape[0]), cells, num_cells)
    improved = best > state.fitness
    solutions = jnp.where(improved[:, None], population[jnp.clip(winner, 0, fitness.shape[0] - 1)], state.solutions)
    return MapElitesState(jnp.where(improved, best, state.fitness), solutions, state.init_mean)


# ---- the methods behind one interface, for the generation loop ----
class Method(NamedTuple):
    init: Callable  # init(key, mean [dim]) -> state
    ask: Callable  # ask(key, state) -> (population [pop, dim], state)
    tell: Callable  # tell(key, state, population, fitness [pop], descriptors [pop, 2]) -> state
    center: Callable  # center(state) -> [dim]: the distribution's mean (MAP-Elites: the best elite)
    sigma: Callable  # sigma(state) -> scalar, logged
    uses_descriptors: bool


def make_method(args: Args, problem: Problem) -> Method:
    """The method named by args.algo, its hyperparameters bound (resolved args)."""
    n, dim = args.pop_size, problem.num_dims
    if args.algo == "cem":
        return Method(lambda key, mean: cem_init(mean, args.sigma_init), lambda key, s: cem_ask(key, s, n),
                      lambda key, s, x, f, d: cem_tell(s, x, f, num_elites(args), args.cem_noise),
                      lambda s: s.mean, lambda s: s.std.mean(), False)
    if args.algo == "cma-es":
        constants = cma_constants(dim, n)
        return Method(lambda key, mean: cma_init(mean, args.sigma_init), lambda key, s: cma_ask(key, s, n),
                      lambda key, s, x, f, d: cma_tell(s, x, f, constants), lambda s: s.mean, lambda s: s.sigma, False)
    if args.algo == "nes":
        return Method(lambda key, mean: nes_init(mean, args.sigma_init, args.learning_rate),
                      lambda key, s: nes_ask(key, s, n),
                      lambda key, s, x, f, d: nes_tell(s, x, f, args.sigma_decay, args.sigma_limit, args.lr_decay),
                      lambda s: s.mean, lambda s: s.sigma, False)
    if args.algo == "openai-es":
        return Method(lambda key, mean: openai_es_init(mean, args.sigma_init, args.learning_rate),
                      lambda key, s: openai_es_ask(key, s, n),
                      lambda key, s, x, f, d: openai_es_tell(s, x, f, args.weight_decay, args.sigma_decay,
                                                             args.sigma_limit, args.lr_decay),
                      lambda s: s.mean, lambda s: s.sigma, False)
    if args.algo == "map-elites":
        bounds = problem.descriptor_bounds
        return Method(lambda key, mean: map_elites_init(mean, args.num_bins**2),
                      lambda key, s: map_elites_ask(key, s, n, args.sigma_init),
                      lambda key, s, x, f, d: map_elites_tell(s, x, f, d, bounds, args.num_bins),
                      lambda s: s.solutions[jnp.argmax(s.fitness)], lambda s: jnp.asarray(args.sigma_init), True)
    return make_evosax_method(args, problem)


def make_evosax_method(args: Args, problem: Problem) -> Method:
    """An evosax 0.3.2 strategy behind the same interface. evosax minimises, so it is told -fitness.

    σ: `std_init` of the strategy's default params and, where the strategy takes a `std_schedule`,
    --sigma-init decaying by --sigma-decay to --sigma-limit. Open_ES and ARS get Adam(--learning-rate);
    the others keep their own (natural-gradient) learning rates.
    """
    import optax
    from evosax.algorithms import algorithms

    name = args.algo[len("evosax:"):]
    cls = algorithms[name]
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {}
    if "std_schedule" in accepted:
        kwargs["std_schedule"] = (optax.constant_schedule(args.sigma_init) if args.sigma_decay == 1.0 else
                                  optax.exponential_decay(args.sigma_init, 1, args.sigma_decay,
                                                          end_value=args.sigma_limit))
    if name in ("Open_ES", "ARS"):
        kwargs["optimizer"] = optax.adam(args.learning_rate)
    es = cls(population_size=args.pop_size, solution=jnp.zeros(problem.num_dims), **kwargs)
    params = es.default_params
    if hasattr(params, "std_init"):
        params = params.replace(std_init=jnp.asarray(args.sigma_init, jnp.float32))

    def tell(key, state, population, fitness, descriptors):
        return es.tell(key, population, -fitness, state, params)[0]

    def sigma(state):
        return jnp.mean(state.std) if hasattr(state, "std") else jnp.asarray(jnp.nan)

    return Method(lambda key, mean: es.init(key, mean, params), lambda key, s: es.ask(key, s, params), tell,
                  lambda s: s.mean, sigma, False)


# --------------------------------------------------------------------------------------------------
# The generation loop, distributed over devices with shared seeds (Salimans et al. Algorithm 2).
# --------------------------------------------------------------------------------------------------
class LoopState(NamedTuple):
    es: Any  # the method's state (replicated on every device)
    obs_stats: RunningStats  # observation statistics (replicated)


class GenerationOutput(NamedTuple):
    fitness: jax.Array  # [pop], this generation's members
    center_fitness: jax.Array  # fitness of the centre after the update (policies: new episodes)
    sigma: jax.Array  # σ the members were drawn with
    best_member: jax.Array  # [dim], this generation's fittest member
    archive_cells: jax.Array  # MAP-Elites: filled cells after the update (-1 for the other methods)


def generation_key(seed: int, generation: int) -> jax.Array:
    """All randomness of generation g: fold_in(PRNGKey(seed), g)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), generation)


def init_loop_state(args: Args, problem: Problem, method: Method) -> LoopState:
    return LoopState(method.init(jax.random.PRNGKey(args.seed), problem.init_mean), init_running_stats(problem.obs_dim))


def make_generation(args: Args, problem: Problem, method: Method) -> Callable:
    """generation(loop_state, key) -> (loop_state, GenerationOutput), compiled; one ES generation.

    Over D > 1 JAX devices (a 1-D mesh, jax.shard_map) every device holds the whole state and
    1. rebuilds the whole population from the generation key (member i's noise from fold_in(key, i)),
    2. evaluates its own pop/D members, with the same episode keys as every other member,
    3. all-gathers the pop scalar fitnesses (and MAP-Elites' 2-float descriptors): the only exchange,
    4. applies the identical update, and evaluates the new centre (the noiseless mean policy, whose
       episodes also update the observation statistics, so those need no exchange either).
    On one device it is the same program without steps 2's slicing and 3. evosax strategies draw
    their population as one array from the key, which every device can rebuild just the same.
    """
    devices = jax.devices()
    num_devices = len(devices)
    per_device = args.pop_size // num_devices
    evaluate = jax.vmap(problem.evaluate, in_axes=(0, None, None))

    def body(loop: LoopState, key):
        key_ask, key_eval, key_tell, key_center = jax.random.split(key, 4)
        population, es_state = method.ask(key_ask, loop.es)  # every device: all members, from the seeds
        if num_devices > 1:
            first = jax.lax.axis_index("devices") * per_device
            mine = jax.lax.dynamic_slice_in_dim(population, first, per_device)  # this device's members
            fitness, descriptors = evaluate(mine, key_eval, loop.obs_stats)
            fitness = jax.lax.all_gather(fitness, "devices", tiled=True)  # pop scalars: all that is exchanged
            if method.uses_descriptors:
                descriptors = jax.lax.all_gather(descriptors, "devices", tiled=True)
        else:
            fitness, descriptors = evaluate(population, key_eval, loop.obs_stats)
        fitness = jnp.where(jnp.isnan(fitness), -jnp.inf, fitness)  # a failed member ranks last
        new_es = method.tell(key_tell, es_state, population, fitness, descriptors)
        center_fitness, obs_batch = problem.evaluate_center(method.center(new_es), key_center, loop.obs_stats)
        obs_stats = update_running_stats(loop.obs_stats, *obs_batch) if args.normalize_observations \
            else loop.obs_stats
        cells = jnp.isfinite(new_es.fitness).sum() if args.algo == "map-elites" else jnp.array(-1)
        out = GenerationOutput(fitness, center_fitness, method.sigma(loop.es), population[jnp.argmax(fitness)], cells)
        return LoopState(new_es, obs_stats), out

    if num_devices == 1:
        return jax.jit(body)
    mesh = jax.sharding.Mesh(np.array(devices), ("devices",))
    replicated = jax.sharding.PartitionSpec()
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(replicated, replicated), out_specs=replicated,
                                 check_vma=False))


def bytes_exchanged(args: Args, num_dims: int) -> Tuple[int, int]:
    """(bytes all-gathered per generation with shared seeds, bytes to broadcast the parameter vectors instead).

    Shared seeds: pop float32 fitnesses (+ 2 floats of descriptor each for MAP-Elites). Without them the
    pop perturbed vectors [pop, dim] of float32 would have to be sent out.
    """
    per_member = 3 if algo_family(args.algo) == "map-elites" else 1
    return 4 * args.pop_size * per_member, 4 * args.pop_size * num_dims


# --------------------------------------------------------------------------------------------------
# Running, saving, plotting.
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


GEN_FIELDS = ("generation", "evaluations", "best_fitness", "mean_fitness", "center_fitness", "best_so_far", "sigma",
              "archive_cells", "seconds")


def is_function(problem: str) -> bool:
    return problem in TEST_FUNCTIONS


def plot_curves(path: str, curves: dict, problem: str, x_label: str):
    """PNG of fitness curves: {label: (x [T], y [T], band [T] or None)}. Test functions are drawn as
    f = -fitness on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, (x, y, band) in curves.items():
        y = np.asarray(y, dtype=float)
        sign = -1.0 if is_function(problem) else 1.0
        ax.plot(x, sign * y, label=label)
        if band is not None:
            ax.fill_between(x, sign * (y - band), sign * (y + band), alpha=0.2)
    if is_function(problem):
        ax.set_yscale("log")
        ax.set_ylabel("f(x) = -fitness (lower is better)")
    else:
        ax.set_ylabel("return (fitness)")
    ax.set(xlabel=x_label, title=problem)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def default_run_dir(args: Args) -> str:
    algo = args.algo.replace(":", "_") if args.compare is None else "compare"
    return os.path.join("runs", f"{args.problem}__{algo}__{args.exp_name}__{args.seed}__{int(time.time())}")


def run(args: Args, run_dir: str, quiet: bool = False) -> dict:
    """One ES run (resolved args) into run_dir; returns its summary (also written to summary.json)."""
    from tqdm import tqdm

    os.makedirs(run_dir, exist_ok=True)
    write_json(os.path.join(run_dir, "args.json"), dataclasses.asdict(args))
    problem = make_problem(args)
    method = make_method(args, problem)
    gathered, broadcast = bytes_exchanged(args, problem.num_dims)
    print(f"{args.algo} on {args.problem}: {problem.num_dims} parameters, population {args.pop_size} over "
          f"{jax.device_count()} {jax.default_backend()} device(s), {args.num_generations} generations")
    print(f"exchanged per generation: {gathered:,} B all-gathered (the fitnesses; shared seeds) instead of "
          f"{broadcast:,} B to broadcast the {args.pop_size} parameter vectors")
    loop = init_loop_state(args, problem, method)
    start = time.time()
    generation = make_generation(args, problem, method).lower(loop, generation_key(args.seed, 0)).compile()
    compile_seconds = time.time() - start
    print(f"compiled in {compile_seconds:.1f}s", flush=True)

    csv_path = os.path.join(run_dir, "generations.csv")
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerow(GEN_FIELDS)
    rows, best = [], {"fitness": -np.inf, "x": np.asarray(problem.init_mean)}
    reached = None
    bar = tqdm(range(args.num_generations), desc=f"{args.algo} generations", file=sys.stdout, mininterval=0.5,
               disable=quiet)
    loop_start = time.time()
    for g in bar:
        t0 = time.time()
        loop, out = generation(loop, generation_key(args.seed, g))
        fitness = np.asarray(out.fitness)
        if fitness.max() > best["fitness"]:
            best = {"fitness": float(fitness.max()), "x": np.asarray(out.best_member)}
        row = dict(generation=g + 1, evaluations=(g + 1) * args.pop_size, best_fitness=float(fitness.max()),
                   mean_fitness=float(np.mean(fitness[np.isfinite(fitness)])) if np.isfinite(fitness).any() else None,
                   center_fitness=float(out.center_fitness), best_so_far=best["fitness"], sigma=float(out.sigma),
                   archive_cells=int(out.archive_cells) if int(out.archive_cells) >= 0 else "",
                   seconds=time.time() - t0)
        rows.append(row)
        with open(csv_path, "a", newline="") as f:
            csv.writer(f).writerow([row[k] for k in GEN_FIELDS])
        if reached is None and args.target is not None and row["center_fitness"] >= args.target:
            reached = row
        bar.set_postfix(best=f"{row['best_fitness']:.4g}", mean=f"{row['mean_fitness']:.4g}",
                        center=f"{row['center_fitness']:.4g}", sigma=f"{row['sigma']:.3g}", refresh=False)
    bar.close()
    loop_seconds = time.time() - loop_start

    generations = [r["generation"] for r in rows]
    plot_curves(os.path.join(run_dir, "fitness_curve.png"), {
        "centre (mean / best elite)": (generations, [r["center_fitness"] for r in rows], None),
        "population mean": (generations, [r["mean_fitness"] for r in rows], None),
        "best member": (generations, [r["best_fitness"] for r in rows], None),
    }, args.problem, "generation")
    center = np.asarray(method.center(loop.es))
    buffer = io.BytesIO()
    np.savez(buffer, center=center, best=best["x"], obs_mean=np.asarray(loop.obs_stats.mean),
             obs_var=np.asarray(loop.obs_stats.var), obs_count=np.asarray(loop.obs_stats.count))
    atomic_write(os.path.join(run_dir, "params.npz"), buffer.getvalue())
    summary = dict(
        algo=args.algo, problem=args.problem, seed=args.seed, num_dims=problem.num_dims, pop_size=args.pop_size,
        num_generations=len(rows), evaluations=len(rows) * args.pop_size, best_fitness=best["fitness"],
        final_mean_fitness=rows[-1]["mean_fitness"], final_center_fitness=rows[-1]["center_fitness"],
        target=args.target, generations_to_target=reached["generation"] if reached else None,
        evaluations_to_target=reached["evaluations"] if reached else None,
        final_archive_cells=rows[-1]["archive_cells"] or None, compile_seconds=compile_seconds,
        generations_per_second=len(rows) / loop_seconds, wall_seconds=time.time() - start,
        bytes_exchanged_per_generation=gathered, bytes_to_broadcast_parameters=broadcast,
        num_devices=jax.device_count(), device=jax.devices()[0].device_kind)
    write_json(os.path.join(run_dir, "summary.json"), summary)
    print(f"best member {best['fitness']:.6g}; final centre {summary['final_center_fitness']:.6g}; "
          f"target {args.target} reached at generation {summary['generations_to_target']}")
    return summary


def mean_std(values: list) -> Optional[Tuple[float, float]]:
    values = [v for v in values if v is not None]
    return (float(np.mean(values)), float(np.std(values))) if values else None


def run_compare(args: Args, run_dir: str) -> dict:
    """--compare: every method for --num-seeds seeds on one problem; compare.json, compare.png, a table."""
    algos = [a.strip() for a in args.compare.split(",") if a.strip()]
    if not algos:
        raise ArgsError("--compare needs at least one method, e.g. --compare cem,cma-es,openai-es")
    resolved = {a: [resolve_args(dataclasses.replace(args, algo=a, seed=args.seed + s, compare=None))
                    for s in range(args.num_seeds)] for a in algos}  # every error before anything runs
    os.makedirs(run_dir, exist_ok=True)
    write_json(os.path.join(run_dir, "args.json"), dataclasses.asdict(args))
    results, curves = {}, {}
    for algo, seeds in resolved.items():
        summaries, center_curves = [], []
        for a in seeds:
            sub = os.path.join(run_dir, algo.replace(":", "_"), f"seed{a.seed}")
            summaries.append(run(a, sub))
            with open(os.path.join(sub, "generations.csv")) as f:
                center_curves.append([float(r["center_fitness"]) for r in csv.DictReader(f)])
        reached = [s["generations_to_target"] for s in summaries]
        results[algo] = dict(
            pop_size=seeds[0].pop_size, num_generations=seeds[0].num_generations, num_seeds=len(seeds),
            final_center_fitness=mean_std([s["final_center_fitness"] for s in summaries]),
            best_fitness=mean_std([s["best_fitness"] for s in summaries]),
            runs_reaching_target=sum(r is not None for r in reached),
            generations_to_target=mean_std(reached),
            evaluations_to_target=mean_std([s["evaluations_to_target"] for s in summaries]),
            generations_per_second=mean_std([s["generations_per_second"] for s in summaries]),
            summaries=summaries)
        c = np.array(center_curves)
        curves[algo] = ((np.arange(c.shape[1]) + 1) * seeds[0].pop_size, c.mean(0), c.std(0) if len(c) > 1 else None)
    plot_curves(os.path.join(run_dir, "compare.png"), curves, args.problem, "evaluations")
    write_json(os.path.join(run_dir, "compare.json"), dict(problem=args.problem, target=resolved[algos[0]][0].target,
                                                          results=results))
    fmt = lambda ms, p="{:.4g}": "-" if ms is None else (p + " ± " + p).format(*ms)
    print(f"\n| method | pop | generations | final centre fitness | reached target {resolved[algos[0]][0].target} "
          f"| generations to target | evaluations to target |\n| --- | --- | --- | --- | --- | --- | --- |")
    for algo, r in results.items():
        print(f"| {algo} | {r['pop_size']} | {r['num_generations']} | {fmt(r['final_center_fitness'])} | "
              f"{r['runs_reaching_target']}/{r['num_seeds']} | {fmt(r['generations_to_target'], '{:.1f}')} | "
              f"{fmt(r['evaluations_to_target'], '{:.0f}')} |")
    return results


def main(args: Args) -> str:
    """Run one method (or --compare several); returns the run directory."""
    try:
        if args.distributed:
            jax.distributed.initialize()  # several hosts: jax.devices() then lists every host's devices
        if args.num_seeds > 1 and args.compare is None:
            args = dataclasses.replace(args, compare=args.algo)
        if args.compare is not None:
            if args.num_seeds <= 0:
                raise ArgsError(f"--num-seeds must be positive, got {args.num_seeds}")
            run_dir = args.run_dir or default_run_dir(args)
            run_compare(args, run_dir)
        else:
            args = resolve_args(args)
            run_dir = args.run_dir or default_run_dir(args)
            run(args, run_dir)
    except ArgsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"run directory: {run_dir}")
    return run_dir


if __name__ == "__main__":
    main(tyro.cli(Args))
