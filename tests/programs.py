# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""Small models and guides shared by several test modules (score-function baselines,
enumeration)."""

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

# A discrete k_i and a Gaussian z_i per element of a plate, with an optional mask on every
# site of masked elements (as for padded sequences) and optional subsampling.


def local_model(data, mask=None, subsample_size=None):
    with pyro.plate("n", len(data), subsample_size=subsample_size) as idx:
        with poutine.mask(mask=True if mask is None else mask[idx]):
            k = pyro.sample("k", dist.Bernoulli(0.4))
            z = pyro.sample("z", dist.Normal(1.5 * k - 0.5, 0.8))
            pyro.sample("x", dist.Normal(z + 0.3 * z**2, 0.5), obs=data[idx])


def local_guide(data, mask=None, subsample_size=None):
    u = pyro.param("u", torch.tensor([0.5, -0.5]))
    v = pyro.param("v", torch.tensor([0.2, 0.4]))
    with pyro.plate("n", len(data), subsample_size=subsample_size) as idx:
        x = data[idx]
        with poutine.mask(mask=True if mask is None else mask[idx]):
            k = pyro.sample("k", dist.Bernoulli(logits=u[0] * x + u[1]))
            pyro.sample("z", dist.Normal(v[0] * x + v[1] * k, 0.7))


# The guide samples a global g after the plate, from sum(k): g's term and, through g, every
# element of x depend on every k_i. Element i's cost must hold all of x (TraceGraph_ELBO keeps
# x_i only, and is biased here), and the plate cannot give k a baseline (the particles can).


def global_model(data):
    g = pyro.sample("g", dist.Normal(torch.zeros(1), 1.0))
    with pyro.plate("n", len(data)):
        k = pyro.sample("k", dist.Bernoulli(0.4))
        pyro.sample("x", dist.Normal(g + k, 0.5), obs=data)


def global_guide(data):
    u = pyro.param("u", torch.tensor([0.5, -0.5]))
    c = pyro.param("c", torch.tensor(2.0))
    with pyro.plate("n", len(data)):
        k = pyro.sample("k", dist.Bernoulli(logits=u[0] * data + u[1]))
    pyro.sample("g", dist.Normal(c * k.sum(-1, keepdim=True), 1.0))


DATA = torch.tensor([0.3, -1.2, 2.0, 0.7, 1.1, -0.4])
