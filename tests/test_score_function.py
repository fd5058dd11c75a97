# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""Non-reparameterised guide sites: unbiased score-function gradients with analytic KL costs."""

import math
from dataclasses import replace

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import param_store_grad_stats
from pyro import poutine
from pyro.infer import TraceGraph_ELBO

from pyro_markov_kl import TraceMarkovKL_ELBO
from pyro_markov_kl.examples.switching import SwitchingSSM, simulate

PI_P, M, X_OBS = 0.3, torch.tensor([-1.0, 2.0]), 0.5


def mixture_model():
    k = pyro.sample("k", dist.Bernoulli(PI_P))
    z = pyro.sample("z", dist.Normal(M[k.long()], 1.0))
    pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(X_OBS))


def mixture_guide(baseline=None):
    def guide():
        theta = pyro.param("theta", torch.tensor(0.4))
        a = pyro.param("a", torch.tensor([0.3, 0.8]))
        log_s = pyro.param("log_s", torch.tensor(-0.3))
        infer = {"baseline": baseline} if baseline else {}
        k = pyro.sample("k", dist.Bernoulli(logits=theta), infer=infer)
        pyro.sample("z", dist.Normal(a[k.long()], log_s.exp()))

    return guide


def exact_mixture_elbo():
    r"""
    :math:`\sum_k q(k)\,[\log p(k) - \log q(k) + \mathbb{E}_{q(z|k)}\log p(z|k)
    + \mathbb{E}_{q(z|k)}\log p(x|z) + \mathrm{H}(q(z|k))]` with Gaussian closed forms.
    """
    theta, a, log_s = pyro.param("theta"), pyro.param("a"), pyro.param("log_s")
    s2 = (2 * log_s).exp()
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    total = 0.0
    for k in (0, 1):
        q_k = torch.sigmoid(theta) if k else 1 - torch.sigmoid(theta)
        p_k = PI_P if k else 1 - PI_P
        e_log_pz = -half_log_2pi - 0.5 * ((a[k] - M[k]) ** 2 + s2)
        e_log_px = -half_log_2pi - 0.5 * ((X_OBS - a[k]) ** 2 + s2)
        entropy = 0.5 * torch.log(2 * math.pi * math.e * s2)
        total = total + q_k * (math.log(p_k) - q_k.log() + e_log_pz + e_log_px + entropy)
    return total


@pytest.mark.parametrize(
    "baseline", [None, {"use_decaying_avg_baseline": True}], ids=["plain", "avg-baseline"]
)
def test_exact_gradient_with_discrete_site(baseline):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = mixture_guide(baseline)
    elbo = TraceMarkovKL_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=0)
    plan = elbo.explain(mixture_model, guide)
    assert plan.sites["k"].estimator == "analytic"  # Bernoulli-Bernoulli
    assert plan.sites["z"].estimator == "analytic"
    assert plan.sites["k"].downstream == ("x", "z")
    assert "score function at k: cost = x + z" in str(plan)
    mean_loss, se_loss, mean_grad, se_grad, params = param_store_grad_stats(
        elbo, mixture_model, guide, 20
    )
    exact = exact_mixture_elbo()
    exact_grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(-exact, params)])
    assert abs(mean_loss + exact.item()) < 5 * se_loss + 1e-6
    z = (mean_grad - exact_grad).abs() / (se_grad + 1e-7)
    assert (z < 5).all(), (mean_grad, exact_grad, se_grad)


def plated_model(data, mask):
    w = pyro.param("w_model", torch.tensor(0.7))
    g = pyro.sample("g", dist.Normal(0.0, 1.0))
    with pyro.plate("n", len(data)):
        k = pyro.sample("k", dist.Bernoulli(torch.sigmoid(g + 0.2)))
        z = pyro.sample("z", dist.Normal(torch.tanh(w * (2 * k - 1)) + 0.3 * g, 0.8))
        with poutine.mask(mask=mask):
            pyro.sample("x", dist.Normal(z + 0.2 * z**2, 0.5), obs=data)


def plated_guide(data, mask):
    g_loc = pyro.param("g_loc", torch.tensor(0.1))
    u = pyro.param("u", torch.tensor([0.5, -0.5]))
    v = pyro.param("v", torch.tensor([0.2, 0.4]))
    g = pyro.sample("g", dist.Normal(g_loc, 0.6))
    with pyro.plate("n", len(data)):
        k = pyro.sample("k", dist.Bernoulli(logits=u[0] * data + u[1] + 0.1 * g))
        loc = v[0] * data + v[1] * k + 0.1 * g
        with poutine.scale(scale=1.0):
            pyro.sample("z", dist.Normal(loc, 0.7))


