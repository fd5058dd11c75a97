# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""Patterns of Pyro's own examples: a plate without a size (SS-VAE), a float mask
of shape (B, 1) under .to_event(1) (DMM), autoguides with a joint latent, and a
guide that subsamples a plate the model declares in full (LDA)."""

import functools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import AutoDelta, AutoDiagonalNormal, AutoMultivariateNormal

from pyro_markov_kl import TraceEnumMarkovKL_ELBO, TraceMarkovKL_ELBO
from pyro_markov_kl.provenance import DependencyTracker


@pytest.fixture(autouse=True)
def _fresh_param_store():
    # explain() below runs the guide with whatever params an earlier test module left
    # (test_jit.py leaves a "w" of shape (4,)): start and end with an empty store
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


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


# --- a guide that subsamples a plate the model declares in full (examples/lda.py) ------------

N_FULL, N_SUB = 100, 10
LDA_DATA = torch.linspace(-3.0, 3.0, N_FULL)
LDA_LOC = torch.linspace(-1.0, 2.0, N_FULL)


def lda_model(enumerated):
    with pyro.plate("N", N_FULL) as ind:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        if enumerated:
            k = pyro.sample("k", dist.Bernoulli(0.3), infer={"enumerate": "parallel"})
            z = z + 2.0 * k
        pyro.sample("x", dist.Normal(z, 1.0), obs=LDA_DATA[ind])


def lda_guide(enumerated):
    loc = pyro.param("loc", LDA_LOC.clone())
    with pyro.plate("N", N_FULL, subsample_size=N_SUB) as ind:
        pyro.sample("z", dist.Normal(loc[ind], 1.0))


def lda_exact_loss():
    """Minus the ELBO of the plain program, summed over all N_FULL elements."""
    x, m = LDA_DATA, LDA_LOC
    expected_log_lik = -0.5 * math.log(2 * math.pi) - 0.5 * ((x - m) ** 2 + 1)
    return -(expected_log_lik - 0.5 * m**2).sum().item()


def loss_samples(elbo, runs, *args):
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    return torch.tensor([elbo.loss(lda_model, lda_guide, *args) for _ in range(runs)])


@pytest.mark.parametrize("enumerated", [False, True], ids=["plain", "enumerated"])
def test_guide_subsamples_plate_the_model_declares_in_full(enumerated):
    options = dict(num_particles=100, vectorize_particles=True, max_plate_nesting=1)
    elbos = {
        "TraceEnum_ELBO": TraceEnum_ELBO(strict_enumeration_warning=False, **options),
        "TraceEnumMarkovKL_ELBO": TraceEnumMarkovKL_ELBO(
            strict_enumeration_warning=False, **options
        ),
    }
    if not enumerated:
        elbos["Trace_ELBO"] = Trace_ELBO(**options)
        elbos["TraceMarkovKL_ELBO"] = TraceMarkovKL_ELBO(**options)
    for name, elbo in elbos.items():
        if "MarkovKL" in name:
            plan = elbo.explain(lda_model, lda_guide, enumerated)
            assert plan.sites["z"].estimator == "analytic"
    runs = 100
    losses = {name: loss_samples(elbo, runs, enumerated) for name, elbo in elbos.items()}
    references = ["TraceEnum_ELBO"] if enumerated else ["Trace_ELBO", "TraceEnum_ELBO"]
    for name in ("TraceEnumMarkovKL_ELBO",) + (() if enumerated else ("TraceMarkovKL_ELBO",)):
        if not enumerated:
            mean, se = losses[name].mean(), losses[name].std() / math.sqrt(runs)
            assert abs(mean - lda_exact_loss()) < 5 * se, (name, mean, se, lda_exact_loss())
        for ref in references:
            # the same seed draws the same subsamples: compare run by run
            diff = losses[name] - losses[ref]
            se = diff.std() / math.sqrt(runs)
            assert abs(diff.mean()) < 5 * se, (name, ref, diff.mean(), se)


# --- autoguides: per-site values are views of a joint latent ---------------------------------


def test_tag_does_not_reach_earlier_aliases_but_writes_do():
    tracker = DependencyTracker()
    with tracker:
        latent = torch.randn(3) * 1.0
        tracker.tag(latent, "latent")
        a = latent[0:1]  # a view of the latent's storage, as an autoguide's site value
        tracker.tag(a, "a")
        c = latent[2:3]  # a later view of the same storage holds no value made from a
        assert tracker.names_of(tracker.provenance(c)) == {"latent"}
        assert tracker.names_of(tracker.provenance(a[0] + 1)) == {"a"}
        assert tracker.names_of(tracker.provenance(latent)) == {"latent"}
        a.mul_(2.0)  # a write through the site's view: every alias now depends on a
        assert tracker.names_of(tracker.provenance(c)) == {"latent", "a"}
        assert tracker.names_of(tracker.provenance(latent[1:2] * 1)) == {"latent", "a"}


def joint_model(coupled):
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    pyro.sample("b", dist.Uniform(0.0, 1.0))
    pyro.sample("c", dist.Normal(a if coupled else 0.0, 1.0))


@pytest.mark.parametrize("autoguide", [AutoDiagonalNormal, AutoMultivariateNormal, AutoDelta])
@pytest.mark.parametrize("coupled", [False, True], ids=["independent", "coupled"])
def test_autoguide_parents_and_delta_sites(autoguide, coupled):
    pyro.clear_param_store()
    model = functools.partial(joint_model, coupled)
    guide = autoguide(model)
    plan = TraceMarkovKL_ELBO().explain(model, guide)
    latent = frozenset(n for n in plan.sites if n.endswith("_latent"))  # none for AutoDelta
    for name in "abc":
        rec = plan.sites[name]
        assert rec.guide_parents == latent, (name, str(plan))
        assert rec.model_parents == ({"a"} if coupled and name == "c" else set()), str(plan)
        assert rec.estimator == "analytic"
        assert "a Delta guide: the KL equals log q - log p at the sample" in rec.reason
    # the Delta sites' KL is the Monte Carlo term, draw for draw
    for seed in range(3):
        pyro.set_rng_seed(seed)
        expected = Trace_ELBO().loss(model, guide)
        pyro.set_rng_seed(seed)
        assert TraceMarkovKL_ELBO().loss(model, guide) == pytest.approx(expected, rel=1e-6)


# --- a float mask of shape (B, 1) under .to_event(1) (examples/dmm/dmm.py) --------------------

B, D = 4, 3
DMM_MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])  # (B, T)
DMM_LOC = torch.linspace(-1.0, 1.0, B * D).reshape(B, D)


def dmm_model(mask):
    with pyro.plate("b", B):
        pyro.sample("z", dist.Normal(torch.zeros(B, D), 1.0).mask(mask).to_event(1))


def dmm_guide(mask, mvn):
    loc = pyro.param("loc", DMM_LOC.clone())
    with pyro.plate("b", B):
        if mvn:
            pyro.sample("z", dist.MultivariateNormal(loc, torch.eye(D)))
        else:
            pyro.sample("z", dist.Normal(loc, 1.0).mask(mask).to_event(1))


DMM_GUIDES = {mvn: functools.partial(dmm_guide, mvn=mvn) for mvn in (True, False)}


def _dmm_loss(elbo, mask, mvn, seed=0):
    pyro.set_rng_seed(seed)
    return elbo.loss(dmm_model, DMM_GUIDES[mvn], mask)  # one guide object: the plan is reused


@pytest.mark.parametrize("mvn", [True, False], ids=["mvn_guide", "normal_guide"])
def test_float_mask_constant_along_the_event_keeps_the_kl(mvn):
    pyro.clear_param_store()
    float_mask = DMM_MASK[:, 1:2]  # as the DMM passes mini_batch_mask[:, t - 1 : t]
    bool_mask = float_mask.bool()
    plans = [
        TraceMarkovKL_ELBO().explain(dmm_model, DMM_GUIDES[mvn], m) for m in (float_mask, bool_mask)
    ]
    # the same decisions (the float mask is taken apart element by element where both sides
    # allow it, so the KL's description may differ)
    assert {n: r.estimator for n, r in plans[0].sites.items()} == {
        n: r.estimator for n, r in plans[1].sites.items()
    }
    assert plans[0].sites["z"].estimator == "analytic", str(plans[0])
    # no sample enters the loss: it is the closed form, 0.5 |loc_b|^2 for each unmasked b,
    # and with the guide unmasked, minus the guide's entropy for each masked b
    keep = float_mask[:, 0]
    exact = (0.5 * DMM_LOC.pow(2).sum(-1) * keep).sum().item()
    if mvn:
        exact -= (1 - keep).sum().item() * 0.5 * D * (1 + math.log(2 * math.pi))
    enum = TraceEnumMarkovKL_ELBO(max_plate_nesting=1, strict_enumeration_warning=False)
    for elbo in (TraceMarkovKL_ELBO(), enum):
        losses = [_dmm_loss(elbo, m, mvn) for m in (float_mask, bool_mask)]
        assert losses[0] == losses[1] == pytest.approx(exact, rel=1e-6)


# the varying mask changes the site's decision under the same plan key: the plan cache's
# check may say so (StalePlanWarning), which Pyro's test configuration makes an error
@pytest.mark.filterwarnings("ignore:the dependency structure changed between steps")
def test_mask_that_varies_inside_the_event_later_falls_back_to_monte_carlo():
    pyro.clear_param_store()
    varying = torch.tensor([[1.0, 0.0, 1.0]]).expand(B, D).contiguous()
    options = dict(max_plate_nesting=1, strict_enumeration_warning=False)
    references = (Trace_ELBO(), TraceEnum_ELBO(**options))
    elbos = (TraceMarkovKL_ELBO(), TraceEnumMarkovKL_ELBO(**options))
    for elbo, reference in zip(elbos, references):
        _dmm_loss(elbo, DMM_MASK[:, 1:2], True)  # the plan: analytic, on a mask of shape (B, 1)
        assert len(elbo.plan_cache) == 1
        # the same structure (shape and strides), with a mask that varies inside the event:
        # the KL of the MultivariateNormal guide is not available, the term is Monte Carlo
        for seed in range(3):
            expected = _dmm_loss(reference, varying, True, seed)
            assert _dmm_loss(elbo, varying, True, seed) == pytest.approx(expected, rel=1e-6)
        assert len(elbo.plan_cache) == 1  # the plan made on the first mask


def test_float_mask_that_later_varies_inside_the_event_keeps_an_exact_kl():
    """
    With an Independent guide both sides are taken apart element by element, whatever the
    mask's values: a later mask that varies inside the event, under the plan made on a mask
    constant along it, still gives the exact loss (model and guide masked alike: the sum
    over the elements of m KL, with KL = loc^2 / 2).
    """
    pyro.clear_param_store()
    elbo = TraceMarkovKL_ELBO()
    elbo.plan_cache.check_at = ()  # no fresh analysis: the later steps use the first plan
    _dmm_loss(elbo, DMM_MASK[:, 1:2] + torch.zeros(B, D), False)  # constant along the event
    varying = torch.tensor([[1.0, 0.0, 1.0]]).expand(B, D).contiguous()
    exact = (varying * 0.5 * DMM_LOC.pow(2)).sum().item()
    for seed in range(2):
        assert _dmm_loss(elbo, varying, False, seed) == pytest.approx(exact, rel=1e-5)
    assert len(elbo.plan_cache) == 1
