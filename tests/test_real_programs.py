# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""Patterns of Pyro's own examples: a plate without a size (SS-VAE), a float mask
of shape (B, 1) under .to_event(1) (DMM), autoguides with a joint latent, and a
guide that subsamples a plate the model declares in full (LDA)."""

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO

from pyro_markov_kl import TraceMarkovKL_ELBO

# --- a plate without a size (examples/vae/ss_vae_M2.py) --------------------------------------

N_DATA = 20
X_DATA = torch.linspace(-2.0, 2.0, N_DATA)


def ss_model(x, sized):
    with pyro.plate("data", N_DATA) if sized else pyro.plate("data"):
        y = pyro.sample("y", dist.Bernoulli(0.4 * torch.ones(x.shape[0])))
        pyro.sample("x", dist.Normal(2.0 * y - 1.0, 1.0), obs=x)


def ss_guide(x, sized):
    w = pyro.param("w", torch.tensor(0.5))
    b = pyro.param("b", torch.tensor(-0.2))
    with pyro.plate("data", N_DATA) if sized else pyro.plate("data"):
        pyro.sample("y", dist.Bernoulli(logits=w * x + b))


def ss_exact_grad(x):
    """The gradient of the exact ELBO (both values of every y_i summed out)."""
    w = torch.tensor(0.5, requires_grad=True)
    b = torch.tensor(-0.2, requires_grad=True)
    q1 = torch.sigmoid(w * x + b)
    elbo = 0.0
    for y, q, prior in ((1.0, q1, 0.4), (0.0, 1 - q1, 0.6)):
        log_p = math.log(prior) + dist.Normal(2.0 * y - 1.0, 1.0).log_prob(x)
        elbo = elbo + (q * (log_p - q.log())).sum()
    return torch.stack(torch.autograd.grad(-elbo, [b, w]))  # sorted by name


def gradient_samples(elbo, model, guide, runs, *args):
    """``runs`` independent gradients of the loss with respect to the params, (runs, P)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide(*args)  # create the params
    params = [pyro.param(n).unconstrained() for n in sorted(pyro.get_param_store().keys())]
    samples = []
    for _ in range(runs):
        loss = elbo.differentiable_loss(model, guide, *args)
        samples.append(torch.stack(torch.autograd.grad(loss, params)).reshape(-1))
    return torch.stack(samples)


def test_sizeless_plate_gets_leave_one_out_baseline():
    for sized in (True, False):
        plan = TraceMarkovKL_ELBO().explain(ss_model, ss_guide, X_DATA, sized)
        assert plan.sites["y"].baseline == f"leave-one-out over plate 'data' ({N_DATA} elements)"
    runs = 400
    grads = {
        sized: gradient_samples(TraceMarkovKL_ELBO(), ss_model, ss_guide, runs, X_DATA, sized)
        for sized in (True, False)
    }
    # the same samples give the same gradients, so the same variance
    assert torch.allclose(grads[True], grads[False], rtol=1e-5, atol=1e-6)
    reference = gradient_samples(Trace_ELBO(), ss_model, ss_guide, runs, X_DATA, False)
    exact = ss_exact_grad(X_DATA)
    for g in (grads[False], reference):
        se = g.std(0) / math.sqrt(runs)
        assert ((g.mean(0) - exact).abs() < 5 * se).all(), (g.mean(0), exact, se)
    # the baseline removes most of the variance (without it the ratio is about 1)
    ratio = grads[False].var(0) / reference.var(0)
    assert (ratio < 0.5).all(), ratio
