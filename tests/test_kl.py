# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

import contextlib
import math
import warnings
from typing import Callable, Dict

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributions as tdist
from helpers import restored_kl_registry
from pyro.distributions.torch_distribution import ExpandedDistribution
from torch.distributions import transforms as T
from torch.distributions.kl import register_kl

from pyro_markov_kl import TraceMarkovKL_ELBO
from pyro_markov_kl.kl import (
    KLDivergenceError,
    KLRule,
    compute_kl,
    find_kl_rule,
    registry_version,
)
from pyro_markov_kl.kl_pairs import gaussian_kl

NUM_SAMPLES = 100_000


@pytest.fixture(autouse=True)
def _isolate():
    """Undo every registration a test makes in torch's registry."""
    with restored_kl_registry():
        yield


def kl_divergence(q, p, kl_rules=None):
    """KL(q || p) as the ELBO computes it: find_kl_rule, then compute_kl."""
    rule, reason = find_kl_rule(q, p, kl_rules)
    if rule is None:
        raise NotImplementedError(reason)
    return compute_kl(None, q, p, rule)


def assert_close_mc(q, p, kl, num_samples=NUM_SAMPLES, seed=0):
    """``kl`` agrees with the mean of log q(x) - log p(x), x ~ q, within 5 SE."""
    torch.manual_seed(seed)
    with torch.no_grad():
        x = q.rsample((num_samples,)) if q.has_rsample else q.sample((num_samples,))
        # insert singleton dims so that x broadcasts against a larger model batch
        extra = len(torch.broadcast_shapes(q.batch_shape, p.batch_shape)) - len(q.batch_shape)
        x = x.reshape((num_samples,) + (1,) * extra + x.shape[1:])
        diff = q.log_prob(x) - p.log_prob(x)
        mean = diff.mean(0)
        se = diff.std(0) / math.sqrt(num_samples)
    kl = kl.detach()
    assert kl.shape == mean.shape
    err = (kl - mean).abs()
    tol = 5 * se + 1e-4 + 1e-5 * kl.abs()
    assert (err <= tol).all(), f"kl={kl}\nmc={mean}\nse={se}"


def check(q, p, expected_source=None, kl_rules=None):
    rule, reason = find_kl_rule(q, p, kl_rules)
    assert rule is not None, reason
    if expected_source is not None:
        assert rule.source == expected_source, rule.description
    kl = compute_kl("z", q, p, rule)
    assert kl.shape == torch.broadcast_shapes(q.batch_shape, p.batch_shape)
    return kl, rule


################################################################################
# Gaussian family: Independent(Normal, 1) <-> MultivariateNormal <-> LowRank
################################################################################

N = 3


def make_gaussian(kind, batch_shape, scale=1.0):
    loc = torch.randn(batch_shape + (N,))
    if kind == "diag":
        return dist.Normal(loc, scale * (torch.rand(batch_shape + (N,)) + 0.5)).to_event(1)
    if kind == "mvn":
        A = 0.3 * torch.randn(batch_shape + (N, N))
        tril = torch.tril(A, -1) + torch.diag_embed(torch.rand(batch_shape + (N,)) + 0.5)
        return dist.MultivariateNormal(loc, scale_tril=scale * tril)
    if kind == "lowrank":
        W = 0.5 * scale * torch.randn(batch_shape + (N, 2))
        D = scale**2 * (torch.rand(batch_shape + (N,)) + 0.5)
        return dist.LowRankMultivariateNormal(loc, W, D)
    raise ValueError(kind)


def as_mvn(d):
    if isinstance(d, tdist.Independent):
        b = d.base_dist
        return tdist.MultivariateNormal(b.loc, scale_tril=torch.diag_embed(b.scale))
    return tdist.MultivariateNormal(d.loc, covariance_matrix=d.covariance_matrix)


KINDS = ["diag", "mvn", "lowrank"]
# (guide batch, model batch): model shared across a plate the guide expands, the
# reverse, and both sides broadcasting.
BATCHES = [((), ()), ((4,), ()), ((), (4,)), ((2, 1), (3,))]
EXPECTED_SOURCE = {
    ("diag", "diag"): "builtin",  # Independent/Independent of torch Normal/Normal
    ("diag", "mvn"): "builtin",  # Pyro has a rule, ours supersedes it
    ("diag", "lowrank"): "builtin",  # missing in torch and Pyro
    ("mvn", "diag"): "builtin",  # missing in torch and Pyro
    ("mvn", "mvn"): "torch",
    ("mvn", "lowrank"): "torch",
    ("lowrank", "diag"): "builtin",  # missing in torch and Pyro
    ("lowrank", "mvn"): "builtin",  # torch's fails when cov_diag has extra batch dims
    ("lowrank", "lowrank"): "torch",
}


