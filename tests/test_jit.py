# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""JitTraceMarkovKL_ELBO: compiled once per structure, same estimator as the eager class."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_markov_kl import JitTraceMarkovKL_ELBO, TraceMarkovKL_ELBO


def model(data, annealing):
    z = torch.zeros(())
    for t in range(len(data)):
        with pyro.poutine.scale(scale=annealing):
            z = pyro.sample(f"z_{t}", dist.Normal(0.9 * z, 1.0))
        pyro.sample(f"x_{t}", dist.Normal(z, 0.5), obs=data[t])


def guide(data, annealing):
    w = pyro.param("w", torch.tensor(0.5))
    b = pyro.param("b", torch.zeros(len(data)))
    z = torch.zeros(())
    for t in range(len(data)):
        with pyro.poutine.scale(scale=annealing):
            z = pyro.sample(f"z_{t}", dist.Normal(w * z + b[t], 0.8))


def test_compiles_once_and_matches_eager():
    pyro.clear_param_store()
    data = torch.tensor([0.3, -0.2, 1.0, 0.5])
    annealing = torch.tensor(0.5)
    jit_elbo = JitTraceMarkovKL_ELBO(ignore_jit_warnings=True)
    eager = TraceMarkovKL_ELBO()
    for _ in range(3):
        jit_elbo.loss_and_grads(model, guide, data, annealing)
    assert jit_elbo.num_compiled == 1  # a second and third call did not retrace
    assert len(jit_elbo.plan_cache) == 1

    # the compiled estimator draws from the same distribution as the eager one: compare means
    jit_losses = torch.tensor([jit_elbo.loss(model, guide, data, annealing) for _ in range(400)])
    eager_losses = torch.tensor([eager.loss(model, guide, data, annealing) for _ in range(400)])
    se = (jit_losses.var() / 400 + eager_losses.var() / 400).sqrt()
    assert (jit_losses.mean() - eager_losses.mean()).abs() < 5 * se
    assert jit_elbo.num_compiled == 1


def test_gradients_match_eager_for_the_same_draw():
    pyro.clear_param_store()
    data = torch.tensor([0.3, -0.2, 1.0])
    annealing = torch.tensor(1.0)
    jit_elbo = JitTraceMarkovKL_ELBO(ignore_jit_warnings=True)
    jit_elbo.differentiable_loss(model, guide, data, annealing)  # compile
    params = [pyro.param("w").unconstrained(), pyro.param("b").unconstrained()]
    pyro.set_rng_seed(7)
    g_jit = torch.autograd.grad(jit_elbo.differentiable_loss(model, guide, data, annealing), params)
    pyro.set_rng_seed(7)
    g_eager = torch.autograd.grad(
        TraceMarkovKL_ELBO().differentiable_loss(model, guide, data, annealing), params
    )
    for a, b in zip(g_jit, g_eager):
        assert torch.allclose(a, b, atol=1e-5), (a, b)


@pytest.mark.parametrize("T", [2, 3])
def test_new_structure_gets_new_plan(T):
    pyro.clear_param_store()
    elbo = JitTraceMarkovKL_ELBO(ignore_jit_warnings=True)
    loss = elbo.differentiable_loss(model, guide, torch.zeros(T), torch.tensor(1.0)).item()
    assert torch.isfinite(torch.tensor(loss))
    (plan,) = elbo.plan_cache.values()
    assert set(plan.sites) == {f"z_{t}" for t in range(T)}


def guide_max8(data, annealing):
    w = pyro.param("w", torch.tensor(0.5))
    b = pyro.param("b8", torch.zeros(8))
    z = torch.zeros(())
    for t in range(len(data)):
        with pyro.poutine.scale(scale=annealing):
            z = pyro.sample(f"z_{t}", dist.Normal(w * z + b[t], 0.8))


