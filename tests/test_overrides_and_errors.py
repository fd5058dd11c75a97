# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""Per-site ``infer={"kl": ...}`` overrides and the errors for bad input."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_markov_kl import TraceMarkovKL_ELBO


def chain_model():
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    b = pyro.sample("b", dist.Normal(a, 1.0))
    pyro.sample("x", dist.Normal(b, 1.0), obs=torch.tensor(0.0))


def forward_guide(kl_a="auto", kl_b="auto"):
    def guide():
        a = pyro.sample("a", dist.Normal(0.1, 1.0), infer={"kl": kl_a})
        pyro.sample("b", dist.Normal(a, 1.0), infer={"kl": kl_b})

    return guide


def backward_guide(kl_b="auto"):
    def guide():
        b = pyro.sample("b", dist.Normal(0.0, 1.0), infer={"kl": kl_b})
        pyro.sample("a", dist.Normal(b, 1.0))

    return guide


def test_mc_override():
    plan = TraceMarkovKL_ELBO().explain(chain_model, forward_guide(kl_b="mc"))
    assert plan.sites["a"].estimator == "analytic"
    assert plan.sites["b"].estimator == "mc"
    assert plan.sites["b"].reason == "forced by infer={'kl': 'mc'}"
    assert plan.sites["b"].override == "mc"


def test_analytic_override_accepted_where_valid():
    plan = TraceMarkovKL_ELBO().explain(chain_model, forward_guide("analytic", "analytic"))
    assert plan.analytic_sites() == ("a", "b")


def test_analytic_override_rejected_where_biased():
    with pytest.raises(ValueError, match=r"site 'b'.*would be biased.*model parent a"):
        TraceMarkovKL_ELBO().explain(chain_model, backward_guide(kl_b="analytic"))


def test_analytic_override_rejected_without_kl():
    def model():
        pyro.sample("s", dist.Gamma(2.0, 1.0))

    def guide():
        pyro.sample("s", dist.LogNormal(0.0, 1.0), infer={"kl": "analytic"})

    with pytest.raises(ValueError, match=r"site 's'.*LogNormal.*Gamma|site 's'.*no kl"):
        TraceMarkovKL_ELBO().explain(model, guide)

    guide_auto = lambda: pyro.sample("s", dist.LogNormal(0.0, 1.0))  # noqa: E731
    plan = TraceMarkovKL_ELBO().explain(model, guide_auto)
    assert plan.sites["s"].estimator == "mc"
    assert "LogNormal" in plan.sites["s"].reason and "Gamma" in plan.sites["s"].reason


def test_unknown_option():
    with pytest.raises(ValueError, match=r"site 'a': unknown infer=\{'kl': 'exact'\}"):
        TraceMarkovKL_ELBO().explain(chain_model, forward_guide(kl_a="exact"))


def test_option_is_read_from_the_guide():
    """Pyro's replay gives a model site the guide site's infer dict."""

    def model():
        pyro.sample("a", dist.Normal(0.0, 1.0), infer={"kl": "mc"})

    def guide():
        pyro.sample("a", dist.Normal(0.0, 1.0))

    def guide_mc():
        pyro.sample("a", dist.Normal(0.0, 1.0), infer={"kl": "mc"})

    assert TraceMarkovKL_ELBO().explain(model, guide).sites["a"].estimator == "analytic"
    assert TraceMarkovKL_ELBO().explain(model, guide_mc).sites["a"].estimator == "mc"


def test_enumerate_option_is_ignored_as_by_trace_elbo():
    def model():
        pyro.sample("k", dist.Bernoulli(0.3))

    def guide():
        pyro.sample("k", dist.Bernoulli(0.6), infer={"enumerate": "parallel"})

    # Trace_ELBO samples the site (and warns under validation: see test_drop_in.py)
    with pyro.validation_enabled(False):
        loss = TraceMarkovKL_ELBO(max_plate_nesting=0).loss(model, guide)
    q, p = dist.Bernoulli(0.6), dist.Bernoulli(0.3)
    assert loss == pytest.approx(torch.distributions.kl_divergence(q, p).item(), rel=1e-6)


def test_model_latent_missing_from_guide():
    """The model draws b, whose term is log p(b | a) at that draw, as in Trace_ELBO."""

    def guide():
        pyro.sample("a", dist.Normal(0.0, 1.0))

    with pyro.validation_enabled(False):
        plan = TraceMarkovKL_ELBO().explain(chain_model, guide)
    assert "b" in plan.observed and "b" not in plan.sites


def test_guide_site_missing_from_model():
    def guide():
        forward_guide()()
        pyro.sample("extra", dist.Normal(0.0, 1.0))

    # auxiliary, as in Trace_ELBO (which warns under validation: see test_bad_input.py)
    with pyro.validation_enabled(False):
        plan = TraceMarkovKL_ELBO().explain(chain_model, guide)
    assert plan.sites["extra"].estimator == "mc"
    assert plan.sites["extra"].reason.startswith("guide site not in the model")


def test_auxiliary_guide_site():
    def guide():
        u = pyro.sample("u", dist.Normal(0.0, 1.0), infer={"is_auxiliary": True})
        a = pyro.sample("a", dist.Normal(u, 1.0))
        pyro.sample("b", dist.Normal(a, 1.0))

    plan = TraceMarkovKL_ELBO().explain(chain_model, guide)
    assert plan.sites["u"].estimator == "mc"
    assert "auxiliary" in plan.sites["u"].reason
    assert plan.sites["a"].guide_parents == {"u"}
    # a's KL conditions on the sampled u: unbiased, as u is not a model parent
    assert plan.sites["a"].estimator == "analytic"


def test_observation_not_subsampled_names_the_site_as_trace_elbo():
    # under validation a value that does not fit its subsampled plate fails in the shape check:
    # the error is Trace_ELBO's, naming the site
    from pyro.infer import Trace_ELBO

    x = torch.randn(2, 20)

    def model(x):
        for t in range(2):
            with pyro.plate(f"d_{t}", 20, subsample_size=5):
                pyro.sample(f"x_{t}", dist.Normal(0.0, 1.0), obs=x[t])

    messages = []
    for cls in (Trace_ELBO, TraceMarkovKL_ELBO):
        with pytest.raises(ValueError) as info:
            cls().loss(model, lambda x: None, x)
        messages.append(str(info.value).splitlines()[0])
    assert messages[0] == messages[1] == "Error while computing log_prob at site 'x_0':"