@pytest.mark.parametrize("batches", BATCHES, ids=str)
@pytest.mark.parametrize("kind_p", KINDS)
@pytest.mark.parametrize("kind_q", KINDS)
def test_gaussian_pairs(kind_q, kind_p, batches):
    torch.manual_seed(1)
    q = make_gaussian(kind_q, batches[0])
    p = make_gaussian(kind_p, batches[1], scale=1.5)
    kl, _ = check(q, p, EXPECTED_SOURCE[kind_q, kind_p])
    # torch's own result on the pair converted to full-covariance MVNs
    expected = tdist.kl_divergence(as_mvn(q), as_mvn(p))
    assert torch.allclose(kl, expected, rtol=1e-4, atol=1e-4)
    # the Gaussian fallback agrees too
    assert torch.allclose(gaussian_kl(q, p), expected, rtol=1e-4, atol=1e-4)
    if batches in [((4,), ()), ((2, 1), (3,))]:
        assert_close_mc(q, p, kl)


def test_lowrank_mvn_cov_diag_batch():
    # torch's _kl_lowrankmultivariatenormal_multivariatenormal fails on this pair
    q = dist.LowRankMultivariateNormal(torch.randn(N), torch.randn(N, 2), torch.rand(4, N) + 1)
    p = make_gaussian("mvn", ())
    with pytest.raises(RuntimeError):
        tdist.kl._kl_lowrankmultivariatenormal_multivariatenormal(q, p)
    kl, _ = check(q, p, "builtin")
    assert torch.allclose(kl, tdist.kl_divergence(as_mvn(q), as_mvn(p)), rtol=1e-4, atol=1e-4)
    # ours replaces torch's registration, so torch's kl_divergence works too
    assert torch.equal(tdist.kl_divergence(q, p), kl)


def test_replaced_registrations_agree():
    # the registrations ours replace return the same values where they return one
    import pyro.distributions.kl as pyro_kl

    torch.manual_seed(2)
    q, p = make_gaussian("diag", (4,)), make_gaussian("mvn", (4,))
    kl, _ = check(q, p, "builtin")
    assert torch.allclose(kl, pyro_kl._kl_independent_mvn(q, p), rtol=1e-5, atol=1e-5)
    v = torch.randn(4, N)
    assert torch.equal(
        tdist.kl_divergence(dist.Delta(v).to_event(1), p),
        pyro_kl._kl_independent_mvn(dist.Delta(v).to_event(1), p),
    )
    q = dist.Normal(torch.randn(2, 4, N), 1.0).to_event(2)
    p = tdist.Independent(tdist.Independent(tdist.Normal(torch.randn(4, N), 2.0), 1), 1)
    assert torch.allclose(
        tdist.kl_divergence(q, p), pyro_kl._kl_independent_independent(q, p), rtol=1e-6
    )
    q, p = make_gaussian("lowrank", (4,)), make_gaussian("mvn", (4,))
    assert torch.allclose(
        tdist.kl_divergence(q, p),
        tdist.kl._kl_lowrankmultivariatenormal_multivariatenormal(q, p),
        rtol=1e-4,
        atol=1e-4,
    )
    q, p = dist.LogNormal(torch.randn(3), 1.0), dist.LogNormal(0.0, 2.0)
    assert torch.allclose(
        tdist.kl_divergence(q, p), tdist.kl._kl_transformed_transformed(q, p), rtol=1e-6
    )


################################################################################
# Independent with different reinterpreted_batch_ndims, expand, broadcasting
################################################################################


def test_independent_different_ndims():
    torch.manual_seed(3)
    q = dist.Normal(torch.randn(3, 4), torch.rand(3, 4) + 0.5).to_event(2)
    # pyro's .to_event(1).to_event(1) merges into one Independent: nest explicitly
    p = tdist.Independent(tdist.Independent(tdist.Normal(torch.randn(3, 4), 2.0), 1), 1)
    q0, p0 = q.base_dist, p.base_dist.base_dist
    for a, b, expected in [(q, p, (q0, p0)), (p, q, (p0, q0))]:
        kl, rule = check(a, b, "builtin")
        assert "_kl_independent_independent" in rule.description
        assert torch.allclose(kl, tdist.kl_divergence(*expected).sum())
        assert_close_mc(a, b, kl)


def test_independent_zero_ndims():
    q = tdist.Independent(dist.Normal(torch.zeros(3), 1.0), 0)
    p = tdist.Independent(dist.Normal(torch.ones(3), 2.0), 0)
    kl, _ = check(q, p, "builtin")
    assert torch.allclose(kl, tdist.kl_divergence(q.base_dist, p.base_dist))


@pytest.mark.parametrize("kind", ["mvn", "lowrank"])
def test_independent_mvn_vs_independent_normal(kind):
    torch.manual_seed(4)
    q = make_gaussian(kind, (5,)).to_event(1)  # event (5, 3)
    p = dist.Normal(torch.randn(5, N), 2.0).to_event(2)
    for a, b in [(q, p), (p, q)]:
        kl, _ = check(a, b, "builtin")
        assert kl.shape == ()
        assert_close_mc(a, b, kl)
        # registered with torch: Independent(Normal, 1) vs LowRank was missing before
        assert torch.allclose(tdist.kl_divergence(a, b), kl)


@pytest.mark.parametrize("reverse", [False, True])
def test_normal_expand_and_plate_broadcast(reverse):
    torch.manual_seed(5)
    # guide expands over a plate of size 6 that the model's p is shared across
    q = dist.Normal(torch.randn(4), torch.rand(4) + 0.5).expand([6, 4]).to_event(1)
    p = dist.Normal(torch.randn(4), 2.0).to_event(1)
    q, p = (p, q) if reverse else (q, p)
    kl, _ = check(q, p, "builtin")
    assert kl.shape == (6,)
    assert_close_mc(q, p, kl)


