# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""Tests of :mod:`pyro_markov_kl.compare` and of the DMM comparison scripts."""

import csv
import math
import os
import subprocess
import sys
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn as nn
from pyro.infer import RenyiELBO, Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from torch.distributions import constraints

from pyro_markov_kl import TraceMarkovKL_ELBO
from pyro_markov_kl.compare import ROW_KEYS, ELBOComparison, compare_elbos, param_group
from pyro_markov_kl.examples.dmm_gradient_variance import main

M, S = 0.5, 0.8


def prior_model() -> None:
    pyro.sample("z", dist.Normal(0.0, 1.0))


def normal_guide() -> None:
    loc = pyro.param("loc", torch.tensor(M))
    scale = pyro.param("scale", torch.tensor(S), constraint=constraints.positive)
    pyro.sample("z", dist.Normal(loc, scale))


class Chain(nn.Module):
    """
    A small forward state-space model with weak observations and a DMM-like Markov guide
    q(z_t | z_{t-1}, x_t), where the per-step KL carries much of the gradient noise.
    """

    Z, X = 3, 2

    def __init__(self) -> None:
        super().__init__()
        self.trans = nn.Linear(self.Z, self.Z)
        self.emit = nn.Linear(self.Z, self.X)
        self.comb = nn.Linear(self.Z + self.X, 2 * self.Z)

    def model(self, x: torch.Tensor) -> None:
        pyro.module("chain", self)
        z = x.new_zeros(x.size(0), self.Z)
        with pyro.plate("batch", x.size(0)):
            for t in pyro.markov(range(x.size(1))):
                z = pyro.sample(f"z_{t}", dist.Normal(self.trans(z), 1.0).to_event(1))
                pyro.sample(f"x_{t}", dist.Normal(self.emit(z), 2.0).to_event(1), obs=x[:, t])

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("chain", self)
        z = x.new_zeros(x.size(0), self.Z)
        with pyro.plate("batch", x.size(0)):
            for t in pyro.markov(range(x.size(1))):
                h = self.comb(torch.cat([z, x[:, t]], -1))
                scale = nn.functional.softplus(h[..., self.Z :]) + 0.1
                z = pyro.sample(f"z_{t}", dist.Normal(h[..., : self.Z], scale).to_event(1))

    def backward_guide(self, x: torch.Tensor) -> None:
        """The same guide run backward in time: q(z_t | z_{t+1}, x_t), as the DMM's backward
        guide. The model's parent z_{t-1} of z_t is sampled after z_t and depends on it."""
        pyro.module("chain", self)
        z = x.new_zeros(x.size(0), self.Z)
        with pyro.plate("batch", x.size(0)):
            for t in reversed(range(x.size(1))):
                h = self.comb(torch.cat([z, x[:, t]], -1))
                scale = nn.functional.softplus(h[..., self.Z :]) + 0.1
                z = pyro.sample(f"z_{t}", dist.Normal(h[..., : self.Z], scale).to_event(1))


@pytest.fixture
def chain() -> tuple:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    return Chain(), torch.randn(4, 5, Chain.X)


def _snapshot() -> dict:
    store = pyro.get_param_store()
    return {
        name: (p.detach().clone(), None if p.grad is None else p.grad.clone())
        for name, p in store.named_parameters()
    }


def test_param_group() -> None:
    assert param_group("dmm$$$emitter.lin_z_to_hidden.weight") == "emitter"
    assert param_group("dmm$$$z_0") == "z_0"
    assert param_group("loc") == "loc"
    assert param_group("encoder.fc.weight") == "encoder"


def test_deterministic_estimators_have_zero_variance() -> None:
    # no observations: the loss is KL(q || p), exact for the analytic estimators
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    table = compare_elbos(prior_model, normal_guide, num_draws=5)
    assert table.names == ["Trace_ELBO", "TraceMeanField_ELBO", "TraceMarkovKL_ELBO"]
    kl = 0.5 * (S**2 + M**2 - 1.0) - math.log(S)
    for name in ("TraceMeanField_ELBO", "TraceMarkovKL_ELBO"):
        row = table[name]
        assert row["grad_var"] == 0.0
        assert row["grad_var_by_module"] == {"loc": 0.0, "scale": 0.0}
        assert row["elbo_std"] == 0.0 and row["elbo_se"] == 0.0
        assert row["elbo_mean"] == pytest.approx(-kl, rel=1e-5)
        # the mean gradient is the exact one: d KL / d loc = M, d KL / d log(scale) = S^2 - 1
        assert row["grad_mean_norm"] == pytest.approx(math.hypot(M, S**2 - 1.0), rel=1e-5)
    assert table["Trace_ELBO"]["grad_var"] > 0.1


