# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
Second break-it round (KL rules on torch's registry, the Trace_ELBO subclass): the replaced
registrations against the originals on many pairs, Pyro's ``.mask(False)`` inside
``.to_event`` (a float KL of 0.0 from Pyro's masked pair), and user-style programs against
Trace_ELBO (and Pyro's TraceMeanField_ELBO, which now sees our pairs) at 5 standard errors.
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pyro.distributions.kl as pyro_kl
import pytest
import torch
import torch.distributions as tdist
import torch.distributions.kl as torch_kl
from helpers import loss_and_grad_stats, restored_kl_registry, z_scores
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal
from torch.distributions import constraints
from torch.distributions import transforms as T

from pyro_markov_kl import TraceMarkovKL_ELBO


@pytest.fixture(autouse=True)
def _fresh_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def _pos(*shape):
    return torch.rand(*shape) + 0.5


def _mvn(batch, n):
    a = torch.randn(*batch, n, n)
    cov = a @ a.mT + n * torch.eye(n)
    return dist.MultivariateNormal(torch.randn(*batch, n), scale_tril=torch.linalg.cholesky(cov))


def _lowrank(batch, n):
    return dist.LowRankMultivariateNormal(
        torch.randn(*batch, n), torch.randn(*batch, n, 2), _pos(*batch, n)
    )


# --- the replaced registrations return the originals' values ---------------------------------

# (original function, q, p): pairs where the original returns a value
ORIGINAL_PAIRS = {
    "indep_normal_bcast": lambda: (
        pyro_kl._kl_independent_independent,
        dist.Normal(torch.randn(4, 1, 3), _pos(4, 1, 3)).to_event(1),
        dist.Normal(torch.randn(2, 3), _pos(2, 3)).to_event(1),
    ),
    "indep_gamma_2_vs_1": lambda: (
        pyro_kl._kl_independent_independent,
        dist.Gamma(_pos(2, 3), _pos(2, 3)).to_event(2),
        dist.Gamma(_pos(2, 3), _pos(2, 3)).to_event(2),
    ),
    "indep_beta_expanded": lambda: (
        pyro_kl._kl_independent_independent,
        dist.Beta(_pos(()), _pos(())).expand([2, 3]).to_event(1),
        dist.Beta(_pos(3), _pos(3)).to_event(1),
    ),
    "indep_dirichlet": lambda: (
        pyro_kl._kl_independent_independent,
        dist.Dirichlet(_pos(2, 4)).to_event(1),
        dist.Dirichlet(_pos(2, 4)).to_event(1),
    ),
    "indep_masked_tensor": lambda: (
        pyro_kl._kl_independent_independent,
        dist.Normal(torch.randn(3), _pos(3)).mask(torch.tensor([True, False, True])).to_event(1),
        dist.Normal(torch.randn(3), _pos(3)).mask(torch.tensor([True, True, False])).to_event(1),
    ),
    "indep_masked_false": lambda: (
        pyro_kl._kl_independent_independent,
        dist.Normal(torch.randn(3), _pos(3)).mask(False).to_event(1),
        dist.Normal(torch.randn(3), _pos(3)).mask(False).to_event(1),
    ),
    "indep_delta_log_density": lambda: (
        pyro_kl._kl_independent_independent,
        dist.Delta(torch.randn(3), log_density=torch.randn(3)).to_event(1),
        dist.Normal(torch.randn(3), _pos(3)).to_event(1),
    ),
    "indep_lognormal": lambda: (
        pyro_kl._kl_independent_independent,
        dist.LogNormal(torch.randn(3), _pos(3)).to_event(1),
        dist.LogNormal(torch.randn(3), _pos(3)).to_event(1),
    ),
    "indep_normal_vs_mvn_bcast": lambda: (
        pyro_kl._kl_independent_mvn,
        dist.Normal(torch.randn(4, 1, 3), _pos(4, 1, 3)).to_event(1),
        _mvn((2,), 3),
    ),
    "indep_delta_vs_mvn": lambda: (
        pyro_kl._kl_independent_mvn,
        dist.Delta(torch.randn(2, 3)).to_event(1),
        _mvn((2,), 3),
    ),
    "lowrank_vs_mvn_bcast": lambda: (
        torch_kl._kl_lowrankmultivariatenormal_multivariatenormal,
        _lowrank((4, 1), 3),
        _mvn((2,), 3),
    ),
    "lowrank_vs_mvn_unbatched_p": lambda: (
        torch_kl._kl_lowrankmultivariatenormal_multivariatenormal,
        _lowrank((5,), 3),
        _mvn((), 3),
    ),
    "transformed_same_exp": lambda: (
        torch_kl._kl_transformed_transformed,
        dist.TransformedDistribution(dist.Normal(torch.randn(3), _pos(3)), [T.ExpTransform()]),
        dist.TransformedDistribution(dist.Normal(torch.randn(3), _pos(3)), [T.ExpTransform()]),
    ),
    "transformed_equal_affine_tensors": lambda: (
        torch_kl._kl_transformed_transformed,
        dist.TransformedDistribution(
            dist.Normal(torch.randn(3), _pos(3)), [T.AffineTransform(torch.ones(3), 2.0)]
        ),
        dist.TransformedDistribution(
            dist.Normal(torch.randn(3), _pos(3)), [T.AffineTransform(torch.ones(3), 2.0)]
        ),
    ),
    "lognormal_independent_base": lambda: (
        torch_kl._kl_transformed_transformed,
        dist.TransformedDistribution(
            dist.Normal(torch.randn(3), _pos(3)).to_event(1), [T.ExpTransform()]
        ),
        dist.TransformedDistribution(
            dist.Normal(torch.randn(3), _pos(3)).to_event(1), [T.ExpTransform()]
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(ORIGINAL_PAIRS))
def test_replaced_registrations_return_the_originals_values(name):
    torch.manual_seed(0)
    original, q, p = ORIGINAL_PAIRS[name]()
    expected = original(q, p)
    actual = tdist.kl_divergence(q, p)
    if not torch.is_tensor(expected):  # Pyro's masked pair returns the float 0.0
        assert not torch.is_tensor(actual) and actual == expected
        return
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


# --- .mask(False) inside .to_event: Pyro's masked pair returns the float 0.0 -------------------


def _masked_model(y):
    z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([3]).mask(False).to_event(1))
    pyro.sample("y", dist.Normal(z, 1.0).to_event(1), obs=y)


def _masked_guide(y):
    m = pyro.param("m", torch.zeros(3))
    pyro.sample("z", dist.Normal(m, 0.8).mask(False).to_event(1))


def test_mask_false_inside_to_event_with_trace_mean_field():
    # importing pyro_markov_kl made Pyro's own TraceMeanField_ELBO raise KLDivergenceError
    # (a ValueError) here: our (Independent, Independent) rejected the float 0.0 that
    # Pyro's (MaskedDistribution, MaskedDistribution) returns for a mask of False.
    # Both log-density terms of z are masked, so with the same samples the loss is
    # Trace_ELBO's exactly.
    y = torch.tensor([0.5, -1.0, 2.0])
    losses = []
    for elbo in (TraceMeanField_ELBO(), Trace_ELBO(), TraceMarkovKL_ELBO()):
        pyro.set_rng_seed(0)
        losses.append(elbo.loss(_masked_model, _masked_guide, y))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert losses[2] == pytest.approx(losses[1], rel=1e-6)


# --- user-style programs at 5 standard errors ------------------------------------------------

Y3 = torch.tensor([0.5, -1.0, 2.0])
L3 = torch.linalg.cholesky(torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 1.0]]))


def _coin(data):
    def model(data):
        f = pyro.sample("f", dist.Beta(10.0, 10.0))
        with pyro.plate("d", len(data)):
            pyro.sample("obs", dist.Bernoulli(f), obs=data)

    def guide(data):
        a = pyro.param("a", torch.tensor(15.0), constraint=constraints.positive)
        b = pyro.param("b", torch.tensor(15.0), constraint=constraints.positive)
        pyro.sample("f", dist.Beta(a, b))

    return model, guide, (torch.tensor([1.0, 1, 1, 0, 1, 0]),)


def _masks_differ(_):
    # different tensor masks on model and guide, inside .to_event, as users write them
    def model(y):
        mask = torch.tensor([True, False, True])
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([3]).mask(mask).to_event(1))
        pyro.sample("y", dist.Normal(z, 1.0).to_event(1), obs=y)

    def guide(y):
        m = pyro.param("m", torch.zeros(3))
        pyro.sample("z", dist.Normal(m, 0.8).mask(torch.tensor([True, True, False])).to_event(1))

    return model, guide, (Y3,)


