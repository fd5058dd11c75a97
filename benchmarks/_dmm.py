# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
Deep Markov Model set-ups shared by the benchmark scripts (not a benchmark itself).

Configurations (the model and guides are :class:`pyro_markov_kl.examples.dmm.DMM`):

* ``small``: z 16, emission 32, transition 64, guide RNN 128 (tanh), on synthetic 88-dimensional
  Bernoulli data (each key on with its own probability drawn from U(0, 0.2)), all sequences of
  the same length;
* ``example``: the defaults of ``pyro_markov_kl.examples.dmm`` (the small sizes with an RNN of
  64), on real JSB Chorales sequences;
* ``full``: Pyro's full-size DMM, z 100, emission 100, transition 200, guide RNN 600 (relu), on
  real JSB Chorales sequences (ragged, masked).
"""

from __future__ import annotations

import warnings
from typing import Dict, Tuple

import pyro
import torch

from pyro_markov_kl.data import get_mini_batch, load_jsb_chorales
from pyro_markov_kl.examples.dmm import DMM, build_elbo

SIZES = {
    "small": dict(
        z_dim=16, emission_dim=32, transition_dim=64, rnn_dim=128, rnn_nonlinearity="tanh"
    ),
    "example": dict(
        z_dim=16, emission_dim=32, transition_dim=64, rnn_dim=64, rnn_nonlinearity="tanh"
    ),
    "full": dict(
        z_dim=100, emission_dim=100, transition_dim=200, rnn_dim=600, rnn_nonlinearity="relu"
    ),
}

#: ``build_elbo`` name -> class name shown in the tables
LABELS = {
    "markov-kl": "TraceMarkovKL_ELBO",
    "trace": "Trace_ELBO",
    "meanfield": "TraceMeanField_ELBO",
}


def quiet_meanfield_warnings() -> None:
    # TraceMeanField_ELBO warns at every step with the backward guide (the point of measuring it)
    warnings.filterwarnings("ignore", message="Failed to verify mean field restriction")


def make_dmm(size: str, guide: str = "forward", seed: int = 0) -> DMM:
    """A freshly initialised DMM (seeded), with the param store cleared."""
    pyro.clear_param_store()
    torch.manual_seed(seed)
    return DMM(guide=guide, **SIZES[size])


def synthetic_batch(batch_size: int, length: int, seed: int = 0) -> tuple:
    """A mini-batch of ``batch_size`` synthetic piano rolls of ``length`` steps each."""
    g = torch.Generator().manual_seed(seed)
    rates = 0.2 * torch.rand(88, generator=g)
    sequences = torch.bernoulli(rates.expand(batch_size, length, 88), generator=g)
    lengths = torch.full((batch_size,), length, dtype=torch.long)
    return get_mini_batch(torch.arange(batch_size), sequences, lengths)


def jsb_batch(split: str = "train", batch_size: int = 20, seed: int = 0) -> tuple:
    """
    ``batch_size`` JSB sequences of ``split`` chosen by a seeded permutation (all of the split
    if ``batch_size`` is 0 or larger than the split).
    """
    data = load_jsb_chorales(split)
    n = len(data["sequence_lengths"])
    if batch_size <= 0 or batch_size >= n:
        indices = torch.arange(n)
    else:
        indices = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:batch_size]
    return get_mini_batch(indices, data["sequences"], data["sequence_lengths"])


def make_elbos(names=tuple(LABELS)) -> Dict[str, pyro.infer.ELBO]:
    return {name: build_elbo(name) for name in names}


def step_fn(elbo, dmm: DMM, batch: tuple):
    """One SVI-style step without the parameter update: gradients zeroed, loss and grads."""
    params = list(dmm.parameters())

    def step():
        for p in params:
            p.grad = None
        return elbo.loss_and_grads(dmm.model, dmm.guide, *batch)

    return step


def estimator_counts(dmm: DMM, batch: tuple) -> Tuple[int, int]:
    """(analytic, Monte Carlo) latent-site counts of TraceMarkovKL_ELBO's plan."""
    from pyro_markov_kl import TraceMarkovKL_ELBO

    plan = TraceMarkovKL_ELBO(max_plate_nesting=1).explain(dmm.model, dmm.guide, *batch)
    n_analytic = sum(1 for r in plan.sites.values() if r.estimator == "analytic")
    return n_analytic, len(plan.sites) - n_analytic


def num_slices(batch: tuple) -> int:
    return int(batch[3].sum())


def train(dmm: DMM, batch: tuple, elbo, steps: int, lr: float, clip_norm: float = 10.0) -> float:
    """``steps`` Adam steps (gradient norm clipped) on ``batch``; returns the last loss."""
    params = list(dmm.parameters())
    optim = torch.optim.Adam(params, lr=lr)
    loss = float("nan")
    for _ in range(steps):
        optim.zero_grad(set_to_none=True)
        loss = elbo.loss_and_grads(dmm.model, dmm.guide, *batch)
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optim.step()
    optim.zero_grad(set_to_none=True)
    return loss
