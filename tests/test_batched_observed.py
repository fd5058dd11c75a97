# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""Observed sites of one structure: one stacked log_prob equals the per-site terms."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from pyro_markov_kl import JitTraceMarkovKL_ELBO, TraceMarkovKL_ELBO, terms

T, B, D = 5, 4, 3


def model(data, mask, anneal):
    w = pyro.param("w", torch.tensor(0.8))
    z = torch.zeros(B, D)
    with pyro.plate("b", B):
        for t in range(T):
            m = mask[:, t : t + 1]  # a float (B, 1) mask, as Pyro's DMM passes
            with poutine.scale(scale=anneal):
                z = pyro.sample(f"z_{t}", dist.Normal(w * z, 1.0).mask(m).to_event(1))
            pyro.sample(f"x_{t}", dist.Bernoulli(logits=z).mask(m).to_event(1), obs=data[:, t])


def guide(data, mask, anneal):
    a = pyro.param("a", torch.tensor(0.3))
    z = torch.zeros(B, D)
    with pyro.plate("b", B):
        for t in range(T):
            m = mask[:, t : t + 1]
            with poutine.scale(scale=anneal):
                z = pyro.sample(f"z_{t}", dist.Normal(a * z + data[:, t], 0.7).mask(m).to_event(1))


def _inputs():
    g = torch.Generator().manual_seed(0)
    data = torch.bernoulli(torch.full((B, T, D), 0.4), generator=g)
    mask = (torch.rand(B, T, generator=g) < 0.7).float()
    mask[0, 0] = 0.0
    return data, mask, torch.tensor(0.6)


def _loss_and_grads(elbo, args, unbatched=False):
    pyro.clear_param_store()
    if unbatched:  # the same plan without observed groups: the per-site terms
        elbo.loss_and_grads(model, guide, *args)  # build the plan
        key = next(iter(elbo.plan_cache))
        plan = elbo.plan_cache[key]
        elbo.plan_cache[key] = plan.__class__(**{**plan.__dict__, "observed_groups": ()})
        elbo.plan_cache.check_at, elbo.plan_cache.check_every = (), 0
        pyro.clear_param_store()
    pyro.set_rng_seed(1)
    loss = elbo.differentiable_loss(model, guide, *args)
    params = [pyro.param("w").unconstrained(), pyro.param("a").unconstrained()]
    return loss, torch.autograd.grad(loss, params)


def test_observed_sites_are_grouped_and_stacked(monkeypatch):
    args = _inputs()
    elbo = TraceMarkovKL_ELBO(max_plate_nesting=1)
    plan = elbo.explain(model, guide, *args)
    assert plan.observed_groups == (tuple(f"x_{t}" for t in range(T)),)
    calls = []
    real = terms.batched_observed_term

    def spy(*a):
        result = real(*a)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(terms, "batched_observed_term", spy)
    batched, batched_grads = _loss_and_grads(elbo, args)
    assert calls and all(calls)  # computed stacked, every time
    calls.clear()
    unbatched, unbatched_grads = _loss_and_grads(
        TraceMarkovKL_ELBO(max_plate_nesting=1), args, unbatched=True
    )
    assert calls == [True]  # only the first step, which built the plan we then altered
    assert torch.allclose(batched, unbatched, rtol=1e-6, atol=1e-5)
    for g1, g2 in zip(batched_grads, unbatched_grads):
        assert torch.allclose(g1, g2, rtol=1e-5, atol=1e-6)


def test_stacked_observed_terms_under_the_jit_equal_eager():
    # under the JIT a mask's values are never read: the float mask (not broadcast by its
    # strides) is taken apart element by element, in one stacked call all the same
    args = _inputs()
    eager, _ = _loss_and_grads(TraceMarkovKL_ELBO(max_plate_nesting=1), args)
    jit = JitTraceMarkovKL_ELBO(max_plate_nesting=1)
    pyro.clear_param_store()  # the initial values again (no step is taken below)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        for _ in range(2):  # compile, then run the compiled graph
            pyro.set_rng_seed(1)
            loss, _ = jit.loss_and_surrogate_loss(model, guide, *args)
    (key,) = jit.plan_cache
    assert jit.plan_cache[key].observed_groups == (tuple(f"x_{t}" for t in range(T)),)
    assert torch.allclose(loss, eager, rtol=1e-5, atol=1e-4)


