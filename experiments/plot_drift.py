"""The drift pictures of docs/dpo.md and docs/lpo.md: a learned lpo.py drift beside PPO's and DPO's (not collected).

The paper's Fig. 1 and 3: ∂/∂r of the objective r·A - f(r, A) over r ∈ [0.01, 2] and A ∈ [-2, 2], one panel per
drift, the learned drift's PPO term at --clip-coef. Writes <out>/drift.png (by default into the meta-training run
directory it names, else into the current directory, never into the shipped drifts/ folder).

    python experiments/plot_drift.py --drift drifts/lpo_classic_v1.msgpack --out docs/lpo
"""

import dataclasses
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from matplotlib.figure import Figure

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lpo  # noqa: E402


@dataclasses.dataclass
class Plot:
    """Draw a learned drift beside PPO's and DPO's."""

    drift: str = "drifts/lpo_classic.msgpack"
    """a learned drift: a .msgpack written by lpo.py or a meta-training run directory"""
    out: str | None = None
    """folder of drift.png; None: the run directory --drift names, or the current directory for a drift file"""
    clip_coef: float = 0.2
    """PPO's ε, in PPO's drift and in the learned drift's PPO term"""


def plot_drift(plot: Plot) -> str:
    """Draw <out>/drift.png; returns its path. Exits with lpo.py's one-line error if the drift file is damaged."""
    try:
        net, ppo_init, _ = lpo.load_drift(plot.drift)
    except lpo.ArgsError as e:
        sys.exit(f"error: {e}")
    drifts = {
        "PPO": functools.partial(lpo.ppo_drift, clip_coef=plot.clip_coef),
        "DPO": lpo.dpo_drift,
        "learned": functools.partial(lpo.lpo_drift, net, ppo_init=ppo_init, clip_coef=plot.clip_coef),
    }
    folder = plot.out or (plot.drift if os.path.isdir(plot.drift) else ".")
    os.makedirs(folder, exist_ok=True)
    ratios = jnp.linspace(0.01, 2.0, 200)
    advantages = jnp.linspace(-2.0, 2.0, 161)
    grads = {}
    for name, drift in drifts.items():

        def objective(r, a, drift=drift):
            return r * a - drift(jnp.log(r), a)

        grads[name] = np.asarray(jax.vmap(jax.vmap(jax.grad(objective), (0, None)), (None, 0))(ratios, advantages))
    # one colour scale for every panel, so that their colours compare; the 98th percentile over all of them, since
    # DPO's log r term blows up near r = 0 and would swamp the rest
    bound = max(float(np.percentile(np.abs(np.stack(list(grads.values()))), 98)), 1e-6)
    fig = Figure(figsize=(4.2 * len(drifts), 3.6), layout="tight")
    for ax, (name, grad) in zip(fig.subplots(1, len(drifts), squeeze=False)[0], grads.items()):
        image = ax.imshow(
            grad, origin="lower", aspect="auto", cmap="RdBu", vmin=-bound, vmax=bound, extent=(0.01, 2.0, -2.0, 2.0)
        )
        ax.set(title=name, xlabel="ratio r", ylabel="advantage A")
        fig.colorbar(image, ax=ax, label="∂/∂r (r·A - f), shared scale (clipped)")
    path = os.path.join(folder, "drift.png")
    fig.savefig(path)
    return path


if __name__ == "__main__":
    print(plot_drift(tyro.cli(Plot)))