def test_trace_elbo_figures_match_closed_form() -> None:
    # z = M + S eps: the loss gradient is z for loc and S eps z + 1 for log(scale), so the
    # gradient variance is S^2 + S^2 (M^2 + 2 S^2); the ELBO is -KL(q || p)
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    n = 600
    row = compare_elbos(prior_model, normal_guide, elbos=[Trace_ELBO()], num_draws=n)["Trace_ELBO"]
    var_loc, var_scale = S**2, S**2 * (M**2 + 2 * S**2)
    assert row["grad_var_by_module"]["loc"] == pytest.approx(var_loc, rel=0.2)
    assert row["grad_var_by_module"]["scale"] == pytest.approx(var_scale, rel=0.3)
    assert row["grad_var"] == pytest.approx(var_loc + var_scale, rel=0.25)
    assert row["grad_var"] == pytest.approx(sum(row["grad_var_by_module"].values()), rel=1e-12)
    kl = 0.5 * (S**2 + M**2 - 1.0) - math.log(S)
    assert row["elbo_se"] == pytest.approx(row["elbo_std"] / math.sqrt(n))
    assert abs(row["elbo_mean"] + kl) < 4 * row["elbo_se"]
    assert row["num_params"] == 2 and row["num_draws"] == n


def test_trace_elbo_noisier_than_mean_field_on_forward_chain(chain: tuple) -> None:
    net, x = chain
    table = compare_elbos(net.model, net.guide, x, num_draws=30)
    trace, meanfield = table["Trace_ELBO"], table["TraceMeanField_ELBO"]
    assert trace["grad_var"] > 1.5 * meanfield["grad_var"]  # about 2.5 times
    assert table["TraceMarkovKL_ELBO"]["grad_var"] < trace["grad_var"]
    assert sorted(trace["grad_var_by_module"]) == ["comb", "emit", "trans"]
    for row in table:
        assert row["grad_var"] == pytest.approx(sum(row["grad_var_by_module"].values()))
        assert row["num_params"] == sum(p.numel() for p in net.parameters())


def test_to_dicts_and_str(chain: tuple) -> None:
    net, x = chain
    elbos = [Trace_ELBO(), Trace_ELBO(num_particles=2), TraceGraph_ELBO()]
    table = compare_elbos(net.model, net.guide, x, elbos=elbos, num_draws=3)
    assert isinstance(table, ELBOComparison) and len(table) == 3
    rows = table.to_dicts()
    assert [r["name"] for r in rows] == ["Trace_ELBO", "Trace_ELBO[2]", "TraceGraph_ELBO"]
    for row in rows:
        assert tuple(row) == ROW_KEYS
        assert type(row["grad_var_by_module"]) is dict
        for key in ROW_KEYS:
            assert type(row[key]) in (str, int, float, dict, list)
        assert row["step_time"] > 0 and math.isfinite(row["elbo_mean"])
    rows[0]["grad_var_by_module"]["comb"] = -1.0  # copies
    assert table.to_dicts()[0]["grad_var_by_module"]["comb"] >= 0
    text = str(table)
    assert "Trace_ELBO[2]" in text and "grad var" in text and "trans" in text
    lines = text.splitlines()
    assert len({len(line) for line in lines[1:5]}) == 1  # aligned header and rows


