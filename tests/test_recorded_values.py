# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
A latent that reaches a later site only through a value recorded at a site
(``pyro.deterministic``, an observed value computed from it) or through a factor
a handler scales or masks a site by (``poutine.scale``, ``poutine.mask``) is a
dependency like any other: the score-function costs include the terms it
reaches, and the analytic KL is not used where such a hidden model parent is a
guide descendant. Each program here was silently biased before provenance
survived recording (loss or gradient tens of standard errors off).
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import exact, fresh_params, loss_and_grad_stats, z_scores
from pyro import poutine
from pyro.infer import Trace_ELBO

from pyro_markov_kl import TraceMarkovKL_ELBO

# backward guides are part of these tests: TraceMarkovKL_ELBO's GuideOrderWarning (issue 13) is
# expected there
pytestmark = pytest.mark.filterwarnings("ignore:Failed to verify mean field restriction")

N_SE = 5.0
X_OBS = torch.tensor(1.5)


# --- a Bernoulli gating an observation: score-function costs ----------------------------
def gate_deterministic():
    r = pyro.sample("r", dist.Bernoulli(0.3))
    d = pyro.deterministic("d", torch.where(r > 0, 2.0, -1.0))
    pyro.sample("x", dist.Normal(d, 1.0), obs=X_OBS)


def gate_mask():
    r = pyro.sample("r", dist.Bernoulli(0.3))
    with poutine.mask(mask=r > 0):
        pyro.sample("x", dist.Normal(2.0, 1.0), obs=X_OBS)


def gate_scale():
    r = pyro.sample("r", dist.Bernoulli(0.3))
    with poutine.scale(scale=1.0 + 2.0 * r):
        pyro.sample("x", dist.Normal(0.0, 1.0), obs=X_OBS)


def gate_observed_value():
    r = pyro.sample("r", dist.Bernoulli(0.3))
    y = pyro.sample("y", dist.Normal(0.0, 3.0), obs=torch.where(r > 0, 2.0, -1.0))
    pyro.sample("x", dist.Normal(y, 1.0), obs=X_OBS)


def gate_guide():
    pyro.sample("r", dist.Bernoulli(logits=pyro.param("p")))


def exact_gate_loss(model):
    """-ELBO by enumerating r: sum_r q(r) [log p(r, x) - log q(r)], scales and masks included."""
    logits = pyro.param("p")
    q = dist.Bernoulli(logits=logits)
    total = 0.0
    for r in (0.0, 1.0):
        r = torch.tensor(r)
        trace = poutine.trace(poutine.condition(model, data={"r": r})).get_trace()
        log_q = q.log_prob(r)
        total = total + log_q.exp() * (trace.log_prob_sum() - log_q)
    return -total


GATES = [gate_deterministic, gate_mask, gate_scale, gate_observed_value]


@pytest.mark.parametrize("model", GATES, ids=lambda m: m.__name__)
def test_score_function_cost_sees_the_gate(model):
    params = list(fresh_params(p=0.2).values())
    reference = exact(exact_gate_loss(model), params)
    pyro.set_rng_seed(0)
    elbo = TraceMarkovKL_ELBO(num_particles=5000, vectorize_particles=True, max_plate_nesting=0)
    ours = loss_and_grad_stats(elbo, model, gate_guide, params, 20)
    z = z_scores(ours, reference)
    assert z["loss"] < N_SE, (ours, reference)
    assert float(z["grad"].max()) < N_SE, (ours, reference)
    # the observation is in the cost of r, through the recorded value or the factor
    assert "x" in elbo.explain(model, gate_guide).sites["r"].downstream


# --- a hidden model parent that is a guide descendant: the analytic KL is biased -----------
def _hidden(kind):
    def model():
        u = pyro.sample("u", dist.Normal(0.0, 1.0))
        if kind == "deterministic":
            d = pyro.deterministic("d", 0.8 * u)
            z = pyro.sample("z", dist.Normal(d, 1.0))
        elif kind == "observed_value":
            y = pyro.sample("y", dist.Normal(0.0, 2.0), obs=0.8 * u)
            z = pyro.sample("z", dist.Normal(y, 1.0))
        elif kind == "scale":
            with poutine.scale(scale=torch.sigmoid(2.0 * u)):
                z = pyro.sample("z", dist.Normal(0.5, 1.0))
        else:
            with poutine.mask(mask=u > 0):
                z = pyro.sample("z", dist.Normal(0.5, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.3))

    model.__name__ = f"hidden_{kind}"
    return model