def test_exact_against_trace_elbo_with_guide_replayed():
    # the observed terms alone, checked independently: with the latents fixed by a guide of
    # point masses, every term is a log-density, so the loss is Trace_ELBO's exactly
    args = _inputs()

    def delta_guide(data, mask, anneal):
        with pyro.plate("b", B):
            for t in range(T):
                pyro.sample(
                    f"z_{t}", dist.Delta(data[:, t] - 0.5).mask(mask[:, t : t + 1]).to_event(1)
                )

    pyro.clear_param_store()
    ours = TraceMarkovKL_ELBO(max_plate_nesting=1).differentiable_loss(model, delta_guide, *args)
    pyro.clear_param_store()
    theirs = Trace_ELBO(max_plate_nesting=1).differentiable_loss(model, delta_guide, *args)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-5)


def test_invalid_observation_raises_as_trace_elbo_does():
    # the stacked call fails under validation; the per-site terms then raise the site's error
    data, mask, anneal = _inputs()
    data = data.clone()
    data[1, 3, 2] = 2.0  # not a Bernoulli value
    mask[1, 3] = 1.0  # at a step not masked out
    errors = []
    for cls in (Trace_ELBO, TraceMarkovKL_ELBO):
        pyro.clear_param_store()
        with pytest.raises(Exception) as info:
            cls(max_plate_nesting=1).loss(model, guide, data, mask, anneal)
        errors.append(info.value)
    assert type(errors[0]) is type(errors[1])
    assert "x_3" in str(errors[0]) and "x_3" in str(errors[1])


def test_value_broadcast_against_its_distribution_is_not_stacked():
    # without validation a distribution of batch shape () may score a value of shape (N,) by
    # broadcasting; stacked, such values would be scored against the wrong steps' parameters
    n = 3
    data = torch.randn(n, n, generator=torch.Generator().manual_seed(0))

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(n), 1.0).to_event(1))
        for t in range(n):
            pyro.sample(f"x_{t}", dist.Normal(z[t], 1.0), obs=data[t])

    def point_guide():  # every term is then a log-density: the losses are equal exactly
        pyro.sample("z", dist.Delta(torch.arange(n).float()).to_event(1))

    with pyro.validation_enabled(False):
        elbo = TraceMarkovKL_ELBO()
        assert elbo.explain(model, point_guide).observed_groups == ()
        ours = elbo.loss(model, point_guide)
        theirs = Trace_ELBO().loss(model, point_guide)
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_data_not_expanded_over_vectorized_particles_is_stacked(monkeypatch):
    # with vectorize_particles the distributions gain a particle dimension that the observed
    # data lack: each value is scored as its expansion, stacked as well
    args = _inputs()
    results = []
    real = terms.batched_observed_term
    monkeypatch.setattr(
        terms, "batched_observed_term", lambda *a: results.append(real(*a)) or results[-1]
    )
    kw = dict(num_particles=7, vectorize_particles=True, max_plate_nesting=1)
    batched, batched_grads = _loss_and_grads(TraceMarkovKL_ELBO(**kw), args)
    assert results and all(r is not None and r.shape[:2] == (T, 7) for r in results)
    unbatched, unbatched_grads = _loss_and_grads(TraceMarkovKL_ELBO(**kw), args, unbatched=True)
    assert torch.allclose(batched, unbatched, rtol=1e-6, atol=1e-5)
    for g1, g2 in zip(batched_grads, unbatched_grads):
        assert torch.allclose(g1, g2, rtol=1e-5, atol=1e-6)
