# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""Stacked per-step KLs equal per-site KLs; masks under Independent."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from pyro_markov_kl import TraceMarkovKL_ELBO
from pyro_markov_kl.batched_kl import is_stackable, stack_distributions
from pyro_markov_kl.kl import compute_kl, find_kl_rule

T, B, Z = 6, 4, 3


def make_pair(kind, g):
    loc = torch.randn(B, Z, generator=g)
    if kind == "normal":
        return dist.Normal(loc, 0.5 + torch.rand(B, Z, generator=g)).to_event(1)
    if kind == "mvn":
        tril = torch.randn(B, Z, Z, generator=g).tril(-1) + torch.eye(Z) * 1.5
        return dist.MultivariateNormal(loc, scale_tril=tril)
    if kind == "lowrank":
        return dist.LowRankMultivariateNormal(
            loc, torch.randn(B, Z, 2, generator=g), 0.5 + torch.rand(B, Z, generator=g)
        )
    if kind == "bernoulli":
        return dist.Bernoulli(logits=loc)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["normal", "mvn", "lowrank", "bernoulli"])
def test_stacked_kl_equals_per_site(kind):
    g = torch.Generator().manual_seed(0)
    qs = [make_pair(kind, g) for _ in range(T)]
    ps = [make_pair(kind, g) for _ in range(T)]
    assert all(is_stackable(d) for d in qs + ps)
    rule, why = find_kl_rule(qs[0], ps[0])
    assert rule is not None, why
    stacked = compute_kl("z", stack_distributions(qs), stack_distributions(ps), rule)
    each = torch.stack([compute_kl("z", q, p, rule) for q, p in zip(qs, ps)])
    assert stacked.shape == each.shape
    assert torch.allclose(stacked, each, rtol=1e-6, atol=1e-6)


def test_user_subclass_is_not_stacked():
    class MyNormal(torch.distributions.Normal):
        pass

    assert not is_stackable(MyNormal(0.0, 1.0))
    assert is_stackable(dist.Normal(0.0, 1.0))


def markov_model(data, mask, anneal=None):
    z = torch.zeros(B, Z)
    with pyro.plate("b", B):
        for t in range(T):
            # KL annealing in the model only, as Pyro's DMM: a tensor factor is a new tensor at
            # every site (poutine.scale multiplies), so model and guide factors are never the
            # same objects
            with poutine.scale(scale=1.0 if anneal is None else anneal):
                z = pyro.sample(
                    f"z_{t}", dist.Normal(0.8 * z, 1.0).mask(mask[:, t : t + 1]).to_event(1)
                )
            pyro.sample(f"x_{t}", dist.Normal(z, 1.0).to_event(1), obs=data[:, t])


def markov_guide(data, mask, anneal=None):
    w = pyro.param("w", torch.tensor(0.5))
    z = torch.zeros(B, Z)
    with pyro.plate("b", B):
        for t in range(T):
            with poutine.mask(mask=mask[:, t].bool()):
                z = pyro.sample(f"z_{t}", dist.Normal(w * z + data[:, t], 0.7).to_event(1))


@pytest.mark.parametrize(
    "anneal", [None, 0.3, torch.tensor(0.3)], ids=["no-annealing", "float", "tensor"]
)
def test_batched_loss_equals_unbatched_loss(anneal, monkeypatch):
    from pyro_markov_kl import terms

    pyro.clear_param_store()
    data = torch.randn(B, T, Z)
    mask = (torch.rand(B, T) < 0.7).float()  # a float mask, as in Pyro's DMM
    mask[0, 0] = 0.0  # factors differ between model and guide somewhere
    elbo = TraceMarkovKL_ELBO(max_plate_nesting=1)
    plan = elbo.explain(markov_model, markov_guide, data, mask, anneal)
    assert plan.kl_groups == (tuple(f"z_{t}" for t in range(T)),)
    assert plan.analytic_sites() == tuple(f"z_{t}" for t in range(T))
    calls = []
    compute_kl_ = terms.compute_kl
    monkeypatch.setattr(terms, "compute_kl", lambda *a: calls.append(a[0]) or compute_kl_(*a))
    pyro.set_rng_seed(0)
    batched = elbo.differentiable_loss(markov_model, markov_guide, data, mask, anneal)
    # one KL call for all steps: the factors that differ between model and guide (the guide's
    # poutine.mask against the model's .mask(), the model-only annealing) do not unbatch it
    assert len(calls) == 1 and "stacked with" in calls[0]
    unbatched_plan = plan.__class__(**{**plan.__dict__, "kl_groups": ()})
    key = next(iter(elbo.plan_cache))
    elbo.plan_cache.check_at, elbo.plan_cache.check_every = (), 0  # keep the altered plan
    elbo.plan_cache[key] = unbatched_plan
    pyro.set_rng_seed(0)
    unbatched = elbo.differentiable_loss(markov_model, markov_guide, data, mask, anneal)
    assert len(calls) == 1 + T
    assert torch.allclose(batched, unbatched, rtol=1e-6, atol=1e-5)
    (g1,) = torch.autograd.grad(batched, [pyro.param("w").unconstrained()])
    (g2,) = torch.autograd.grad(unbatched, [pyro.param("w").unconstrained()])
    assert torch.allclose(g1, g2, rtol=1e-5, atol=1e-5)


