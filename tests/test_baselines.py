# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""The leave-one-out baseline of score-function sites: values, where the plan allows it,
unbiasedness (against TraceGraph_ELBO at 5 SE) and the variance it removes."""

import itertools
import math
from dataclasses import replace

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import param_store_grad_stats
from programs import DATA, global_guide, global_model, local_guide, local_model
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceGraph_ELBO
from pyro.poutine.indep_messenger import CondIndepStackFrame

from pyro_markov_kl import JitTraceMarkovKL_ELBO, TraceMarkovKL_ELBO
from pyro_markov_kl.examples.switching import SwitchingSSM, simulate
from pyro_markov_kl.score_function import leave_one_out_baseline


def frame(name, dim, size):
    return CondIndepStackFrame(name=name, dim=dim, size=size, counter=0)


def test_values_by_loop():
    cost = torch.randn(3, 4, dtype=torch.float64)
    b = leave_one_out_baseline(cost, cost.shape, (frame("n", -1, 4),))
    for i in range(3):
        for j in range(4):
            others = [cost[i, k] for k in range(4) if k != j]
            assert torch.allclose(b[i, j], sum(others) / 3)
    both = leave_one_out_baseline(cost, cost.shape, (frame("a", -2, 3), frame("n", -1, 4)))
    assert torch.allclose(both, (cost.sum() - cost) / 11)
    # a cost that is constant along a plate broadcasts to the site's shape
    b = leave_one_out_baseline(cost[:, :1], cost.shape, (frame("n", -1, 4),))
    assert torch.allclose(b, cost[:, :1].expand(3, 4))


def test_values_with_mask():
    cost = torch.arange(8.0).reshape(2, 4)
    mask = torch.tensor([[True, False, True, True], [False, False, False, True]])
    b = leave_one_out_baseline(cost, cost.shape, (frame("n", -1, 4),), mask)
    # row 0: kept 0, 2, 3; row 1: only 7 is kept, so it has no others
    expected = torch.tensor([[2.5, 0.0, 1.5, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(b, expected)
    assert torch.equal(
        leave_one_out_baseline(cost, cost.shape, (frame("n", -1, 4),), False), 0 * cost
    )
    unmasked = leave_one_out_baseline(cost, cost.shape, (frame("n", -1, 4),), True)
    assert torch.equal(unmasked, leave_one_out_baseline(cost, cost.shape, (frame("n", -1, 4),)))


def exact_global_elbo(data):
    """The ELBO of global_model/global_guide: a sum over every k, Gaussian parts in closed form."""
    u, c = pyro.param("u"), pyro.param("c")
    logits = u[0] * data + u[1]
    total = 0.0
    for ks in itertools.product([0.0, 1.0], repeat=len(data)):
        k = torch.tensor(ks)
        log_q = dist.Bernoulli(logits=logits).log_prob(k).sum()
        log_p = dist.Bernoulli(0.4).log_prob(k).sum()
        m = c * k.sum()  # q(g | k) = N(m, 1), p(g) = N(0, 1): -KL = -m^2 / 2
        e_log_px = -0.5 * math.log(2 * math.pi * 0.25) - ((data - m - k) ** 2 + 1) / (2 * 0.25)
        total = total + log_q.exp() * (log_p - log_q - m**2 / 2 + e_log_px.sum())
    return total


MASK = torch.tensor([True, True, False, True, False, True])


def test_plan_chooses_plates():
    kw = dict(max_plate_nesting=1)
    plan = TraceMarkovKL_ELBO(**kw).explain(local_model, local_guide, DATA)
    assert plan.sites["k"].baseline == "leave-one-out over plate 'n' (6 elements)"
    assert [f.name for f in plan.sites["k"].baseline_frames] == ["n"]
    assert "score function at k: cost = x + z; baseline: leave-one-out over plate 'n'" in str(plan)

    plan = TraceMarkovKL_ELBO(num_particles=5, vectorize_particles=True, **kw).explain(
        local_model, local_guide, DATA
    )
    assert [f.name for f in plan.sites["k"].baseline_frames] == ["num_particles_vectorized", "n"]
    assert "(30 elements)" in plan.sites["k"].baseline

    plan = TraceMarkovKL_ELBO(**kw).explain(local_model, local_guide, DATA, None, 3)
    assert plan.sites["k"].baseline == "leave-one-out over plate 'n' (3 elements)"

    plan = TraceMarkovKL_ELBO(**kw).explain(local_model, local_guide, DATA[:1])
    assert plan.sites["k"].baseline == "none: no plate of two or more elements"
    assert plan.sites["k"].baseline_frames == ()

    plan = TraceMarkovKL_ELBO(**kw).explain(global_model, global_guide, DATA)
    assert set(plan.sites["k"].downstream) == {"g", "x"}
    assert plan.sites["k"].baseline == "none: term x depends on k outside plate 'n'"
    assert "cost = x (summed over plate 'n') + g;" in str(plan)
    plan = TraceMarkovKL_ELBO(num_particles=5, vectorize_particles=True, **kw).explain(
        global_model, global_guide, DATA
    )
    assert [f.name for f in plan.sites["k"].baseline_frames] == ["num_particles_vectorized"]
    assert "none" not in plan.sites["k"].baseline

    plan = TraceMarkovKL_ELBO(leave_one_out_baseline=False, **kw).explain(
        local_model, local_guide, DATA
    )
    assert plan.sites["k"].baseline == "" and plan.sites["k"].baseline_frames == ()
    assert str(plan).count("baseline") == 0

    def guide_with_own_baseline(data):
        with poutine.infer_config(
            config_fn=lambda site: (
                {"baseline": {"use_decaying_avg_baseline": True}} if site["name"] == "k" else {}
            )
        ):
            local_guide(data)

    plan = TraceMarkovKL_ELBO(**kw).explain(local_model, guide_with_own_baseline, DATA)
    assert plan.sites["k"].baseline.startswith("infer={'baseline': ...}")
    assert plan.sites["k"].baseline_frames == ()


def _check_against_tracegraph(model, guide, args, batches=15, particles=2000, seed=0):
    kw = dict(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    ours = param_store_grad_stats(TraceMarkovKL_ELBO(**kw), model, guide, batches, *args)
    ref = param_store_grad_stats(TraceGraph_ELBO(**kw), model, guide, batches, *args)
    assert abs(ours[0] - ref[0]) < 5 * math.hypot(ours[1], ref[1])
    z = (ours[2] - ref[2]).abs() / (ours[3] ** 2 + ref[3] ** 2).sqrt()
    assert (z < 5).all(), z


@pytest.mark.parametrize(
    "mask, subsample_size", [(None, None), (MASK, None), (None, 4)], ids=["plain", "mask", "sub"]
)
def test_unbiased_against_tracegraph(mask, subsample_size):
    _check_against_tracegraph(local_model, local_guide, (DATA, mask, subsample_size))


def _check_against_exact(elbo, batches=15):
    mean_loss, se_loss, mean_grad, se_grad, params = param_store_grad_stats(
        elbo, global_model, global_guide, batches, DATA
    )
    exact = exact_global_elbo(DATA)
    exact_grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(-exact, params)])
    assert abs(mean_loss + exact.item()) < 5 * se_loss
    return (mean_grad - exact_grad).abs() / se_grad


@pytest.mark.parametrize("leave_one_out", [True, False], ids=["loo", "no-baseline"])
def test_unbiased_with_a_global_site_downstream(leave_one_out):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    global_guide(DATA)  # create the parameters
    kw = dict(num_particles=2000, vectorize_particles=True, max_plate_nesting=1)
    elbo = TraceMarkovKL_ELBO(leave_one_out_baseline=leave_one_out, **kw)
    z = _check_against_exact(elbo)
    assert (z < 5).all(), z


def test_a_baseline_over_the_plate_would_be_biased_there():
    """The plan's refusal matters: a baseline over the plate would remove the whole cost (every
    element's cost is the same sum there) and bias the gradient of u."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    kw = dict(num_particles=2000, vectorize_particles=True, max_plate_nesting=1)
    elbo = TraceMarkovKL_ELBO(**kw)
    plan = elbo.explain(global_model, global_guide, DATA)
    rec = plan.sites["k"]
    assert [f.name for f in rec.baseline_frames] == ["num_particles_vectorized"]
    forced = replace(rec, baseline_frames=(frame("n", -1, len(DATA)),))
    elbo.plan_cache.check_at, elbo.plan_cache.check_every = (), 0  # keep the altered plan
    for key in list(elbo.plan_cache):  # the cached plan the loss will use
        elbo.plan_cache[key] = replace(plan, sites={**plan.sites, "k": forced})
    z = _check_against_exact(elbo)
    assert z.max() > 10, z