def test_expanded_distribution():
    torch.manual_seed(6)
    q = ExpandedDistribution(dist.Gamma(torch.tensor([2.0]), 3.0), [5, 1])
    p = dist.Gamma(torch.rand(4) + 1, 1.0)
    for a, b in [(q, p), (p, q), (q, ExpandedDistribution(p, [2, 5, 4]))]:
        kl, rule = check(a, b, "builtin")
        assert rule.description == "builtin: _kl_expanded of [torch: _kl_gamma_gamma]"
        assert_close_mc(a, b, kl)


################################################################################
# Delta guides
################################################################################


def test_delta_log_density():
    torch.manual_seed(7)
    v = torch.randn(4, N)
    log_density = torch.randn(4)
    p = make_gaussian("mvn", ())
    guides = [
        dist.Delta(v, log_density=log_density, event_dim=1),
        dist.Delta(v, log_density=(log_density.unsqueeze(-1) / N).expand(4, N)).to_event(1),
        dist.Delta(v, log_density=log_density.unsqueeze(-1) / N).to_event(1),  # unexpanded
    ]
    for q in guides:
        kl, rule = check(q, p, "builtin")
        assert "delta_kl" in rule.description
        expected = q.log_prob(v) - p.log_prob(v)
        assert torch.allclose(kl, expected, atol=1e-5)
        assert_close_mc(q, p, kl)
        # Pyro's rule drops log_density
        assert torch.allclose(tdist.kl_divergence(dist.Delta(v, event_dim=1), p), -p.log_prob(v))


def test_delta_matches_trace_elbo():
    v, log_density = torch.tensor([0.3, -1.2]), torch.tensor(0.7)

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(2), 2.0).to_event(1))

    def guide():
        pyro.sample("z", dist.Delta(v, log_density=log_density, event_dim=1))

    loss = pyro.infer.Trace_ELBO().loss(model, guide)
    kl = kl_divergence(
        dist.Delta(v, log_density, event_dim=1), dist.Normal(torch.zeros(2), 2.0).to_event(1)
    )
    assert kl.item() == pytest.approx(loss, rel=1e-6)


def test_delta_any_model():
    torch.manual_seed(8)
    v = torch.rand(3).softmax(-1)
    for q, p in [
        (dist.Delta(v).to_event(1), dist.Dirichlet(torch.ones(3) * 2)),
        (dist.Delta(v), ExpandedDistribution(dist.Beta(2.0, 2.0), [3])),
        (dist.Delta(v).to_event(1), ExpandedDistribution(dist.Beta(2.0, 2.0), [3]).to_event(1)),
    ]:
        kl, _ = check(q, p, "builtin")
        assert torch.allclose(kl, -p.log_prob(v))


################################################################################
# TransformedDistribution
################################################################################


def test_transformed_same_transforms():
    torch.manual_seed(9)
    shared = T.AffineTransform(torch.tensor(1.0), torch.tensor(2.0))
    pairs = [
        (dist.LogNormal(torch.randn(4), 0.5), dist.LogNormal(0.0, 1.0)),
        (  # param-free transforms compare by ==
            dist.TransformedDistribution(dist.Normal(torch.randn(3), 1.0), [T.SigmoidTransform()]),
            dist.TransformedDistribution(dist.Normal(0.0, 2.0), [T.SigmoidTransform()]),
        ),
        (  # tensor-holding transforms: the same object
            dist.TransformedDistribution(dist.Normal(torch.randn(3), 1.0), [shared]),
            dist.TransformedDistribution(dist.Normal(0.0, 2.0), [shared]),
        ),
        (  # constant (no grad) tensors, different objects: compare by value
            dist.TransformedDistribution(
                dist.Normal(0.5, 1.0), [T.AffineTransform(torch.tensor(1.0), torch.tensor(2.0))]
            ),
            dist.TransformedDistribution(
                dist.Normal(0.0, 2.0), [T.AffineTransform(torch.tensor(1.0), torch.tensor(2.0))]
            ),
        ),
        (  # event-dim bookkeeping: StickBreaking reinterprets a batch dim of the base
            dist.TransformedDistribution(
                dist.Normal(torch.randn(2, 4), 0.5), [T.StickBreakingTransform()]
            ),
            dist.TransformedDistribution(
                dist.MultivariateNormal(torch.zeros(4), 2 * torch.eye(4)).expand([2]),
                [T.StickBreakingTransform()],
            ).expand([2]),
        ),
    ]
    for q, p in pairs:
        kl, rule = check(q, p, "builtin")
        assert "_kl_transformed_transformed" in rule.description
        assert_close_mc(q, p, kl)