def _mvn_prior_lowrank_guide(_):
    def model(y):
        z = pyro.sample("z", dist.MultivariateNormal(torch.zeros(3), scale_tril=L3))
        pyro.sample("y", dist.Normal(z.sum(-1), 1.0), obs=y)

    def guide(y):
        m = pyro.param("m", torch.zeros(3))
        w = pyro.param("W", 0.2 * torch.ones(3, 2))
        pyro.sample("z", dist.LowRankMultivariateNormal(m, w, torch.ones(3)))

    return model, guide, (torch.tensor(1.0),)


def _gaussian_fallback(_):
    # Independent(Normal, 2) guide vs Independent(MVN, 1) prior: no registered pair
    def model(y):
        z = pyro.sample("z", dist.MultivariateNormal(torch.zeros(2, 3), scale_tril=L3).to_event(1))
        pyro.sample("y", dist.Normal(z.sum((-1, -2)), 1.0), obs=y)

    def guide(y):
        m = pyro.param("m", torch.zeros(2, 3))
        s = pyro.param("s", torch.ones(2, 3), constraint=constraints.positive)
        pyro.sample("z", dist.Normal(m, s).to_event(2))

    return model, guide, (torch.tensor(1.0),)


def _lognormal_affine_exp_affine(_):
    def model(y):
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        pyro.sample("y", dist.Normal(0.0, s), obs=y)

    def guide(y):
        m = pyro.param("m", torch.tensor(0.0))
        sd = pyro.param("sd", torch.tensor(0.5), constraint=constraints.positive)
        ts = [T.AffineTransform(0.0, 2.0), T.ExpTransform(), T.AffineTransform(0.0, 0.5)]
        pyro.sample("s", dist.TransformedDistribution(dist.Normal(m, sd), ts))

    return model, guide, (torch.tensor(1.7),)