def test_batched_term_with_learned_annealing_keeps_its_gradient():
    # a scale that requires grad, in the model only: d/ds of s * E_q[log p] - E_q[log q]
    # is E_q[log p] = -KL - H, which the stacked term -s (KL + H) + H keeps
    pyro.clear_param_store()
    data = torch.randn(B, T, Z)
    mask = torch.ones(B, T)
    s = torch.tensor(0.4, requires_grad=True)
    elbo = TraceMarkovKL_ELBO(max_plate_nesting=1)
    pyro.set_rng_seed(0)
    loss = elbo.differentiable_loss(markov_model, markov_guide, data, mask, s)
    (grad,) = torch.autograd.grad(loss, [s])
    pyro.set_rng_seed(0)
    guide_trace = poutine.trace(markov_guide).get_trace(data, mask)
    model_trace = poutine.trace(poutine.replay(markov_model, trace=guide_trace)).get_trace(
        data, mask
    )
    expected = 0.0
    for t in range(T):
        q = guide_trace.nodes[f"z_{t}"]["fn"].base_dist  # Normal
        p = model_trace.nodes[f"z_{t}"]["fn"].base_dist.base_dist  # Normal under a True mask
        expected = expected + (torch.distributions.kl_divergence(q, p) + q.entropy()).sum()
    assert torch.allclose(grad, expected.detach(), rtol=1e-5)


MASK = torch.tensor([True, False, True])


def masked_inside_model():
    with pyro.plate("b", B):
        pyro.sample("z", dist.Normal(torch.zeros(B, Z), 1.0).mask(MASK).to_event(1))


def test_mask_varying_inside_event_is_handled_element_by_element():
    def guide():
        with pyro.plate("b", B):
            pyro.sample("z", dist.Normal(torch.ones(B, Z), 0.5).to_event(1))

    plan = TraceMarkovKL_ELBO(max_plate_nesting=1).explain(masked_inside_model, guide)
    assert plan.sites["z"].estimator == "analytic"
    # sum over elements of m_i E_q[log p_i] - E_q[log q_i] = m_i (-KL_i - H_i) + H_i
    q, p = dist.Normal(1.0, 0.5), dist.Normal(0.0, 1.0)
    kl, h = torch.distributions.kl_divergence(q, p), q.entropy()
    exact = B * sum(float(m) * (-kl - h) + h for m in MASK)
    loss = TraceMarkovKL_ELBO(max_plate_nesting=1).loss(masked_inside_model, guide)
    assert loss == pytest.approx(-exact.item(), rel=1e-5)


def test_mask_inside_event_that_cannot_be_lowered_uses_mc():
    def guide():
        with pyro.plate("b", B):
            pyro.sample("z", dist.MultivariateNormal(torch.ones(B, Z), torch.eye(Z)))

    plan = TraceMarkovKL_ELBO(max_plate_nesting=1).explain(masked_inside_model, guide)
    assert plan.sites["z"].estimator == "mc"
    assert "varies inside the event" in plan.sites["z"].reason


def test_stacking_declines_what_does_not_stack():
    # parameters whose shapes differ beyond the batch and event shapes, mixed parameterisations
    # and Pyro subclasses with other constructors: None, so the sites are computed one by one
    cat3, cat4 = dist.Categorical(logits=torch.zeros(3)), dist.Categorical(logits=torch.zeros(4))
    assert cat3.batch_shape == cat4.batch_shape and cat3.event_shape == cat4.event_shape
    assert stack_distributions([cat3, cat4]) is None
    low1 = dist.LowRankMultivariateNormal(torch.zeros(3), torch.ones(3, 1), torch.ones(3))
    low2 = dist.LowRankMultivariateNormal(torch.zeros(3), torch.ones(3, 2), torch.ones(3))
    assert stack_distributions([low1, low2]) is None
    mixed = [dist.Bernoulli(probs=torch.tensor(0.3)), dist.Bernoulli(logits=torch.tensor(0.3))]
    assert stack_distributions(mixed) is None
    assert not is_stackable(dist.OrderedLogistic(torch.zeros(2), torch.tensor([-1.0, 1.0])))
    assert not is_stackable(dist.OMTMultivariateNormal(torch.zeros(2), torch.eye(2)))


@pytest.mark.parametrize("validate", [True, False])
def test_unstackable_groups_fall_back_to_per_site_terms(validate):
    # repeated observations of one signature whose parameters do not stack: Trace_ELBO's loss
    y = torch.tensor([1, 2])

    def model():
        for t, k in enumerate((3, 4)):  # Categoricals over 3 and then 4 categories
            pyro.sample(f"y_{t}", dist.Categorical(logits=torch.arange(float(k))), obs=y[t])
        cuts = torch.tensor([-1.0, 1.0])
        for t in range(2):
            pyro.sample(f"o_{t}", dist.OrderedLogistic(torch.tensor(0.5 * t), cuts), obs=y[t])

    with pyro.validation_enabled(validate):
        ours = TraceMarkovKL_ELBO().loss(model, lambda: None)
        theirs = Trace_ELBO().loss(model, lambda: None)
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_stacked_probabilities_keep_the_gradient_of_a_zero_probability():
    # Categorical(probs=...) rebuilt from logits would clamp a zero probability and lose its
    # gradient, d/dP_j log(P_y / sum P) = -1 / sum P
    y = torch.tensor([0, 2])

    def model():
        p = pyro.param("P", torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]))
        for t in range(2):
            pyro.sample(f"y_{t}", dist.Categorical(probs=p[t]), obs=y[t])

    grads = []
    for cls in (Trace_ELBO, TraceMarkovKL_ELBO):
        pyro.clear_param_store()
        loss = cls().differentiable_loss(model, lambda: None)
        grads.append(torch.autograd.grad(loss, [pyro.param("P").unconstrained()])[0])
    assert grads[1][0, 1] == pytest.approx(1 / 3)  # -d(log P_0 / sum P)/dP_1 = 1 / sum P
    assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=1e-7)