def test_matches_tracegraph_with_plates_and_masks():
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    data = torch.tensor([0.3, -1.2, 2.0, 0.7])
    mask = torch.tensor([True, True, False, True])
    kw = dict(num_particles=3000, vectorize_particles=True, max_plate_nesting=1)
    ours = param_store_grad_stats(
        TraceMarkovKL_ELBO(**kw), plated_model, plated_guide, 15, data, mask
    )
    ref = param_store_grad_stats(TraceGraph_ELBO(**kw), plated_model, plated_guide, 15, data, mask)
    assert abs(ours[0] - ref[0]) < 5 * math.hypot(ours[1], ref[1])
    z = (ours[2] - ref[2]).abs() / (ours[3] ** 2 + ref[3] ** 2).sqrt()
    assert (z < 5).all(), z
    plan = TraceMarkovKL_ELBO(max_plate_nesting=1).explain(plated_model, plated_guide, data, mask)
    assert plan.analytic_sites() == ("g", "k", "z")
    # z and x depend on k; g's term does not
    assert set(plan.sites["k"].downstream) == {"x", "z"}


@pytest.mark.slow
def test_switching_model_gradient_variance_below_tracegraph():
    """Per guide parameter tensor, the gradient variance is at most TraceGraph_ELBO's, and in
    total below half of it (the issue's benchmark target). With the analytic KLs alone (no
    baseline) the total is below TraceGraph_ELBO's too, but not every tensor's: the regime
    network's ratio is about 1 (measured 0.98-1.02 at two initialisations; the KL terms in the
    cost are less noisy, but the Monte Carlo terms' noise is partly anticorrelated with the rest
    of the cost). Paired draws: draw d of every estimator follows the same seed, so all see the
    same guide samples."""
    pyro.clear_param_store()
    pyro.set_rng_seed(2)
    x = simulate(num_sequences=8, T=6, seed=3)["x"]
    ssm = SwitchingSSM()
    named = [(n, p) for n, p in ssm.named_parameters() if n.startswith(("regime", "state"))]
    kw = dict(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    elbos = {
        "ours": TraceMarkovKL_ELBO(**kw),
        "ours, no baseline": TraceMarkovKL_ELBO(leave_one_out_baseline=False, **kw),
        "tracegraph": TraceGraph_ELBO(**kw),
    }
    grads = {name: {n: [] for n, _ in named} for name in elbos}
    for d in range(60):
        for name, elbo in elbos.items():
            pyro.set_rng_seed(100 + d)
            for _, p in named:
                p.grad = None
            elbo.loss_and_grads(ssm.model, ssm.guide, x)
            for n, p in named:
                grads[name][n].append(p.grad.reshape(-1).clone())
    var = {
        name: {n: torch.stack(g).var(0).sum() for n, g in per.items()}
        for name, per in grads.items()
    }
    ratios = {
        name: {n: round((var[name][n] / var["tracegraph"][n]).item(), 3) for n, _ in named}
        for name in ("ours", "ours, no baseline")
    }
    assert all(r <= 1 for r in ratios["ours"].values()), f"variance ratios {ratios}"
    total = {
        name: (sum(var[name].values()) / sum(var["tracegraph"].values())).item() for name in ratios
    }
    assert total["ours"] <= 0.5, f"total variance ratios {total}; per parameter {ratios}"
    assert total["ours, no baseline"] < 1, f"total variance ratios {total}; per parameter {ratios}"
    print("variance ratios", ratios, "total", total)


def test_costs_reused_along_a_chain():
    """The regime at t reuses the cost of the regime at t + 1 (O(T) additions, not O(T^2)),
    with the same gradient as when every cost is summed from its terms."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x = simulate(num_sequences=4, T=5, seed=1)["x"]
    ssm = SwitchingSSM()
    elbo = TraceMarkovKL_ELBO(max_plate_nesting=1)
    plan = elbo.explain(ssm.model, ssm.guide, x)
    for t in range(4):
        rec = plan.sites[f"r_{t}"]
        assert rec.cost_base == f"r_{t + 1}"
        extra = {rec.downstream[i] for i in rec.cost_extra}
        assert extra == {f"x_{t}", f"z_{t}", f"r_{t + 1}"}
    assert plan.sites["r_4"].cost_base is None

    params = list(ssm.parameters())

    def grads():
        pyro.set_rng_seed(3)
        return torch.autograd.grad(elbo.differentiable_loss(ssm.model, ssm.guide, x), params)

    reused = grads()
    (key,) = list(elbo.plan_cache)
    elbo.plan_cache.check_at, elbo.plan_cache.check_every = (), 0  # keep the altered plan
    sites = {n: replace(r, cost_base=None) for n, r in plan.sites.items()}
    elbo.plan_cache[key] = replace(plan, sites=sites)
    summed = grads()
    for a, b in zip(reused, summed):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