def _per_element_scale(_):
    sc = torch.tensor([0.5, 1.0, 2.0])

    def model(y):
        g0 = pyro.sample("g0", dist.Normal(0.0, 1.0))
        with pyro.plate("n", 3), poutine.scale(scale=sc):
            z = pyro.sample("z", dist.Normal(g0, 1.0))
            pyro.sample("y", dist.Normal(z, 1.0), obs=y)

    def guide(y):
        a = pyro.param("a", torch.tensor(0.0))
        c = pyro.param("c", torch.zeros(3))
        g0 = pyro.sample("g0", dist.Normal(a, 0.5))
        with pyro.plate("n", 3), poutine.scale(scale=sc):
            pyro.sample("z", dist.Normal(c + 0.3 * g0, 0.8))

    return model, guide, (torch.tensor([0.2, 1.0, -1.0]),)


def _auto_mvn(_):
    def model(y):
        z = pyro.sample("z", dist.MultivariateNormal(torch.zeros(3), scale_tril=L3))
        pyro.sample("y", dist.Normal(z.sum(-1), 1.0), obs=y)

    return model, AutoMultivariateNormal(model), (torch.tensor(1.0),)


PROGRAMS = {
    "coin_beta": _coin,
    "masks_differ_to_event": _masks_differ,
    "mvn_prior_lowrank_guide": _mvn_prior_lowrank_guide,
    "gaussian_fallback": _gaussian_fallback,
    "lognormal_affine_exp_affine": _lognormal_affine_exp_affine,
    "per_element_scale": _per_element_scale,
    "auto_mvn": _auto_mvn,
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("ours", ["markov_kl", "mean_field"])
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_user_programs_agree_with_trace_elbo(name, ours):
    model, guide, args = PROGRAMS[name](None)
    pyro.set_rng_seed(0)
    with poutine.block():
        guide(*args)
    store = pyro.get_param_store()
    params = [store[n].unconstrained() for n in sorted(store.keys())]
    cls = TraceMarkovKL_ELBO if ours == "markov_kl" else TraceMeanField_ELBO
    kw = dict(num_particles=100, vectorize_particles=True, max_plate_nesting=1)
    pyro.set_rng_seed(1)
    a = loss_and_grad_stats(cls(**kw), model, guide, params, 20, *args)
    pyro.set_rng_seed(2)
    b = loss_and_grad_stats(Trace_ELBO(**kw), model, guide, params, 20, *args)
    z = z_scores(a, b)
    assert z["loss"] < 5 and float(z["grad"].max()) < 5, z


def test_user_rule_registered_with_torch_applies_inside_independent():
    class MyNormal(dist.Normal):
        pass

    calls = []

    def kl_my(q, p):
        calls.append(1)
        return torch_kl._kl_normal_normal(q, p)

    def model(y):
        z = pyro.sample("z", MyNormal(torch.zeros(3), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(z.sum(-1), 1.0), obs=y)

    def guide(y):
        m = pyro.param("m", torch.zeros(3))
        pyro.sample("z", MyNormal(m, 0.7).to_event(1))

    with restored_kl_registry():
        torch_kl.register_kl(MyNormal, MyNormal)(kl_my)
        pyro.set_rng_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss = TraceMarkovKL_ELBO().loss(model, guide, torch.tensor(1.0))
    assert calls
    assert math.isfinite(loss)


def _jit_independent_pair():
    def model(data):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        pyro.sample("obs", dist.Normal(z.sum(-1), 1.0), obs=data)

    def guide(data):
        m = pyro.param("m", lambda: torch.zeros(3))
        pyro.sample("z", dist.Normal(m, 0.5).to_event(1))

    return model, guide


def _jit_transformed_mc():
    # a TransformedDistribution guide against a LogNormal prior: Monte Carlo, whose
    # log_p/log_q shape comparison read traced shapes
    def model(data):
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(0.0, s), obs=data)

    def guide(data):
        m = pyro.param("m", lambda: torch.tensor(0.0))
        ts = [T.AffineTransform(0.0, 2.0), T.ExpTransform(), T.AffineTransform(0.0, 0.5)]
        pyro.sample("s", dist.TransformedDistribution(dist.Normal(m, 0.5), ts))

    return model, guide


def _jit_stacked_chain():
    # two analytic sites of one kind, stacked into one KL call (batched_analytic_term)
    def model(data):
        z = pyro.sample("z_0", dist.Normal(torch.zeros(2), 0.5).to_event(1))
        z = pyro.sample("z_1", dist.Normal(0.8 * z, 0.5).to_event(1))
        pyro.sample("obs", dist.Normal(z.sum(-1), 1.0), obs=data)

    def guide(data):
        a = pyro.param("a", lambda: torch.tensor(0.5))
        z = pyro.sample("z_0", dist.Normal(torch.zeros(2), 0.6).to_event(1))
        pyro.sample("z_1", dist.Normal(a * z, 0.6).to_event(1))

    return model, guide


def _jit_tensor_masks_in_to_event():
    # tensor masks inside .to_event (unwrap_mask's constant-along-the-event check)
    def model(data):
        mask = torch.tensor([True, False, True])
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([3]).mask(mask).to_event(1))
        pyro.sample("obs", dist.Normal(z.sum(-1), 1.0), obs=data)

    def guide(data):
        m = pyro.param("m", lambda: torch.zeros(3))
        pyro.sample("z", dist.Normal(m, 0.8).mask(torch.tensor([True, True, False])).to_event(1))

    return model, guide