def _switching_grads(elbo, ssm, x, draws, seed):
    """Guide-parameter gradients of ``draws`` steps; draw d is taken after seed + d."""
    guide_params = [p for n, p in ssm.named_parameters() if n.startswith(("regime", "state"))]
    grads = []
    for d in range(draws):
        pyro.set_rng_seed(seed + d)
        for p in guide_params:
            p.grad = None
        elbo.loss_and_grads(ssm.model, ssm.guide, x)
        grads.append(torch.cat([p.grad.reshape(-1) for p in guide_params]))
    return torch.stack(grads)


@pytest.mark.slow
def test_switching_variance_reduction():
    """On the switching model the leave-one-out baseline removes most of the variance of the
    guide gradients (measured at 0.06-0.2x in benchmarks/switching_variance.py), with the same
    mean: paired draws (same seeds, so the same guide samples) of the two estimators."""
    pyro.clear_param_store()
    x = simulate(num_sequences=8, T=6, seed=3)["x"]
    ssm = SwitchingSSM()
    kw = dict(max_plate_nesting=1)
    loo = _switching_grads(TraceMarkovKL_ELBO(**kw), ssm, x, 200, 100)
    plain = _switching_grads(
        TraceMarkovKL_ELBO(leave_one_out_baseline=False, **kw), ssm, x, 200, 100
    )
    ratio = loo.var(0).sum() / plain.var(0).sum()
    assert ratio < 0.5, f"total variance ratio {ratio:.3f}"
    # same mean, per coordinate: paired differences within 5 SE of 0
    diff = loo - plain
    z = diff.mean(0).abs() / (diff.std(0) / math.sqrt(len(diff)) + 1e-12)
    assert z.max() < 5, z.max()


