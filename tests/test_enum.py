# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
TraceEnumMarkovKL_ELBO against Pyro's TraceEnum_ELBO: a Gaussian mixture with
enumerated assignments, an HMM with enumerated states, a switching
linear-Gaussian model, and enumeration in the guide. Loss and gradients at
fixed parameters agree within 5 standard errors (from independent draws, each
averaging vectorized particles); gradient variance is lower where a KL is
used.
"""

import math
from typing import Callable, List, Sequence, Tuple

import pyro
import pyro.distributions as dist
import pytest
import torch
from programs import DATA, global_guide, global_model, local_guide, local_model
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import TraceEnum_ELBO, config_enumerate
from pyro.ops.indexing import Vindex

from pyro_markov_kl.trace_enum_markov_kl_elbo import TraceEnumMarkovKL_ELBO

K = 3


# --- helpers ------------------------------------------------------------------------------------
def _params(names: Sequence[str]) -> List[torch.Tensor]:
    return [pyro.param(n).unconstrained() for n in names]


def _draws(
    elbo, model: Callable, guide: Callable, args: tuple, names: Sequence[str], n: int, seed: int
) -> torch.Tensor:
    """``n`` independent draws of (loss, gradient of every param in ``names``), as rows."""
    params = _params(names)
    rows = []
    for i in range(n):
        pyro.set_rng_seed(seed + i)
        loss = elbo.differentiable_loss(model, guide, *args)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = [
            torch.zeros_like(p).reshape(-1) if g is None else g.reshape(-1)
            for p, g in zip(params, grads)
        ]
        rows.append(torch.cat([loss.detach().reshape(1)] + flat))
    return torch.stack(rows).double()


def _compare(
    model: Callable,
    guide: Callable,
    args: tuple,
    names: Sequence[str],
    max_plate_nesting: int,
    particles: int = 32,
    draws: int = 40,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Draw ``draws`` times (each averaging ``particles`` vectorized particles)
    from both estimators with common random numbers: draw ``i`` of each is
    seeded alike, and the two consume random numbers alike (the KL draws none,
    the dependency analysis restores the generator), so they see the same
    guide samples. Assert that the mean of the paired differences of loss and
    every gradient coordinate is within 5 standard errors of zero; return the
    draws (ours, reference).
    """
    kw = dict(
        max_plate_nesting=max_plate_nesting, num_particles=particles, vectorize_particles=True
    )
    ours = _draws(TraceEnumMarkovKL_ELBO(**kw), model, guide, args, names, draws, 0)
    ref = _draws(TraceEnum_ELBO(**kw), model, guide, args, names, draws, 0)
    diff = ours - ref
    se = diff.std(0) / len(diff) ** 0.5
    bad = diff.mean(0).abs() > 5 * se + 1e-6 * (1 + ref.mean(0).abs())
    assert not bad.any(), (diff.mean(0)[bad], se[bad], bad.nonzero())
    return ours, ref