def test_new_sequence_length_compiles_a_new_graph():
    pyro.clear_param_store()
    elbo = JitTraceMarkovKL_ELBO(ignore_jit_warnings=True)
    eager = TraceMarkovKL_ELBO()
    one = torch.tensor(1.0)
    for T in (3, 5, 3):
        data = torch.linspace(-1.0, 1.0, T)
        jit_losses = torch.tensor(
            [elbo.differentiable_loss(model, guide_max8, data, one).item() for _ in range(200)]
        )
        eager_losses = torch.tensor([eager.loss(model, guide_max8, data, one) for _ in range(200)])
        se = (jit_losses.var() / 200 + eager_losses.var() / 200).sqrt()
        assert (jit_losses.mean() - eager_losses.mean()).abs() < 5 * se, T
    assert elbo.num_compiled == 2  # one graph per length, the first one reused


def test_no_tracer_warnings_from_the_estimator():
    """
    The estimator's own reads of traced shapes (plan-cache key, KL shape checks) are
    constants of the compiled graph and must not warn: under ``-W error`` (Pyro's test
    configuration) a TracerWarning raised inside torch's ``__int__``/``__bool__`` surfaced as
    ``SystemError: ... returned a result with an exception set``.
    """

    pyro.clear_param_store()
    data = torch.tensor(1.0)

    def model(data):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(loc, scale), obs=data)

    def guide(data):
        loc_loc = pyro.param("loc_loc", lambda: torch.tensor(1.0))
        scale_loc = pyro.param("scale_loc", lambda: torch.tensor(-1.0))
        pyro.sample("loc", dist.Normal(loc_loc, 2.0))
        pyro.sample("scale", dist.LogNormal(scale_loc, 0.1))

    elbo = JitTraceMarkovKL_ELBO(num_particles=10, vectorize_particles=True, max_plate_nesting=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        # as Pyro's setup.cfg: torch.distributions turns the model's numbers into constants
        warnings.filterwarnings("ignore", "torch.tensor results are registered as constants")
        loss = elbo.loss_and_grads(model, guide, data)
    assert torch.isfinite(torch.tensor(loss))


def test_vectorized_particles_with_a_funsor_autoguide():
    """
    The analysis makes its own vectorised-particle plate outside the JIT trace:
    reusing the one made while tracing gave funsor a traced plate size
    (``ValueError: invalid dtype`` in Pyro's test_autoguide.py::test_median).
    """
    pytest.importorskip("funsor")  # an optional extra
    from pyro.infer.autoguide import AutoGaussian

    def model():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(a, 1.0), obs=torch.tensor(0.5))

    pyro.clear_param_store()
    guide = AutoGaussian(model, backend="funsor")
    elbo = JitTraceMarkovKL_ELBO(
        num_particles=20,
        vectorize_particles=True,
        max_plate_nesting=0,
        ignore_jit_warnings=True,  # funsor's own tracer warnings, as in Pyro's test
    )
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    for _ in range(3):
        assert math.isfinite(svi.step())


def test_loss_does_not_write_to_the_param_store():
    """As JitTrace_ELBO, whose loss() is Trace_ELBO's: the JIT class's loss() is eager and
    forms no score-function terms, so a decaying-average baseline is left alone."""

    def model():
        k = pyro.sample("k", dist.Bernoulli(0.3))
        pyro.sample("x", dist.Normal(k, 1.0), obs=torch.tensor(0.5))

    def guide():
        p = pyro.param("p", torch.tensor(0.4))
        pyro.sample(
            "k",
            dist.Bernoulli(logits=p),
            infer={"baseline": {"use_decaying_avg_baseline": True}},
        )

    pyro.clear_param_store()
    elbo = JitTraceMarkovKL_ELBO(max_plate_nesting=0)
    for _ in range(3):
        elbo.loss(model, guide)
    assert set(pyro.get_param_store().keys()) == {"p"}