def test_backward_guide_marks_mean_field_biased(chain: tuple) -> None:
    net, x = chain
    elbos = [Trace_ELBO(), TraceMeanField_ELBO(), TraceMarkovKL_ELBO(), TraceGraph_ELBO()]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Failed to verify mean field restriction")
        table = compare_elbos(net.model, net.backward_guide, x, elbos=elbos, num_draws=2)
    assert table.biased == ["TraceMeanField_ELBO"]
    mf = table["TraceMeanField_ELBO"]
    # z_t's model parent z_{t-1} is sampled after it: every step but the first, in guide order
    assert mf["validity"] == "biased"
    assert mf["biased_sites"] == ["z_4", "z_3", "z_2", "z_1"]
    assert "z_4" in mf["validity_reason"]
    for name in ("Trace_ELBO", "TraceMarkovKL_ELBO", "TraceGraph_ELBO"):
        row = table[name]
        assert row["validity"] == "valid" and row["biased_sites"] == [], name
    text = str(table)
    assert "biased at z_4, z_3, z_2, ... (+1)" in text
    assert "model parent sampled after it in the guide" in text
    assert "BIASED: TraceMeanField_ELBO" in text
    header, rows = text.splitlines()[1], text.splitlines()[2:6]
    assert "valid" in header and sum("yes" in row for row in rows) == 3


def test_forward_guide_marks_none_biased(chain: tuple) -> None:
    net, x = chain
    table = compare_elbos(net.model, net.guide, x, num_draws=2)
    assert table.biased == []
    for row in table:
        assert row["validity"] == "valid" and row["biased_sites"] == [], row["name"]
    assert "BIASED" not in str(table) and "biased at" not in str(table)


def test_unknown_estimator_is_unchecked(chain: tuple) -> None:
    net, x = chain
    table = compare_elbos(net.model, net.guide, x, elbos=[RenyiELBO()], num_draws=2)
    row = table["RenyiELBO"]
    assert row["validity"] == "unchecked" and row["biased_sites"] == []
    assert "unchecked: RenyiELBO" in str(table)


def test_validity_check_leaves_random_draws_unchanged() -> None:
    # the plan is made on draws of its own (for TraceMeanField_ELBO only): the estimators'
    # draws are those they would be without the check
    pyro.clear_param_store()
    pyro.set_rng_seed(4)
    checked = compare_elbos(prior_model, normal_guide, elbos=[Trace_ELBO(), TraceMeanField_ELBO()])
    pyro.set_rng_seed(4)
    unchecked = compare_elbos(prior_model, normal_guide, elbos=[Trace_ELBO()])
    assert checked["TraceMeanField_ELBO"]["validity"] == "valid"
    assert checked["Trace_ELBO"]["elbo_mean"] == unchecked["Trace_ELBO"]["elbo_mean"]


def test_parameters_and_grads_unchanged(chain: tuple) -> None:
    net, x = chain
    elbos = {"mf": TraceMeanField_ELBO(), "graph": TraceGraph_ELBO(), "mkl": TraceMarkovKL_ELBO()}
    compare_elbos(net.model, net.guide, x, elbos={"mf": elbos["mf"]}, num_draws=2)
    params = list(pyro.get_param_store().named_parameters())
    for i, (_, p) in enumerate(params):
        p.grad = None if i % 2 else torch.full_like(p, float(i))
    before = _snapshot()
    compare_elbos(net.model, net.guide, x, elbos=elbos, num_draws=3)
    after = _snapshot()
    assert before.keys() == after.keys()
    for name, (value, grad) in before.items():
        assert torch.equal(value, after[name][0]), name
        if grad is None:
            assert after[name][1] is None, name
        else:
            assert torch.equal(grad, after[name][1]), name


def test_loss_and_grads_path_matches_differentiable_loss() -> None:
    # TraceGraph_ELBO has no differentiable_loss; its figures are Trace_ELBO's on this model
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    graph = compare_elbos(prior_model, normal_guide, elbos=[TraceGraph_ELBO()], num_draws=50)
    pyro.set_rng_seed(3)
    trace = compare_elbos(prior_model, normal_guide, elbos=[Trace_ELBO()], num_draws=50)
    a, b = graph.to_dicts()[0], trace.to_dicts()[0]
    for key in ("elbo_mean", "elbo_std", "grad_var", "grad_mean_norm"):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_errors() -> None:
    with pytest.raises(ValueError, match="num_draws"):
        compare_elbos(prior_model, normal_guide, num_draws=1)
    with pytest.raises(TypeError, match="not an ELBO"):
        compare_elbos(prior_model, normal_guide, elbos={"x": object()}, num_draws=2)


def test_plot_writes_png(tmp_path, chain: tuple) -> None:
    pytest.importorskip("matplotlib")
    pyro.clear_param_store()
    table = compare_elbos(prior_model, normal_guide, num_draws=3)  # includes zero variances
    path = tmp_path / "compare.png"
    fig = table.plot(str(path))
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) == 2