def _variance_ratio(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Total gradient variance of ours over the reference's (paired draws)."""
    ratio = float(ours[:, 1:].var(0).sum() / ref[:, 1:].var(0).sum())
    print(f"gradient variance ratio {ratio:.3f}")
    return ratio


# --- a Gaussian mixture -----------------------------------------------------------------------
N_MIX = 10
_g = torch.Generator().manual_seed(0)
MIX_DATA = torch.cat(
    [
        torch.randn(N_MIX // 2, generator=_g) - 2.0,
        torch.randn(N_MIX - N_MIX // 2, generator=_g) + 2.0,
    ]
)


def mixture_model(data, prior_scale=1.0):
    with pyro.plate("components", K), poutine.scale(scale=prior_scale):
        locs = pyro.sample("locs", dist.Normal(0.0, 0.7))
    with pyro.plate("data", len(data)):
        z = pyro.sample("z", dist.Categorical(torch.ones(K) / K))
        pyro.sample("x", dist.Normal(Vindex(locs.unsqueeze(-2))[..., z], 1.0), obs=data)


def mixture_guide(data, prior_scale=1.0):
    loc = pyro.param("loc", torch.tensor([-1.5, 0.3, 1.8]))
    scale = pyro.param("scale", torch.tensor([0.6, 0.8, 0.5]), constraint=constraints.positive)
    with pyro.plate("components", K):
        pyro.sample("locs", dist.Normal(loc, scale))


@pytest.mark.parametrize(
    "prior_scale, max_ratio", [(1.0, 0.7), (0.3, 0.97)], ids=["same-factor", "annealed-prior"]
)
def test_mixture(prior_scale, max_ratio):
    pyro.clear_param_store()
    model = config_enumerate(mixture_model)
    plan = TraceEnumMarkovKL_ELBO(max_plate_nesting=1).explain(
        model, mixture_guide, MIX_DATA, prior_scale
    )
    assert plan.sites["locs"].estimator == "analytic"
    assert plan.model_enumerated == ("z",)
    ours, ref = _compare(model, mixture_guide, (MIX_DATA, prior_scale), ["loc", "scale"], 1)
    assert _variance_ratio(ours, ref) < max_ratio


# --- an HMM with a continuous global ----------------------------------------------------------
T_HMM = 12
TRANS = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
MEANS = torch.tensor([-2.0, 0.0, 2.0])
HMM_DATA = torch.tensor([-2.1, -1.5, -2.4, 0.3, 0.1, -0.2, 2.2, 1.9, 2.5, 0.4, -1.8, -2.0])


def hmm_model(ys):
    offset = pyro.sample("offset", dist.Normal(0.0, 0.5))
    log_scale = pyro.sample("log_scale", dist.Normal(0.0, 0.3))
    x = 0
    for t in pyro.markov(range(len(ys))):
        x = pyro.sample(
            f"x_{t}", dist.Categorical(Vindex(TRANS)[..., x, :]), infer={"enumerate": "parallel"}
        )
        pyro.sample(
            f"y_{t}", dist.Normal(Vindex(MEANS)[..., x] + offset, log_scale.exp()), obs=ys[t]
        )


def hmm_guide(ys):
    for name, loc, scale in [("offset", 0.2, 0.3), ("log_scale", -0.1, 0.2)]:
        m = pyro.param(f"{name}_loc", torch.tensor(loc))
        s = pyro.param(f"{name}_scale", torch.tensor(scale), constraint=constraints.positive)
        pyro.sample(name, dist.Normal(m, s))


@pytest.mark.slow
def test_hmm():
    pyro.clear_param_store()
    plan = TraceEnumMarkovKL_ELBO(max_plate_nesting=0).explain(hmm_model, hmm_guide, HMM_DATA)
    assert plan.analytic_sites() == ("offset", "log_scale")
    assert len(plan.model_enumerated) == T_HMM
    names = ["offset_loc", "offset_scale", "log_scale_loc", "log_scale_scale"]
    ours, ref = _compare(hmm_model, hmm_guide, (HMM_DATA,), names, 0)
    assert _variance_ratio(ours, ref) < 0.85


# --- a switching linear-Gaussian model ----------------------------------------------------------
T_SW = 6
COEF = torch.tensor([0.9, -0.5])
SW_TRANS = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
SW_DATA = torch.tensor([0.5, 0.9, 0.7, -0.4, 0.3, -0.1])


def switching_model(ys):
    drift = pyro.sample("drift", dist.Normal(0.0, 0.5))
    s, z = 0, torch.tensor(0.0)
    for t in pyro.markov(range(len(ys))):
        s = pyro.sample(
            f"s_{t}", dist.Categorical(Vindex(SW_TRANS)[..., s, :]), infer={"enumerate": "parallel"}
        )
        z = pyro.sample(f"z_{t}", dist.Normal(Vindex(COEF)[..., s] * z + drift, 0.5))
        pyro.sample(f"y_{t}", dist.Normal(z, 0.3), obs=ys[t])


def switching_guide(ys):
    m = pyro.param("drift_loc", torch.tensor(0.1))
    s = pyro.param("drift_scale", torch.tensor(0.3), constraint=constraints.positive)
    pyro.sample("drift", dist.Normal(m, s))
    locs = pyro.param("z_loc", ys.clone() * 0.8)
    scales = pyro.param("z_scale", torch.full_like(ys, 0.25), constraint=constraints.positive)
    for t in pyro.markov(range(len(ys))):
        pyro.sample(f"z_{t}", dist.Normal(locs[t], scales[t]))


def test_switching():
    pyro.clear_param_store()
    plan = TraceEnumMarkovKL_ELBO(max_plate_nesting=0).explain(
        switching_model, switching_guide, SW_DATA
    )
    assert plan.sites["drift"].estimator == "analytic"
    for t in range(T_SW):
        rec = plan.sites[f"z_{t}"]
        assert rec.estimator == "mc"
        assert rec.reason.startswith(f"model factor involves enumerated site s_{t}")
        assert f"s_{t}" in rec.model_parents
    names = ["drift_loc", "drift_scale", "z_loc", "z_scale"]
    _compare(switching_model, switching_guide, (SW_DATA,), names, 0, draws=25)


# --- enumeration in the guide -------------------------------------------------------------------
N_GE = 5
GE_DATA = torch.tensor([-1.8, -0.2, 0.4, 2.1, 1.2])
PI = torch.tensor([0.3, 0.3, 0.4])
MU = torch.tensor([-2.0, 0.0, 2.0])


def guide_enum_model(xs):
    with pyro.plate("data", N_GE):
        c = pyro.sample("c", dist.Categorical(PI))
        z = pyro.sample("z", dist.Normal(Vindex(MU)[..., c], 1.0))
        pyro.sample("x", dist.Normal(z, 0.5), obs=xs)


def guide_enum_guide(xs):
    probs = pyro.param("probs", torch.full((N_GE, K), 1.0 / K), constraint=constraints.simplex)
    loc = pyro.param("loc", xs.unsqueeze(-1) + torch.tensor([-0.5, 0.0, 0.5]))
    scale = pyro.param("scale", torch.full((N_GE, K), 0.5), constraint=constraints.positive)
    idx = torch.arange(N_GE)
    with pyro.plate("data", N_GE):
        c = pyro.sample("c", dist.Categorical(probs), infer={"enumerate": "parallel"})
        pyro.sample("z", dist.Normal(Vindex(loc)[idx, c], Vindex(scale)[idx, c]))


def test_guide_enumeration():
    pyro.clear_param_store()
    plan = TraceEnumMarkovKL_ELBO(max_plate_nesting=1).explain(
        guide_enum_model, guide_enum_guide, GE_DATA
    )
    assert plan.sites["c"].estimator == "enum"
    assert plan.sites["z"].estimator == "analytic"
    assert plan.sites["z"].guide_parents == {"c"}
    assert plan.guide_enumerated == ("c",)
    ours, ref = _compare(
        guide_enum_model, guide_enum_guide, (GE_DATA,), ["probs", "loc", "scale"], 1
    )
    assert _variance_ratio(ours, ref) < 0.85


# --- exact cases: no Monte Carlo left -----------------------------------------------------------
def _exact_pair(model_scale: float):
    def model():
        with pyro.plate("data", N_GE):
            c = pyro.sample("c", dist.Categorical(PI))
            with poutine.scale(scale=model_scale):
                pyro.sample("z", dist.Normal(Vindex(MU)[..., c], 1.0))

    def guide():
        probs = pyro.param("probs", torch.rand(N_GE, K) + 0.1, constraint=constraints.simplex)
        loc = pyro.param("loc", torch.randn(N_GE, K))
        scale = pyro.param("scale", torch.rand(N_GE, K) + 0.3, constraint=constraints.positive)
        idx = torch.arange(N_GE)
        with pyro.plate("data", N_GE):
            c = pyro.sample("c", dist.Categorical(probs), infer={"enumerate": "parallel"})
            pyro.sample("z", dist.Normal(Vindex(loc)[idx, c], Vindex(scale)[idx, c]))

    return model, guide


@pytest.mark.parametrize("model_scale", [1.0, 0.4])
def test_guide_enumeration_exact(model_scale):
    r"""
    Without observations below ``z`` the ELBO is
    :math:`\sum_n \sum_c q(c)[\log \pi_c - \log q(c) - f_p \mathrm{KL}_c - (f_p - 1) H_c]`:
    the estimator must return it exactly, value and gradients.
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, guide = _exact_pair(model_scale)
    elbo = TraceEnumMarkovKL_ELBO(max_plate_nesting=1)
    loss = elbo.differentiable_loss(model, guide)
    names = ["probs", "loc", "scale"]
    grads = torch.autograd.grad(loss, _params(names))
    probs, loc, scale = (pyro.param(n) for n in names)
    q = dist.Normal(loc, scale)
    kl = torch.distributions.kl_divergence(q, dist.Normal(MU, 1.0))
    inner = PI.log() - probs.log() - model_scale * kl - (model_scale - 1) * q.entropy()
    exact = -(probs * inner).sum()
    exact_grads = torch.autograd.grad(exact, _params(names))
    assert torch.allclose(loss, exact, atol=1e-5)
    for g, e in zip(grads, exact_grads):
        assert torch.allclose(g, e, atol=1e-5)


def test_model_enumeration_exact():
    r"""
    A global :math:`\theta` that nothing depends on, beside a mixture summed
    out in the model: the ELBO is :math:`\log p(x) - \mathrm{KL}(q(\theta) \| p(\theta))`.
    """
    xs = torch.tensor([0.3, -1.2, 2.2])

    @config_enumerate
    def model():
        pyro.sample("theta", dist.Normal(0.0, 2.0))
        with pyro.plate("data", 3):
            c = pyro.sample("c", dist.Categorical(PI))
            pyro.sample("x", dist.Normal(Vindex(MU)[..., c], 1.0), obs=xs)

    def guide():
        loc = pyro.param("theta_loc", torch.tensor(0.7))
        scale = pyro.param("theta_scale", torch.tensor(0.4), constraint=constraints.positive)
        pyro.sample("theta", dist.Normal(loc, scale))

    pyro.clear_param_store()
    elbo = TraceEnumMarkovKL_ELBO(max_plate_nesting=1)
    losses = [elbo.loss(model, guide) for _ in range(2)]
    log_px = (PI.log() + dist.Normal(MU, 1.0).log_prob(xs.unsqueeze(-1))).logsumexp(-1).sum()
    kl = torch.distributions.kl_divergence(dist.Normal(0.7, 0.4), dist.Normal(0.0, 2.0))
    assert losses[0] == losses[1]
    assert abs(losses[0] - float(kl - log_px)) < 1e-4


# --- plans ----------------------------------------------------------------------------------------
def test_plan_rules_and_overrides():
    """The core rule still applies, and infer={"kl": ...} is honoured."""

    @config_enumerate
    def model(option="auto"):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        b = pyro.sample("b", dist.Normal(a, 1.0))
        k = pyro.sample("k", dist.Categorical(PI))
        pyro.sample("w", dist.Normal(Vindex(MU)[..., k], 1.0))
        pyro.sample("x", dist.Normal(b, 1.0), obs=torch.tensor(0.5))

    def guide(option="auto"):
        # backward: b first, then a given b
        b = pyro.sample("b", dist.Normal(pyro.param("b_loc", torch.tensor(0.0)), 1.0))
        pyro.sample("a", dist.Normal(0.5 * b, 1.0))
        pyro.sample("w", dist.Normal(0.0, 1.0), infer={"kl": option})

    pyro.clear_param_store()
    elbo = TraceEnumMarkovKL_ELBO(max_plate_nesting=0)
    plan = elbo.explain(model, guide)
    assert plan.sites["a"].estimator == "analytic"
    assert plan.sites["b"].estimator == "mc"
    assert "model parent a is sampled after b" in plan.sites["b"].reason
    assert plan.sites["w"].estimator == "mc"
    assert plan.sites["w"].reason.startswith("model factor involves enumerated site k")
    assert "enumerated in the model (summed out exactly): k" in str(plan)
    assert elbo.explain(model, guide, "mc").sites["w"].reason == "forced by infer={'kl': 'mc'}"
    with pytest.raises(ValueError, match="site 'w'.*enumerated site k"):
        elbo.explain(model, guide, "analytic")


# --- subsampling and masks ------------------------------------------------------------------------
N_SUB = 12
SUB_DATA = torch.linspace(-3.0, 3.0, N_SUB)
SUB_MASK = torch.arange(N_SUB) % 3 != 0


@config_enumerate
def subsample_model(data):
    locs = pyro.sample("locs", dist.Normal(torch.zeros(K), 1.0).to_event(1))
    with pyro.plate("data", N_SUB, subsample_size=5) as idx:
        with poutine.mask(mask=SUB_MASK[idx]):  # in the model only: the factors differ
            u = pyro.sample("u", dist.Normal(0.0, 0.5))
        z = pyro.sample("z", dist.Categorical(torch.ones(K) / K))
        pyro.sample("x", dist.Normal(Vindex(locs)[..., z] + u, 1.0), obs=data[idx])


def subsample_guide(data):
    loc = pyro.param("loc", torch.tensor([-1.0, 0.0, 1.0]))
    scale = pyro.param("scale", torch.full((K,), 0.5), constraint=constraints.positive)
    pyro.sample("locs", dist.Normal(loc, scale).to_event(1))
    u_loc = pyro.param("u_loc", torch.zeros(N_SUB))
    u_scale = pyro.param("u_scale", torch.full((N_SUB,), 0.3), constraint=constraints.positive)
    with pyro.plate("data", N_SUB, subsample_size=5) as idx:
        pyro.sample("u", dist.Normal(u_loc[idx], u_scale[idx]))


def test_subsampling_and_model_mask():
    """Local analytic sites in a subsampled plate, masked in the model only."""
    pyro.clear_param_store()
    plan = TraceEnumMarkovKL_ELBO(max_plate_nesting=1).explain(
        subsample_model, subsample_guide, SUB_DATA
    )
    assert plan.analytic_sites() == ("locs", "u")
    names = ["loc", "scale", "u_loc", "u_scale"]
    # the subsampling noise, common to both, dominates the gradient variance here
    _compare(subsample_model, subsample_guide, (SUB_DATA,), names, 1, draws=40)


def test_enum_class_refuses_plate_coupling():
    """TraceEnumMarkovKL_ELBO leaves sampled discrete guide sites to Pyro's DiCE, which is
    biased on global_model/global_guide (measured: 25 and 88 for the gradient of u, whose exact
    value is 172 and 399): it raises, naming the site, the term and the plate. Without the
    global, it runs."""
    pyro.clear_param_store()
    elbo = TraceEnumMarkovKL_ELBO(max_plate_nesting=1, strict_enumeration_warning=False)
    with pytest.raises(NotImplementedError, match=r"site 'k': the cost term x .* plate 'n'"):
        elbo.loss(global_model, global_guide, DATA)
    assert math.isfinite(elbo.loss(local_model, local_guide, DATA))
    # DiCE weights k by every cost at its plate or below; no baseline of ours there
    assert "score function at k: cost = k + z + x\n" in str(
        elbo.explain(local_model, local_guide, DATA)
    )