def test_transformed_different_transforms_declines():
    q = dist.TransformedDistribution(dist.Normal(0.0, 1.0), [T.SigmoidTransform()])
    p = dist.TransformedDistribution(dist.Normal(0.0, 1.0), [T.TanhTransform()])
    rule, reason = find_kl_rule(q, p)
    assert rule is None and "transforms differ" in reason
    shift = torch.tensor(0.0, requires_grad=True)
    q = dist.TransformedDistribution(dist.Normal(0.0, 1.0), [T.AffineTransform(shift, 1.0)])
    p = dist.TransformedDistribution(dist.Normal(0.0, 1.0), [T.AffineTransform(shift, 1.0)])
    rule, reason = find_kl_rule(q, p)
    assert rule is None and "data dependent" in reason
    with pytest.raises(NotImplementedError, match="data dependent"):
        kl_divergence(q, p)
    # torch's kl_divergence compares them by value, as torch's own registration did
    assert tdist.kl_divergence(q, p) == 0


def test_transformed_rule_on_other_transforms():
    q = dist.LogNormal(0.0, 1.0)
    rule, _ = find_kl_rule(q, dist.LogNormal(1.0, 1.0))
    other = dist.TransformedDistribution(dist.Normal(1.0, 1.0), [T.SigmoidTransform()])
    with pytest.raises(NotImplementedError, match="site 'z'.*transforms differ"):
        compute_kl("z", q, other, rule)


def test_declining_builtin_reason_in_explain():
    shift = torch.tensor(0.5, requires_grad=True)

    def model():
        pyro.sample(
            "x", dist.TransformedDistribution(dist.Normal(0.0, 1.0), [T.SigmoidTransform()])
        )
        pyro.sample(
            "y",
            dist.TransformedDistribution(dist.Normal(0.0, 1.0), [T.AffineTransform(shift, 1.0)]),
        )

    def guide():
        pyro.sample("x", dist.TransformedDistribution(dist.Normal(0.3, 1.0), [T.TanhTransform()]))
        pyro.sample(
            "y",
            dist.TransformedDistribution(dist.Normal(0.2, 1.0), [T.AffineTransform(shift, 1.0)]),
        )

    plan = TraceMarkovKL_ELBO().explain(model, guide)
    assert plan.sites["x"].estimator == "mc"
    assert "transforms differ" in plan.sites["x"].reason
    assert plan.sites["y"].estimator == "mc"
    assert "data dependent" in plan.sites["y"].reason
    assert "data dependent" in str(plan)


################################################################################
# Gaussian fallback
################################################################################


def test_gaussian_fallback_dispatch():
    # Without torch's Normal rules, a Gaussian pair falls through to the fallback.
    reg = tdist.kl._KL_REGISTRY
    reg.pop((tdist.Normal, tdist.Normal))
    reg.pop((tdist.ExponentialFamily, tdist.ExponentialFamily))
    tdist.kl._KL_MEMOIZE.clear()
    torch.manual_seed(10)
    q = dist.Normal(torch.randn(2, 1), torch.rand(2, 1) + 0.5)
    p = dist.Normal(torch.randn(3), 2.0)
    kl, rule = check(q, p, "gaussian")
    assert rule.description.startswith("gaussian: gaussian_kl (Normal vs Normal")
    assert_close_mc(q, p, kl)
    assert find_kl_rule(dist.Gamma(1.0, 1.0), dist.Gamma(2.0, 1.0))[0].source == "torch"


@pytest.mark.parametrize(
    "kind_q,batches",
    [
        ("diag", ((2, 1), (3,))),
        ("diag", ((), (4,))),
        ("lowrank", ((2, 1), (3,))),
        ("lowrank", ((4,), ())),
    ],
    ids=str,
)
def test_gaussian_fallback_monte_carlo(kind_q, batches):
    # an independent reference: the mean of log q(x) - log p(x) over draws of q
    torch.manual_seed(14)
    q = make_gaussian(kind_q, batches[0])
    p = make_gaussian("mvn", batches[1], scale=1.5)
    kl = gaussian_kl(q, p)
    assert kl.shape == torch.broadcast_shapes(q.batch_shape, p.batch_shape)
    assert_close_mc(q, p, kl)


def test_gaussian_fallback_hand_written():
    # KL of diagonal Gaussians: sum of the scalar closed forms, by hand
    torch.manual_seed(15)
    mq, sq = torch.randn(2, 1, N), torch.rand(2, 1, N) + 0.5
    mp, sp = torch.randn(3, N), torch.rand(3, N) + 0.5
    q = dist.Normal(mq, sq).to_event(1)
    p = dist.MultivariateNormal(mp, scale_tril=torch.diag_embed(sp))
    by_hand = (sp.log() - sq.log() + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5).sum(-1)
    assert torch.allclose(gaussian_kl(q, p), by_hand, rtol=1e-5, atol=1e-5)


def test_gaussian_fallback_structures():
    torch.manual_seed(11)
    pairs = [
        (
            dist.Normal(torch.randn(5, 3, 4), 1.0).to_event(2),
            tdist.Independent(tdist.Independent(tdist.Normal(torch.randn(3, 4), 2.0), 1), 1),
        ),
        (make_gaussian("mvn", (3,)).to_event(1), dist.Normal(torch.randn(3, N), 1.0).to_event(2)),
        (ExpandedDistribution(make_gaussian("lowrank", ()), [2]), make_gaussian("diag", (2,))),
    ]
    for q, p in pairs:
        kl = gaussian_kl(q, p)
        assert kl.shape == torch.broadcast_shapes(q.batch_shape, p.batch_shape)
        assert torch.allclose(kl, kl_divergence(q, p), rtol=1e-4, atol=1e-4)