def hidden_guide():
    # u is sampled after z and depends on it: a guide descendant of z
    z = pyro.sample("z", dist.Normal(pyro.param("m"), 0.7))
    pyro.sample("u", dist.Normal(1.5 * z + pyro.param("b"), 0.8))


HIDDEN = [_hidden(k) for k in ("deterministic", "observed_value", "scale", "mask")]


@pytest.mark.parametrize("model", HIDDEN, ids=lambda m: m.__name__)
def test_hidden_model_parent_gets_monte_carlo(model):
    params = list(fresh_params(m=1.0, b=0.5).values())
    plan = TraceMarkovKL_ELBO().explain(model, hidden_guide)
    assert "u" in plan.sites["z"].model_parents
    assert plan.sites["z"].estimator == "mc", plan
    assert plan.sites["u"].estimator == "analytic", plan
    pyro.set_rng_seed(1)
    kwargs = dict(num_particles=5000, vectorize_particles=True, max_plate_nesting=0)
    ours = loss_and_grad_stats(TraceMarkovKL_ELBO(**kwargs), model, hidden_guide, params, 20)
    reference = loss_and_grad_stats(Trace_ELBO(**kwargs), model, hidden_guide, params, 20)
    z = z_scores(ours, reference)
    assert z["loss"] < N_SE, (ours, reference)
    assert float(z["grad"].max()) < N_SE, (ours, reference)


def test_deterministic_value_keeps_its_provenance_downstream():
    """The value pyro.deterministic returns carries the latents it came from, not only 'd'."""

    def model():
        u = pyro.sample("u", dist.Normal(0.0, 1.0))
        d = pyro.deterministic("d", u + 1.0)
        pyro.sample("v", dist.Normal(d, 1.0))

    def guide():
        pyro.sample("u", dist.Normal(0.0, 1.0))
        pyro.sample("v", dist.Normal(0.0, 1.0))

    plan = TraceMarkovKL_ELBO().explain(model, guide)
    assert plan.sites["v"].model_parents == frozenset({"u"})
    assert plan.model.parents["d"] >= {"u"}


class _Shared(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)
        self.h = None


def test_model_reads_state_the_guide_computed():
    """
    The guide leaves a tensor computed from z1 on a shared module and the model
    reads it for z0: one tracker follows both runs, so z1 is z0's model parent
    (a guide descendant of z0: Monte Carlo), as Trace_ELBO's agreement confirms.
    """
    params = list(fresh_params(a=0.5).values())
    shared = _Shared()

    def guide(x):
        pyro.module("shared", shared)
        z0 = pyro.sample("z0", dist.Normal(pyro.param("a"), 1.0))
        z1 = pyro.sample("z1", dist.Normal(2.0 * z0, 1.0))
        shared.h = shared.lin(z1.unsqueeze(-1)).squeeze(-1)

    def model(x):
        pyro.module("shared", shared)
        z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
        z0 = pyro.sample("z0", dist.Normal(shared.h, 1.0))  # = lin(z1)
        pyro.sample("x", dist.Normal(z0 + z1, 1.0), obs=x)

    x = torch.tensor(2.0)
    plan = TraceMarkovKL_ELBO().explain(model, guide, x)
    assert plan.sites["z0"].model_parents == frozenset({"z1"})
    assert plan.sites["z0"].estimator == "mc"
    pyro.set_rng_seed(3)
    kwargs = dict(num_particles=2000, vectorize_particles=True, max_plate_nesting=0)
    params = params + list(shared.parameters())
    ours = loss_and_grad_stats(TraceMarkovKL_ELBO(**kwargs), model, guide, params, 20, x)
    reference = loss_and_grad_stats(Trace_ELBO(**kwargs), model, guide, params, 20, x)
    z = z_scores(ours, reference)
    assert z["loss"] < N_SE and float(z["grad"].max()) < N_SE, (ours, reference)