def test_plot_marks_biased(chain: tuple) -> None:
    pytest.importorskip("matplotlib")
    net, x = chain
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Failed to verify mean field restriction")
        table = compare_elbos(net.model, net.backward_guide, x, num_draws=2)
    fig = table.plot()
    ax_var, ax_elbo = fig.axes
    legend = [t.get_text() for t in ax_var.get_legend().get_texts()]
    assert legend == ["Trace_ELBO", "TraceMeanField_ELBO (BIASED)", "TraceMarkovKL_ELBO"]
    assert "BIASED" in [t.get_text() for t in ax_elbo.texts]
    ticks = [t.get_text() for t in ax_elbo.get_xticklabels()]
    assert ticks[1] == "TraceMeanField_ELBO (biased)"
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_cli(tmp_path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "cli.png"
    args = ["--num-draws", "3", "--batch-size", "3", "--max-steps", "6", "--z-dim", "2"]
    args += ["--emission-dim", "4", "--transition-dim", "4", "--rnn-dim", "4", "--num-threads", "0"]
    table = main(args + ["--train-steps", "2", "--guide", "backward", "--plot", str(path)])
    assert table.names == ["TraceMarkovKL_ELBO", "Trace_ELBO", "TraceMeanField_ELBO"]
    assert path.stat().st_size > 1000
    out = capsys.readouterr().out
    assert "trained 2 steps" in out and "gradient variance by module" in out
    assert set(table.modules) == {"combiner", "emitter", "h_0", "rnn", "trans", "z_0", "z_q_0"}
    # the backward guide: TraceMeanField_ELBO is marked biased at every step but the first
    assert table.biased == ["TraceMeanField_ELBO"]
    assert table["TraceMeanField_ELBO"]["biased_sites"] == [f"z_{t}" for t in range(6, 1, -1)]
    assert "BIASED: TraceMeanField_ELBO" in out and "biased at z_6, z_5, z_4, ..." in out
    table = main(args + ["--elbos", "trace,tracegraph"])
    assert table.names == ["Trace_ELBO", "TraceGraph_ELBO"]
    with pytest.raises(SystemExit):
        main(args + ["--elbos", "nope"])


def test_cli_is_the_example_and_library_does_not_import_examples() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    run = subprocess.run(
        [sys.executable, "-m", "pyro_markov_kl.examples.dmm_gradient_variance", "--help"],
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "python -m pyro_markov_kl.examples.dmm_gradient_variance" in run.stdout
    code = "import sys, pyro_markov_kl.compare; print(any('examples' in m for m in sys.modules))"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"


def test_dmm_compare_tiny(tmp_path, capsys: pytest.CaptureFixture) -> None:
    from pyro_markov_kl.examples.dmm_compare import CSV_COLUMNS
    from pyro_markov_kl.examples.dmm_compare import main as dmm_compare_main

    args = ["-n", "1", "--max-train-sequences", "4", "-b", "2", "--z-dim", "2"]
    args += ["--emission-dim", "4", "--transition-dim", "4", "--rnn-dim", "4", "--num-threads", "0"]
    args += ["--max-steps", "8", "--compare", "--compare-draws", "2", "--out", str(tmp_path)]
    result = dmm_compare_main(args)
    rows = result["rows"]
    assert [(r["elbo"], r["epoch"]) for r in rows] == [
        (name, epoch) for name in ("markov-kl", "trace", "meanfield") for epoch in (0, 1)
    ]
    # same seed: the same initialisation, so the same evaluation at epoch 0 (same estimator)
    assert rows[0]["valid_nll_per_slice"] == rows[2]["valid_nll_per_slice"]
    with open(result["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6
    assert tuple(table[0])[: len(CSV_COLUMNS)] == CSV_COLUMNS
    assert {"grad_var[markov-kl]", "grad_var[trace]", "grad_var[meanfield]"} <= set(table[0])
    for row in table:
        assert math.isfinite(float(row["test_nll_per_slice"]))
        assert float(row["grad_var[trace]"]) > 0
    assert math.isfinite(float(table[1]["train_loss_per_slice"]))
    if result["png"] is not None:
        assert (tmp_path / "dmm_compare_forward.png").stat().st_size > 1000
    assert "curves written to" in capsys.readouterr().out