def test_jit_unbiased():
    """JitTraceMarkovKL_ELBO with the baseline: loss and gradient within 5 SE of the exact ones
    (the compiled function draws its samples in another order than the eager one)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    global_guide(DATA)
    kw = dict(num_particles=2000, vectorize_particles=True, max_plate_nesting=1)
    elbo = JitTraceMarkovKL_ELBO(ignore_jit_warnings=True, **kw)
    z = _check_against_exact(elbo)
    assert (z < 5).all(), z
    # the analysis ran once: the traced run found the plan of the eager first run
    (plan,) = elbo.plan_cache.values()
    assert plan.sites["k"].baseline_frames


# Nested plates: k in outer x inner, a site h in outer only sampled from the sum of k over inner,
# observations in outer x inner that depend on h. Along outer the dependence stays inside the
# plate (the baseline may use it); along inner it leaves it (x is summed over inner). The
# reference is Trace_ELBO on the same model with inner as an event dimension, which has no
# plate to misread.
NESTED = torch.tensor([[0.3, -1.2, 2.0], [0.7, 1.1, -0.4]])


def nested_model(data, inner_plate=True):
    with pyro.plate("outer", 2, dim=-2 if inner_plate else -1):
        if inner_plate:
            h = pyro.sample("h", dist.Normal(torch.zeros(1), 1.0))
            with pyro.plate("inner", 3, dim=-1):
                k = pyro.sample("k", dist.Bernoulli(0.4))
                pyro.sample("x", dist.Normal(h + k, 0.5), obs=data)
        else:
            h = pyro.sample("h", dist.Normal(0.0, 1.0)).unsqueeze(-1)
            k = pyro.sample("k", dist.Bernoulli(0.4 * torch.ones(3)).to_event(1))
            pyro.sample("x", dist.Normal(h + k, 0.5).to_event(1), obs=data)


def nested_guide(data, inner_plate=True):
    u = pyro.param("u", torch.tensor([0.5, -0.5]))
    c = pyro.param("c", torch.tensor(0.8))
    logits = u[0] * data + u[1]
    with pyro.plate("outer", 2, dim=-2 if inner_plate else -1):
        if inner_plate:
            with pyro.plate("inner", 3, dim=-1):
                k = pyro.sample("k", dist.Bernoulli(logits=logits))
            pyro.sample("h", dist.Normal(c * k.sum(-1, keepdim=True), 1.0))
        else:
            k = pyro.sample("k", dist.Bernoulli(logits=logits).to_event(1))
            pyro.sample("h", dist.Normal(c * k.sum(-1), 1.0))


def test_nested_plates_against_trace_elbo_without_the_inner_plate():
    kw = dict(num_particles=2000, vectorize_particles=True)
    plan = TraceMarkovKL_ELBO(max_plate_nesting=2, **kw).explain(nested_model, nested_guide, NESTED)
    rec = plan.sites["k"]
    assert [f.name for f in rec.baseline_frames] == ["num_particles_vectorized", "outer"]
    assert "cost = x (summed over plate 'inner') + h;" in str(plan)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    ours = param_store_grad_stats(
        TraceMarkovKL_ELBO(max_plate_nesting=2, **kw), nested_model, nested_guide, 15, NESTED
    )
    ref = param_store_grad_stats(
        Trace_ELBO(max_plate_nesting=1, **kw), nested_model, nested_guide, 15, NESTED, False
    )
    assert abs(ours[0] - ref[0]) < 5 * math.hypot(ours[1], ref[1])
    z = (ours[2] - ref[2]).abs() / (ours[3] ** 2 + ref[3] ** 2).sqrt()
    assert (z < 5).all(), (ours[2], ref[2], z)