def test_compile_count_and_time_and_pickling():
    import pickle

    pyro.clear_param_store()
    elbo = JitTraceMarkovKL_ELBO(ignore_jit_warnings=True)
    assert elbo.num_compiled == 0 and elbo.compile_seconds == 0.0
    data = torch.tensor([0.3, -0.2, 1.0, 0.5])
    one = torch.tensor(1.0)
    elbo.differentiable_loss(model, guide, data, one)
    first = elbo.compile_seconds
    assert elbo.num_compiled == 1 and first > 0.0
    elbo.differentiable_loss(model, guide, data, one)  # no compilation: the time stays
    assert elbo.num_compiled == 1 and elbo.compile_seconds == first
    elbo.differentiable_loss(model, guide, data[:3], one)  # a new shape compiles a graph
    assert elbo.num_compiled == 2 and elbo.compile_seconds > first
    copy = pickle.loads(pickle.dumps(elbo))  # compiled graphs are dropped, rebuilt on demand
    assert copy.num_compiled == 0
    assert torch.isfinite(copy.differentiable_loss(model, guide, data, one))
    assert copy.num_compiled == 1


def test_compiling_a_graph_analyses_the_program_once(monkeypatch):
    """Pyro's JIT runs the step once to capture params, then traces it: one analysis."""
    from pyro_markov_kl import trace_markov_kl_elbo as elbo_module

    calls = []
    analyse = elbo_module.analyse_dependencies

    def counting(*args, **kwargs):
        calls.append(1)
        return analyse(*args, **kwargs)

    monkeypatch.setattr(elbo_module, "analyse_dependencies", counting)
    pyro.clear_param_store()
    elbo = JitTraceMarkovKL_ELBO(ignore_jit_warnings=True)
    data, one = torch.tensor([0.3, -0.2, 1.0]), torch.tensor(1.0)
    elbo.differentiable_loss(model, guide, data, one)
    assert elbo.num_compiled == 1 and len(calls) == 1
    elbo.differentiable_loss(model, guide, data[:2], one)  # a new shape: a new graph, a new plan
    assert elbo.num_compiled == 2 and len(calls) == 2


def test_shape_reads_record_nothing_in_the_graph():
    """
    Inside a JIT trace, sizes are traced tensors and every comparison of them records graph
    nodes (dead code, removed only after tracing; on the DMM about a sixth of the tracing time went
    to the estimator's shape checks). The plan-cache key and the terms' shape checks read them
    with the trace suspended: they add no node to the graph being traced.
    """
    from pyro_markov_kl.plan_cache import structure_key
    from pyro_markov_kl.sites import observed_site_factors

    def plate_model(data):
        with pyro.plate("batch", data.size(0), dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(data.shape), 1.0).to_event(1))
            mask = data[:, 0] > 0
            pyro.sample("x", dist.Normal(z, 0.5).to_event(1).mask(mask), obs=data)

    def plate_guide(data):
        with pyro.plate("batch", data.size(0), dim=-1):
            pyro.sample("z", dist.Normal(0.5 * data, 1.0).to_event(1))

    added = {}

    def traced(data):
        guide_trace = pyro.poutine.trace(plate_guide).get_trace(data)
        model_trace = pyro.poutine.trace(
            pyro.poutine.replay(plate_model, trace=guide_trace)
        ).get_trace(data)
        graph = torch._C._get_tracing_state().graph()
        before = len(list(graph.nodes()))
        key = structure_key(model_trace, guide_trace)
        factors = observed_site_factors(model_trace.nodes["x"])
        added["nodes"] = len(list(graph.nodes())) - before
        added["key"], added["factors"] = key, factors
        return data * 2

    data = torch.randn(4, 3)
    # torch's argument checks would record nodes; Pyro's own shape reads warn (an error under
    # Pyro's test configuration), as with ignore_jit_warnings=False
    with pyro.validation_enabled(False), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.jit.trace(traced, (data,), check_trace=False)
    assert added["nodes"] == 0
    assert added["factors"] is not None  # the mask came off as a factor: the check ran
    # the key is made of plain sizes: equal to the key of the same traces made eagerly
    guide_trace = pyro.poutine.trace(plate_guide).get_trace(data)
    model_trace = pyro.poutine.trace(pyro.poutine.replay(plate_model, trace=guide_trace)).get_trace(
        data
    )
    assert added["key"] == structure_key(model_trace, guide_trace)