def test_gaussian_fallback_tiny_scales_high_dim():
    torch.manual_seed(12)
    n = 40
    q = dist.Normal(torch.randn(n), 1e-3).to_event(1)
    p = dist.Normal(torch.randn(2, n), torch.rand(2, n) + 0.5).to_event(1)
    kl = gaussian_kl(q, p)
    assert torch.isfinite(kl).all()
    assert torch.allclose(kl, tdist.kl_divergence(q, p), rtol=1e-4)


################################################################################
# Dispatch and precedence
################################################################################


class MyNormal(dist.Normal):
    pass


class MyIndependent(dist.Independent):
    pass


def _const(value):
    def fn(q, p):
        shape = torch.broadcast_shapes(q.batch_shape, p.batch_shape)
        return torch.full(shape, float(value))

    return fn


def test_precedence_scoped_torch():
    q, p = MyNormal(torch.zeros(3), 1.0), MyNormal(0.0, 2.0)
    rule, _ = find_kl_rule(q, p)
    assert rule.source == "torch" and rule.description == "torch: _kl_normal_normal"
    # torch registrations are used (registration invalidates the plan caches)
    version = registry_version()
    register_kl(MyNormal, MyNormal)(_const(1))
    assert registry_version() != version
    assert kl_divergence(q, p).tolist() == [1, 1, 1]
    assert find_kl_rule(q, p)[0].source == "torch"
    # scoped rules win over everything, even when less specific
    rules = {(tdist.Distribution, tdist.Distribution): _const(3)}
    assert kl_divergence(q, p, kl_rules=rules).tolist() == [3, 3, 3]
    assert find_kl_rule(q, p, rules)[0].source == "scoped"
    # other instances (no kl_rules) are unaffected
    assert kl_divergence(q, p).tolist() == [1, 1, 1]


def test_registry_version():
    v0 = registry_version()
    assert registry_version() == v0
    register_kl(MyNormal, MyNormal)(_const(2))
    v1 = registry_version()
    assert v1 != v0
    register_kl(MyNormal, MyNormal)(_const(1))  # rebinding a pair
    v2 = registry_version()
    assert v2 not in (v0, v1)
    tdist.kl._KL_REGISTRY.pop((MyNormal, MyNormal))
    assert registry_version() not in (v0, v1, v2)


def test_scoped_rules_leave_torch_registry_untouched():
    registry = dict(tdist.kl._KL_REGISTRY)
    q = MyNormal(torch.zeros(2, 3), 1.0).to_event(1)
    p = MyNormal(torch.zeros(2, 3), 1.0).to_event(1)
    rules = {(MyNormal, MyNormal): _const(1)}
    rule, _ = find_kl_rule(q, p, rules)
    assert rule.description.startswith("builtin: _kl_independent_independent of [scoped: ")
    assert rule.description.endswith(" registered for (MyNormal, MyNormal)]")
    assert compute_kl("z", q, p, rule).tolist() == [3, 3]

    def model():
        pyro.sample("z", MyNormal(torch.zeros(2, 3), 1.0).to_event(2))

    def guide():
        pyro.sample("z", MyNormal(torch.ones(2, 3), 1.0).to_event(2))

    elbo = TraceMarkovKL_ELBO(kl_rules=rules)
    assert elbo.loss(model, guide) == pytest.approx(6.0)
    assert tdist.kl._KL_REGISTRY == registry
    # torch's kl_divergence and other ELBOs do not see them
    assert torch.allclose(tdist.kl_divergence(q, p), torch.zeros(2))
    assert TraceMarkovKL_ELBO().loss(model, guide) == pytest.approx(3.0)


def test_scoped_rules_ambiguous():
    rules = {(MyNormal, tdist.Normal): _const(1), (tdist.Normal, MyNormal): _const(2)}
    with pytest.warns(RuntimeWarning, match=r"Ambiguous kl_rules.*add \(MyNormal, MyNormal\)"):
        find_kl_rule(MyNormal(0.0, 1.0), MyNormal(0.0, 1.0), rules)


def test_most_specific_and_ambiguous():
    register_kl(tdist.Normal, tdist.Normal)(_const(1))
    register_kl(MyNormal, tdist.Normal)(_const(2))
    q, p = MyNormal(0.0, 1.0), MyNormal(0.0, 2.0)
    assert kl_divergence(q, p).item() == 2
    assert kl_divergence(dist.Normal(0.0, 1.0), p).item() == 1
    register_kl(tdist.Normal, MyNormal)(_const(3))
    with pytest.warns(RuntimeWarning, match="Ambiguous.*register_kl\\(MyNormal, MyNormal\\)"):
        find_kl_rule(q, p)
    register_kl(MyNormal, MyNormal)(_const(4))  # break the tie
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kl_divergence(q, p).item() == 4


