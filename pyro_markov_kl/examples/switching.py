# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

r"""
A switching state-space model trained with score-function gradients for its
regimes and analytic KL for its continuous states.

Model, for each sequence and :math:`t = 1..T`:

.. math::

    r_t &\sim \mathrm{Bernoulli}(\pi_{r_{t-1}}), \\
    z_t &\sim \mathcal{N}(a_{r_t} z_{t-1} + c_{r_t},\ \sigma_{r_t}^2), \\
    x_t &\sim \mathcal{N}(z_t,\ \sigma_x^2).

Guide (forward, Markov): :math:`q(r_t \mid z_{t-1}, x_t)` Bernoulli and
:math:`q(z_t \mid r_t, z_{t-1}, x_t)` Normal, both small neural networks. The
regimes are not reparameterisable, so :class:`~pyro_markov_kl.TraceMarkovKL_ELBO`
gives them score-function terms whose costs contain the analytic per-step KLs
of the :math:`r_t` and :math:`z_t` sites. The data are simulated from the model
with fixed parameters (a slowly and a quickly reverting regime).

Run ``python -m pyro_markov_kl.examples.switching --elbo {markov-kl,tracegraph,trace}``.
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO, TraceGraph_ELBO
from pyro.optim import ClippedAdam
from torch import nn

from pyro_markov_kl import TraceMarkovKL_ELBO

TRUE_PARAMS = dict(
    stay=torch.tensor([0.9, 0.8]),
    a=torch.tensor([0.95, -0.5]),
    c=torch.tensor([0.0, 1.0]),
    sigma=torch.tensor([0.2, 0.6]),
    sigma_x=0.3,
)


def simulate(num_sequences: int = 20, T: int = 25, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Sample regimes, states and observations from the model with :data:`TRUE_PARAMS`."""
    g = torch.Generator().manual_seed(seed)
    p = TRUE_PARAMS
    r = torch.zeros(num_sequences, T, dtype=torch.long)
    z = torch.zeros(num_sequences, T)
    r_prev = torch.zeros(num_sequences, dtype=torch.long)
    z_prev = torch.zeros(num_sequences)
    for t in range(T):
        stay = torch.rand(num_sequences, generator=g) < p["stay"][r_prev]
        r_t = torch.where(stay, r_prev, 1 - r_prev)
        z_t = (
            p["a"][r_t] * z_prev
            + p["c"][r_t]
            + p["sigma"][r_t] * torch.randn(num_sequences, generator=g)
        )
        r[:, t], z[:, t] = r_t, z_t
        r_prev, z_prev = r_t, z_t
    x = z + p["sigma_x"] * torch.randn(num_sequences, T, generator=g)
    return {"x": x, "r": r, "z": z}


class SwitchingSSM(nn.Module):
    """Model and guide of a two-regime switching linear-Gaussian state-space model."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.logit_stay = nn.Parameter(torch.zeros(2))
        self.a = nn.Parameter(torch.tensor([0.5, 0.0]))
        self.c = nn.Parameter(torch.tensor([0.0, 0.5]))
        self.log_sigma = nn.Parameter(torch.zeros(2).log1p())
        self.log_sigma_x = nn.Parameter(torch.tensor(0.0))
        self.regime_net = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.state_net = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def model(self, x: torch.Tensor) -> None:
        pyro.module("switching", self)
        N, T = x.shape
        with pyro.plate("sequences", N, dim=-1):
            r = x.new_zeros(N).long()
            z = x.new_zeros(N)
            for t in pyro.markov(range(T)):
                # P(r_t = 1 | r_{t-1}): stay in regime 1, or leave regime 0
                stay = torch.sigmoid(self.logit_stay)[r]
                probs = torch.where(r == 1, stay, 1 - stay)
                r = pyro.sample(f"r_{t}", dist.Bernoulli(probs)).long()
                loc = self.a[r] * z + self.c[r]
                z = pyro.sample(f"z_{t}", dist.Normal(loc, self.log_sigma.exp()[r]))
                pyro.sample(f"x_{t}", dist.Normal(z, self.log_sigma_x.exp()), obs=x[..., t])

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("switching", self)
        N, T = x.shape
        with pyro.plate("sequences", N, dim=-1):
            z = x.new_zeros(N)
            for t in pyro.markov(range(T)):
                x_t = x[..., t].expand(z.shape)
                logits = self.regime_net(torch.stack([z, x_t, z * x_t], -1)).squeeze(-1)
                r = pyro.sample(f"r_{t}", dist.Bernoulli(logits=logits))
                z, x_t, r = torch.broadcast_tensors(z, x_t, r)
                loc, log_scale = self.state_net(torch.stack([z, x_t, r], -1)).unbind(-1)
                z = pyro.sample(f"z_{t}", dist.Normal(loc, log_scale.exp()))


def build_elbo(name: str, num_particles: int = 1) -> pyro.infer.ELBO:
    """``"markov-kl"``, ``"tracegraph"`` or ``"trace"``."""
    kw = dict(
        num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1
    )
    if name == "markov-kl":
        return TraceMarkovKL_ELBO(**kw)
    if name == "tracegraph":
        return TraceGraph_ELBO(**kw)
    if name == "trace":
        return Trace_ELBO(**kw)
    raise ValueError(f"unknown --elbo {name!r}; expected markov-kl, tracegraph or trace")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elbo", default="markov-kl", choices=["markov-kl", "tracegraph", "trace"])
    parser.add_argument("-n", "--num-steps", type=int, default=300)
    parser.add_argument("-lr", "--learning-rate", type=float, default=0.02)
    parser.add_argument("--num-sequences", type=int, default=20)
    parser.add_argument("-T", "--length", type=int, default=25)
    parser.add_argument("--num-particles", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    data = simulate(args.num_sequences, args.length, seed=args.seed)
    ssm = SwitchingSSM()
    elbo = build_elbo(args.elbo, args.num_particles)
    svi = SVI(ssm.model, ssm.guide, ClippedAdam({"lr": args.learning_rate}), elbo)
    slices = args.num_sequences * args.length
    start = time.time()
    for step in range(args.num_steps):
        loss = svi.step(data["x"])
        if step % 50 == 0 or step == args.num_steps - 1:
            print(f"step {step:4d}  loss per time slice {loss / slices:8.4f}")
    # evaluate with a fixed, larger number of particles and the same estimator family
    eval_elbo = build_elbo("trace", num_particles=64)
    with torch.no_grad():
        final = eval_elbo.loss(ssm.model, ssm.guide, data["x"]) / slices
    stay = torch.sigmoid(ssm.logit_stay).tolist()
    print(f"final -ELBO per time slice (Trace_ELBO, 64 particles): {final:.4f}")
    print(f"learned stay probabilities {stay}, a {ssm.a.tolist()}, c {ssm.c.tolist()}")
    print(f"elapsed {time.time() - start:.1f} s with --elbo {args.elbo}")
    return {"final_loss_per_slice": final, "seconds": time.time() - start}


if __name__ == "__main__":
    main()