def test_a_mask_argument_broadcast_at_compilation_is_not_reused_for_a_varying_one():
    """
    A mask expanded along an event dimension (stride 0) is folded into a per-site factor by its
    strides. A graph compiled on one must not be reused for a mask of the same shape that
    varies along the event: it would take that mask's first column (found by a break-it round,
    compiled 15.63 against eager 15.55 at one seed, |z| = 8 against Trace_ELBO).
    """
    B, T, D = 4, 2, 3

    def masked_model(x, m):
        with pyro.plate("b", B):
            z = torch.zeros(B, D)
            for t in range(T):
                z = pyro.sample(f"z_{t}", dist.Normal(0.8 * z, 1.0).mask(m).to_event(1))
                pyro.sample(f"x_{t}", dist.Normal(z, 0.5).mask(m).to_event(1), obs=x[:, t])

    def masked_guide(x, m):
        s = pyro.param("s", 0.6 * torch.ones(D), constraint=dist.constraints.positive)
        with pyro.plate("b", B):
            z = torch.zeros(B, D)
            for t in range(T):
                loc = 0.5 * z + 0.3 * x[:, t]
                z = pyro.sample(f"z_{t}", dist.Normal(loc, s).mask(m).to_event(1))

    pyro.clear_param_store()
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(3))
    expanded = torch.tensor([True, False, True, True]).unsqueeze(-1).expand(B, D)
    varying = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]]).bool()
    elbo = JitTraceMarkovKL_ELBO(ignore_jit_warnings=True)
    for m in (expanded, varying):  # compile (a graph each), then compare at fixed seeds
        elbo.differentiable_loss(masked_model, masked_guide, x, m)
    assert elbo.num_compiled == 2
    eager = TraceMarkovKL_ELBO()
    for m in (varying, expanded, varying):
        for seed in (0, 1):
            pyro.set_rng_seed(seed)
            compiled = elbo.differentiable_loss(masked_model, masked_guide, x, m).item()
            pyro.set_rng_seed(seed)
            expected = eager.differentiable_loss(masked_model, masked_guide, x, m).item()
            assert compiled == pytest.approx(expected, abs=1e-4), (m.stride(), seed)
    assert elbo.num_compiled == 2


def test_a_rule_that_holds_for_the_current_values_only_is_not_compiled():
    """
    Equal transforms are a value condition of the transformed pair's KL: the eager plan cache
    keys on it, a compiled graph cannot. A graph compiled where the model's and the guide's
    AffineTransform locs (separate tensor arguments) were equal kept KL(q0 || p0) for locs
    that differ (found by a break-it round: compiled 0.15 against Trace_ELBO's 2.73). For a
    compiled graph such a site is a Monte Carlo site.
    """
    from torch.distributions.transforms import AffineTransform

    def tf_model(loc_p, loc_q):
        base = dist.Normal(0.0, 1.0)
        pyro.sample("z", dist.TransformedDistribution(base, [AffineTransform(loc_p, 1.0)]))

    def tf_guide(loc_p, loc_q):
        base = dist.Normal(0.3, 0.7)
        pyro.sample("z", dist.TransformedDistribution(base, [AffineTransform(loc_q, 1.0)]))

    zero, two = torch.tensor(0.0), torch.tensor(2.0)
    eager = TraceMarkovKL_ELBO()
    assert eager.explain(tf_model, tf_guide, zero, zero).sites["z"].estimator == "analytic"
    elbo = JitTraceMarkovKL_ELBO(ignore_jit_warnings=True)
    elbo.differentiable_loss(tf_model, tf_guide, zero, zero)  # compiled on equal locs
    (plan,) = elbo.plan_cache.values()
    assert plan.sites["z"].estimator == "mc"
    assert "compiled graph" in plan.sites["z"].reason
    for seed in (0, 1, 2):  # reused for locs that differ: Monte Carlo, as the eager ELBO there
        pyro.set_rng_seed(seed)
        compiled = elbo.differentiable_loss(tf_model, tf_guide, zero, two).item()
        pyro.set_rng_seed(seed)
        expected = eager.differentiable_loss(tf_model, tf_guide, zero, two).item()
        assert compiled == pytest.approx(expected, abs=1e-5)
    assert elbo.num_compiled == 1