def test_same_function_for_two_pairs_is_not_ambiguous():
    # torch registers one function for several pairs, e.g. _kl_normal_infinity
    class MyBeta(dist.Beta):
        pass

    fn = tdist.kl._KL_REGISTRY[tdist.Normal, tdist.Beta]
    register_kl(MyNormal, tdist.Beta)(fn)
    register_kl(tdist.Normal, MyBeta)(fn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rule, _ = find_kl_rule(MyNormal(0.0, 1.0), MyBeta(1.0, 1.0))
    assert rule.fn is fn


def test_specific_torch_registration_beats_generic_builtin():
    q = MyIndependent(dist.Normal(torch.zeros(2, 3), 1.0), 1)
    p = MyIndependent(dist.Normal(torch.zeros(2, 3), 2.0), 1)
    assert find_kl_rule(q, p)[0].source == "builtin"
    register_kl(MyIndependent, MyIndependent)(_const(5))
    rule, _ = find_kl_rule(q, p)
    assert rule.source == "torch"
    assert compute_kl("z", q, p, rule).tolist() == [5, 5]


def test_user_rule_applies_inside_builtin_composites():
    register_kl(MyNormal, MyNormal)(_const(2))
    q = MyNormal(torch.zeros(2, 3), 1.0).to_event(1)
    p = MyNormal(torch.zeros(2, 3), 1.0).to_event(1)
    assert kl_divergence(q, p).tolist() == [6, 6]
    rules = {(MyNormal, MyNormal): _const(1)}
    assert kl_divergence(q, p, kl_rules=rules).tolist() == [3, 3]


@pytest.mark.parametrize("wrap", ["independent", "expanded", "expanded-independent"])
def test_torch_registration_inside_wrappers(wrap):
    # a user's rule registered with torch's register_kl, used inside Independent and
    # ExpandedDistribution by torch's kl_divergence and by the ELBO
    class MyGamma(dist.Gamma):
        pass

    register_kl(MyGamma, MyGamma)(_const(2))

    def wrapped(d):
        if wrap == "independent":
            return d.to_event(1)
        d = ExpandedDistribution(d, [4, 3])
        return d.to_event(1) if wrap == "expanded-independent" else d

    expected = torch.full((4,), 6.0) if wrap != "expanded" else torch.full((4, 3), 2.0)
    if wrap == "independent":
        expected = torch.full((), 6.0)
    q, p = wrapped(MyGamma(torch.ones(3), 1.0)), wrapped(MyGamma(torch.ones(3), 2.0))
    assert torch.equal(tdist.kl_divergence(q, p), expected)
    rule, _ = find_kl_rule(q, p)
    assert rule.source == "builtin" and "[torch: " in rule.description
    assert torch.equal(compute_kl("z", q, p, rule), expected)

    def in_plates(d):
        with contextlib.ExitStack() as stack:
            for i, size in enumerate(expected.shape):
                stack.enter_context(pyro.plate(f"plate_{i}", size, dim=i - expected.dim()))
            pyro.sample("z", d)

    def model():
        in_plates(wrapped(MyGamma(torch.ones(3), 2.0)))

    def guide():
        in_plates(wrapped(MyGamma(torch.ones(3), 1.0)))

    assert TraceMarkovKL_ELBO().loss(model, guide) == pytest.approx(expected.sum().item())


def test_dispatch_of_torch_and_pyro_pairs_unchanged():
    # In a fresh interpreter: registering the built-in pairs changes torch's dispatch only
    # for the pairs whose torch/Pyro function it replaces, and adds no ambiguity.
    script = """
import importlib, inspect, json, sys, warnings
import torch.distributions as td, torch.distributions.kl as k
import pyro.distributions as pd
import pyro.distributions.kl as pkl

classes = sorted({c for m in (td, pd) for c in vars(m).values()
                  if inspect.isclass(c) and issubclass(c, td.Distribution)}, key=repr)

def table():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return {(a, b): k._dispatch_kl(a, b) for a in classes for b in classes}

if sys.argv[1] in sys.modules:  # importing torch or Pyro registers them already
    print(json.dumps({"skip": True}))
    sys.exit()
before = table()
kl_pairs = importlib.import_module(sys.argv[1])
after = table()
replaced = {
    k._kl_lowrankmultivariatenormal_multivariatenormal, k._kl_transformed_transformed,
    pkl._kl_independent_independent, pkl._kl_independent_mvn, pkl._kl_delta,
}
bad = [(a.__name__, b.__name__) for (a, b), fn in before.items()
       if fn is not NotImplemented and after[a, b] is not fn and fn not in replaced]
new = sum(fn is NotImplemented and after[ab] is not NotImplemented for ab, fn in before.items())
assert all(fn in set(kl_pairs.BUILTIN_KL.values()) or fn is before[ab]
           for ab, fn in after.items()), "unexpected function"
print(json.dumps({"bad": bad, "new": new}))
"""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", script, gaussian_kl.__module__], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    if result.get("skip"):
        pytest.skip("the built-in pairs are registered on importing Pyro")
    assert result["bad"] == []
    assert result["new"] > 0


def test_no_ambiguity_among_builtins():
    v = torch.rand(3).softmax(-1)
    dists = [
        dist.Normal(torch.zeros(3), 1.0).to_event(1),
        make_gaussian("mvn", ()),
        make_gaussian("lowrank", ()),
        dist.Delta(v, event_dim=1),
        dist.Delta(v).to_event(1),
        ExpandedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [2]),
        dist.TransformedDistribution(
            dist.Normal(torch.zeros(3), 1.0).to_event(1), [T.ExpTransform()]
        ),
        dist.Dirichlet(torch.ones(3)),
        tdist.Dirichlet(torch.ones(3)),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for q in dists:
            for p in dists:
                find_kl_rule(q, p)


def test_no_rule_reasons():
    rule, reason = find_kl_rule(dist.Gamma(1.0, 1.0), dist.LogNormal(0.0, 1.0))
    assert rule is None and reason == "no kl_divergence registered for (Gamma, LogNormal)"
    rule, reason = find_kl_rule(dist.Normal(torch.zeros(3), 1.0), make_gaussian("mvn", ()))
    assert rule is None and "event shapes differ" in reason
    rule, reason = find_kl_rule(dist.Normal(torch.zeros(3), 1.0), dist.Normal(torch.zeros(4), 1.0))
    assert rule is None and "do not broadcast" in reason


def test_expfamily_different_types_declines():
    class MyGamma(dist.Gamma):
        pass

    tdist.kl._KL_REGISTRY.pop((tdist.Gamma, tdist.Gamma))
    tdist.kl._KL_MEMOIZE.clear()
    rule, reason = find_kl_rule(MyGamma(1.0, 1.0), dist.Gamma(2.0, 1.0))
    assert rule is None and "different exponential families" in reason
    rule, _ = find_kl_rule(dist.Gamma(1.0, 1.0), dist.Gamma(2.0, 1.0))
    assert rule.description == "torch: _kl_expfamily_expfamily"


def test_kl_rules_type_errors():
    with pytest.raises(TypeError):
        find_kl_rule(dist.Normal(0.0, 1.0), dist.Normal(0.0, 1.0), {(int, tdist.Normal): None})


################################################################################
# Checks of item 2
################################################################################


def _rule(fn, description="registry: custom"):
    return KLRule(fn, "registry", description)


def test_wrong_shape_error():
    q, p = MyNormal(torch.zeros(3, 1), 1.0), MyNormal(torch.zeros(4), 1.0)
    register_kl(MyNormal, MyNormal)(lambda q, p: torch.zeros(3, 1))
    with pytest.raises(KLDivergenceError, match=r"site 'z'.*shape \(3, 1\), expected \(3, 4\)"):
        compute_kl("z", q, p, find_kl_rule(q, p)[0])
    with pytest.raises(KLDivergenceError, match="expand it"):
        compute_kl("z", q, p, find_kl_rule(q, p)[0])
    q, p = MyNormal(torch.zeros(3, 4), 1.0).to_event(1), MyNormal(0.0, 1.0).expand([4]).to_event(1)
    with pytest.raises(KLDivergenceError, match="forgot to sum over the 1 event dims"):
        compute_kl("z", q, p, _rule(lambda q, p: torch.zeros(3, 4)))
    with pytest.raises(KLDivergenceError, match="returned float"):
        compute_kl("z", q, p, _rule(lambda q, p: 0.0))


def test_infinite_error():
    q, p = MyNormal(torch.zeros(3), 1.0), MyNormal(0.0, 1.0)
    register_kl(MyNormal, MyNormal)(lambda q, p: torch.tensor([0.0, math.inf, 1.0]))
    with pytest.raises(KLDivergenceError, match=r"site 'w'.*\+inf at 1 of 3.*\(1,\).*mass"):
        compute_kl("w", q, p, find_kl_rule(q, p)[0])
    # a real support mismatch
    q, p = dist.Uniform(0.0, 2.0), dist.Uniform(0.0, 1.0)
    with pytest.raises(KLDivergenceError, match=r"site 'u'.*Uniform.*Uniform.*guide puts mass"):
        compute_kl("u", q, p, find_kl_rule(q, p)[0])
    with pytest.raises(KLDivergenceError, match=r"-inf"):
        compute_kl("u", q, p, _rule(lambda q, p: torch.tensor(-math.inf)))


def test_nan_error():
    q, p = MyNormal(torch.zeros(2), 1.0), MyNormal(0.0, 1.0)
    register_kl(MyNormal, MyNormal)(lambda q, p: torch.tensor([math.nan, 0.0]))
    with pytest.raises(KLDivergenceError, match=r"site 'z'.*NaN at 1 of 2.*produced it"):
        compute_kl("z", q, p, find_kl_rule(q, p)[0])
    q = dist.Normal(torch.tensor([0.0, math.nan]), 1.0, validate_args=False)
    p = dist.Normal(0.0, 1.0)
    with pytest.raises(KLDivergenceError, match=r"NaN.*non-finite parameters: q.loc"):
        compute_kl("z", q, p, find_kl_rule(q, p)[0])


def test_value_checks_skipped(monkeypatch):
    q, p = dist.Uniform(0.0, 2.0), dist.Uniform(0.0, 1.0)
    rule, _ = find_kl_rule(q, p)
    assert compute_kl("u", q, p, rule, check_values=False).item() == math.inf
    monkeypatch.setattr(torch._C, "_get_tracing_state", lambda: True)
    assert compute_kl("u", q, p, rule).item() == math.inf


def test_not_implemented_wrapped():
    def fn(q, p):
        raise NotImplementedError("nope")

    q, p = dist.Normal(0.0, 1.0), dist.Normal(0.0, 1.0)
    with pytest.raises(NotImplementedError, match="site 'z'.*nope"):
        compute_kl("z", q, p, _rule(fn))
    with pytest.raises(NotImplementedError, match="no kl_divergence registered"):
        kl_divergence(dist.Gamma(1.0, 1.0), dist.LogNormal(0.0, 1.0))


################################################################################
# Gradients of the closed forms against autograd of the Monte Carlo estimate
################################################################################

GROUPS, PER_GROUP = 100, 1_000


def _gaussian_params(kind, prefix, scale):
    g = torch.Generator().manual_seed(KINDS.index(kind) + 10 * (prefix == "p_"))
    params = {f"{prefix}loc": torch.randn(N, generator=g)}
    if kind == "diag":
        params[f"{prefix}scale"] = scale * (torch.rand(N, generator=g) + 0.5)
    elif kind == "mvn":
        A = 0.3 * torch.randn(N, N, generator=g)
        params[f"{prefix}tril"] = scale * (
            torch.tril(A, -1) + torch.diag(torch.rand(N, generator=g) + 0.5)
        )
    else:
        params[f"{prefix}W"] = 0.5 * scale * torch.randn(N, 2, generator=g)
        params[f"{prefix}D"] = scale**2 * (torch.rand(N, generator=g) + 0.5)
    return params


def _gaussian_from(kind, prefix, params):
    loc = params[f"{prefix}loc"]
    if kind == "diag":
        return dist.Normal(loc, params[f"{prefix}scale"]).to_event(1)
    if kind == "mvn":
        return dist.MultivariateNormal(loc, scale_tril=params[f"{prefix}tril"])
    return dist.LowRankMultivariateNormal(loc, params[f"{prefix}W"], params[f"{prefix}D"])


def assert_grads_match_mc(make: Callable, params: Dict[str, torch.Tensor], kl_fn=None):
    """
    Per-parameter check that the gradient of the closed form agrees with the
    gradient of the reparameterized MC estimate (1e5 samples) within 5 SE.
    Parameters are replicated over GROUPS batch elements, each estimated with
    PER_GROUP samples in one vectorized call, to get the SE from one backward.
    """
    kl_fn = kl_fn or kl_divergence

    def replicate():
        return {
            k: v.detach().expand((GROUPS,) + v.shape).clone().requires_grad_()
            for k, v in params.items()
        }

    exact = replicate()
    q, p = make(exact)
    kl_fn(q, p).sum().backward()
    mc = replicate()
    q, p = make(mc)
    torch.manual_seed(13)
    x = q.rsample((PER_GROUP,))
    (q.log_prob(x) - p.log_prob(x)).mean(0).sum().backward()
    for name in params:
        g_exact = exact[name].grad[0]
        assert torch.allclose(exact[name].grad, g_exact.expand_as(exact[name].grad), atol=1e-5)
        g_mc = mc[name].grad
        mean, se = g_mc.mean(0), g_mc.std(0) / math.sqrt(GROUPS)
        mask = torch.ones_like(mean, dtype=torch.bool)
        if name.endswith("tril"):  # only the lower triangle is a parameter
            mask = torch.ones(N, N).tril().bool()
        err = (g_exact - mean).abs()
        ok = err <= 5 * se + 1e-4
        assert ok[mask].all(), f"{name}: exact={g_exact}, mc={mean}, se={se}"


@pytest.mark.parametrize(
    "kind_q,kind_p",
    [
        ("diag", "mvn"),
        ("mvn", "diag"),
        ("diag", "lowrank"),
        ("lowrank", "diag"),
        ("lowrank", "mvn"),
    ],
)
def test_closed_form_gradients(kind_q, kind_p):
    params = {**_gaussian_params(kind_q, "q_", 1.0), **_gaussian_params(kind_p, "p_", 1.5)}

    def make(ps):
        return _gaussian_from(kind_q, "q_", ps), _gaussian_from(kind_p, "p_", ps)

    q, p = make(params)
    assert find_kl_rule(q, p)[0].source == "builtin"
    assert_grads_match_mc(make, params)


def test_gaussian_fallback_gradients():
    params = {**_gaussian_params("diag", "q_", 1.0), **_gaussian_params("mvn", "p_", 1.5)}

    def make(ps):
        return _gaussian_from("diag", "q_", ps), _gaussian_from("mvn", "p_", ps)

    assert_grads_match_mc(make, params, kl_fn=gaussian_kl)


def test_delta_gradient():
    v = torch.randn(N, requires_grad=True)
    log_density = torch.tensor(0.5, requires_grad=True)
    p_loc = torch.zeros(N, requires_grad=True)
    p = dist.Normal(p_loc, 2.0).to_event(1)
    kl = kl_divergence(dist.Delta(v, log_density, event_dim=1), p)
    grads = torch.autograd.grad(kl, [v, log_density, p_loc])
    expected = torch.autograd.grad(log_density - p.log_prob(v), [v, log_density, p_loc])
    for a, b in zip(grads, expected):
        assert torch.allclose(a, b)
