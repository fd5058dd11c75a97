# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""JitTraceEnumMarkovKL_ELBO: compiled once per structure, the same estimator as the eager class."""

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer import config_enumerate
from pyro.ops.indexing import Vindex

from pyro_markov_kl import JitTraceEnumMarkovKL_ELBO, TraceEnumMarkovKL_ELBO

LOCS = torch.tensor([-1.0, 1.0])


@config_enumerate
def model(data):
    trans = pyro.param(
        "trans", torch.tensor([[0.8, 0.2], [0.3, 0.7]]), constraint=constraints.simplex
    )
    x, z = 0, torch.zeros(())
    for t in pyro.markov(range(len(data))):
        x = pyro.sample(f"x_{t}", dist.Categorical(Vindex(trans)[x]))
        z = pyro.sample(f"z_{t}", dist.Normal(0.5 * z, 1.0))
        pyro.sample(f"y_{t}", dist.Normal(z + Vindex(LOCS)[x], 0.5), obs=data[t])


def guide(data):
    w = pyro.param("w", torch.tensor(0.3))
    b = pyro.param("b", torch.zeros(len(data)))
    z = torch.zeros(())
    for t in pyro.markov(range(len(data))):
        z = pyro.sample(f"z_{t}", dist.Normal(w * z + b[t], 0.8))


DATA = torch.tensor([0.5, -1.2, 0.9, 1.4])


def _elbos():
    return (
        JitTraceEnumMarkovKL_ELBO(max_plate_nesting=0, ignore_jit_warnings=True),
        TraceEnumMarkovKL_ELBO(max_plate_nesting=0),
    )


def test_compiles_once_and_analyses_once():
    pyro.clear_param_store()
    jit_elbo, _ = _elbos()
    for _ in range(3):
        jit_elbo.loss_and_grads(model, guide, DATA)
    jit_elbo.loss(model, guide, DATA)  # the same graph serves the loss
    assert jit_elbo.num_compiled == 1  # no retracing on later calls
    assert len(jit_elbo.plan_cache) == 1  # the traced run found the eager run's plan
    plan = jit_elbo.explain(model, guide, DATA)
    assert set(plan.analytic_sites()) == {f"z_{t}" for t in range(len(DATA))}
    assert plan.model_enumerated == tuple(f"x_{t}" for t in range(len(DATA)))
    # a new shape compiles a new graph, with its own plan
    jit_elbo.loss(model, guide, DATA[:3])
    assert jit_elbo.num_compiled == 2


def test_same_seed_same_loss_and_gradients_as_eager():
    pyro.clear_param_store()
    jit_elbo, eager = _elbos()
    jit_elbo.loss(model, guide, DATA)  # compile
    params = [pyro.param(n).unconstrained() for n in ("trans", "w", "b")]
    for seed in range(3):
        pyro.set_rng_seed(seed)
        loss_jit = jit_elbo.differentiable_loss(model, guide, DATA)
        g_jit = torch.autograd.grad(loss_jit, params)
        pyro.set_rng_seed(seed)
        loss_eager = eager.differentiable_loss(model, guide, DATA)
        g_eager = torch.autograd.grad(loss_eager, params)
        assert torch.allclose(loss_jit, loss_eager, atol=1e-5), (loss_jit, loss_eager)
        for a, b in zip(g_jit, g_eager):
            assert torch.allclose(a, b, atol=1e-5), (a, b)
        pyro.set_rng_seed(seed)
        assert abs(jit_elbo.loss(model, guide, DATA) - loss_eager.item()) < 1e-4


def test_svi_trains():
    pyro.clear_param_store()
    jit_elbo, _ = _elbos()
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), jit_elbo)
    losses = [svi.step(DATA) for _ in range(30)]
    assert all(torch.isfinite(torch.tensor(losses)))