@pytest.mark.parametrize(
    "program",
    [_jit_independent_pair, _jit_transformed_mc, _jit_stacked_chain, _jit_tensor_masks_in_to_event],
)
def test_jit_gives_no_tracer_warning_where_jit_trace_elbo_gives_none(program):
    # The estimator's structural reads of traced shapes (the (Independent, Independent) shape
    # check, the Monte Carlo term's shape comparison, stacking, the mask check) gave
    # TracerWarnings that JitTrace_ELBO does not give; under Pyro's warnings-as-errors
    # "SystemError: <method '__bool__' ...> returned a result with an exception set"
    from pyro.infer import JitTrace_ELBO

    from pyro_markov_kl import JitTraceMarkovKL_ELBO

    model, guide = program()
    where = []
    for cls in (JitTrace_ELBO, JitTraceMarkovKL_ELBO):
        pyro.clear_param_store()
        elbo = cls(num_particles=10, vectorize_particles=True, max_plate_nesting=0)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            loss = elbo.loss_and_grads(model, guide, torch.tensor(1.0))
        assert math.isfinite(loss)
        where.append(
            {
                (w.filename, w.lineno, str(w.message)[:40])
                for w in record
                if issubclass(w.category, torch.jit.TracerWarning)
            }
        )
    assert where[1] <= where[0], where[1] - where[0]


def test_non_bijective_equal_transforms_decline():
    # torch's (TransformedDistribution, TransformedDistribution) returns KL(base) here, which
    # exceeds the KL of the folded pair; ours declines (Monte Carlo), a documented difference
    torch.manual_seed(0)
    q = dist.FoldedDistribution(dist.Normal(torch.tensor(1.0), 1.0))
    p = dist.FoldedDistribution(dist.Normal(torch.tensor(-0.5), 2.0))
    with pytest.raises(NotImplementedError, match="not bijective"):
        tdist.kl_divergence(q, p)
    # the folded KL (Monte Carlo) is below torch's value, the KL of the bases
    x = q.sample((200000,))
    mc = (q.log_prob(x) - p.log_prob(x)).mean()
    assert mc < torch_kl._kl_transformed_transformed(q, p) - 0.1
