# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
Produce the figures, tables and captured outputs that the Sphinx pages include from
``docs/_static/``.

Two parts:

* ``--part fast`` (the default, a few seconds): the DAG pictures of the forward and backward
  Deep Markov Model guides (``dag_forward.png``, ``dag_backward.png``); what
  ``TraceMarkovKL_ELBO.explain()`` prints for small instances of both (``explain_forward.txt``,
  ``explain_backward.txt``); the model-only scale demonstration of ``choosing_an_elbo.rst``
  (``meanfield_scale.txt``); and the real text of every error of the "Errors and what they
  mean" catalogue (``errors/<case>.txt``), each produced by running the case.
* ``--part runs`` (several minutes; run it once): the command-line comparisons and training
  curves of the DMM tutorial. Each command's standard output is saved, preceded by the command
  line, to ``docs/_static/<name>.txt``; the commands write their CSV and PNG files into
  ``docs/_static/`` themselves:

  .. code-block:: bash

      python -m pyro_markov_kl.examples.dmm_gradient_variance --guide forward \\
          --elbos markov-kl,trace,meanfield,tracegraph --train-steps 200 --num-draws 50 \\
          --plot docs/_static/compare_forward.png
      python -m pyro_markov_kl.examples.dmm_gradient_variance --guide backward \\
          --elbos markov-kl,trace,meanfield,tracegraph --train-steps 200 --num-draws 50 \\
          --plot docs/_static/compare_backward.png
      python -m pyro_markov_kl.examples.dmm_compare --guide forward -n 8 --test-frequency 2 \\
          --compare --out docs/_static
      python -m pyro_markov_kl.examples.dmm_compare --guide backward -n 8 --test-frequency 1 \\
          --out docs/_static

* ``--part all``: both.

Run from the repository root: ``python scripts/make_tutorial_figures.py [--part ...]``. Needs
matplotlib (``pip install -e '.[plot]'``).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
import textwrap
import time
import warnings
from typing import Callable, Dict, List, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATIC = os.path.join(ROOT, "docs", "_static")

# --- the user-side objects of the error cases (module level, so that messages name them plainly)


def _distributions():
    import pyro.distributions as dist

    class MyNormal(dist.Normal):
        """A user's subclass of Normal, with KL rules of its own in the error cases."""

    return MyNormal


def kl_summed_too_far(q, p):
    """A KL rule that sums over the batch too: one number instead of one per batch element."""
    return (((q.loc - p.loc) / p.scale) ** 2 / 2).sum()


def kl_nan(q, p):
    """A KL rule that produces NaN."""
    return q.loc * float("nan")


def kl_broken(q, p):
    """A KL rule that returns -inf."""
    import torch

    return torch.full_like(q.loc, -float("inf"))


#: The long commands of ``--part runs``: (output name, arguments after ``python``).
RUNS: List[tuple] = [
    (
        "compare_forward",
        [
            "-m", "pyro_markov_kl.examples.dmm_gradient_variance", "--guide", "forward",
            "--elbos", "markov-kl,trace,meanfield,tracegraph", "--train-steps", "200",
            "--num-draws", "50", "--plot", "docs/_static/compare_forward.png",
        ],
    ),
    (
        "compare_backward",
        [
            "-m", "pyro_markov_kl.examples.dmm_gradient_variance", "--guide", "backward",
            "--elbos", "markov-kl,trace,meanfield,tracegraph", "--train-steps", "200",
            "--num-draws", "50", "--plot", "docs/_static/compare_backward.png",
        ],
    ),
    (
        "dmm_compare_forward",
        [
            "-m", "pyro_markov_kl.examples.dmm_compare", "--guide", "forward", "-n", "8",
            "--test-frequency", "2", "--compare", "--out", "docs/_static",
        ],
    ),
    (
        "dmm_compare_backward",
        [
            "-m", "pyro_markov_kl.examples.dmm_compare", "--guide", "backward", "-n", "8",
            "--test-frequency", "1", "--out", "docs/_static",
        ],
    ),
]  # fmt: skip


def _write(name: str, text: str) -> None:
    path = os.path.join(STATIC, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.rstrip("\n") + "\n")
    print(f"wrote {os.path.relpath(path, ROOT)}")


# --- part "fast": explain() on small DMMs, and the DAG pictures ----------------------------------

#: The small DMM instance of ``how_it_works.rst``: 3 JSB Chorales training sequences cut to T = 4.
EXPLAIN_T = 4


def small_dmm_plan(guide: str):
    """
    The plan of ``TraceMarkovKL_ELBO.explain`` on a small DMM with the given guide direction
    (the code shown in ``how_it_works.rst``).
    """
    import pyro
    import torch

    from pyro_markov_kl import TraceMarkovKL_ELBO
    from pyro_markov_kl.data import get_mini_batch, load_jsb_chorales
    from pyro_markov_kl.examples.dmm import DMM

    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    data = load_jsb_chorales("train")
    lengths = data["sequence_lengths"][:3].clamp(max=EXPLAIN_T)
    batch = get_mini_batch(torch.arange(3), data["sequences"][:3, :EXPLAIN_T], lengths)
    dmm = DMM(z_dim=4, emission_dim=8, transition_dim=8, rnn_dim=8, guide=guide)
    return TraceMarkovKL_ELBO(max_plate_nesting=1).explain(dmm.model, dmm.guide, *batch)


def draw_dag(plan, guide: str, path: str) -> None:
    """
    Draw the model's and the guide's dependency graphs of a small DMM side by side: latent
    edges as found by the analysis (``plan``), observations and the guide's RNN states as
    drawn by hand. Latent sites are coloured by their estimator; a model edge into a site from
    one of its guide descendants, which makes the per-step KL biased, is drawn in red, together
    with the guide path that makes the parent a descendant.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    T = EXPLAIN_T
    colours = {"analytic": "#b7e4c7", "mc": "#ffb4a2"}
    red = "#c1121f"
    fig = Figure(figsize=(10.5, 4.3))
    ax_p, ax_q = fig.subplots(1, 2)
    pos = {f"z_{t}": (t, 1.0) for t in range(1, T + 1)}
    pos.update({f"x_{t}": (t, -0.6) for t in range(1, T + 1)})
    pos.update({f"h_{t}": (t, 0.2) for t in range(1, T + 1)})

    bad_model_edges = set()
    bad_guide_nodes = set()
    for name, rec in plan.sites.items():
        biased = rec.model_parents & rec.guide_descendants
        for parent in biased:
            bad_model_edges.add((parent, name))
            bad_guide_nodes |= {name, parent}

    def node(ax, name, label, kind):
        x, y = pos[name]
        if kind == "latent":
            face = colours[plan.sites[name].estimator]
            ax.add_patch(_circle((x, y), 0.24, face))
        elif kind == "observed":
            ax.add_patch(_circle((x, y), 0.24, "#bbbbbb"))
        else:
            ax.add_patch(_square((x, y), 0.17))
        ax.text(x, y, label, ha="center", va="center", fontsize=11 if kind != "rnn" else 9)

    def edge(ax, a, b, colour="black", width=1.2):
        # from boundary to boundary, so that the arrow heads are not hidden by the nodes
        (x0, y0), (x1, y1) = pos[a], pos[b]
        length = math.hypot(x1 - x0, y1 - y0)
        ux, uy = (x1 - x0) / length, (y1 - y0) / length

        def offset(name: str) -> float:
            if name.startswith("h"):
                return 0.17 / max(abs(ux), abs(uy)) + 0.02
            return 0.24 + 0.02

        start = (x0 + ux * offset(a), y0 + uy * offset(a))
        end = (x1 - ux * offset(b), y1 - uy * offset(b))
        ax.annotate(
            "",
            xy=end,
            xytext=start,
            arrowprops=dict(
                arrowstyle="-|>",
                color=colour,
                lw=width,
                shrinkA=0,
                shrinkB=0,
                mutation_scale=14,
            ),
            zorder=2,
        )

    # the model: z_{t-1} -> z_t -> x_t, as found by the analysis (latent edges)
    for t in range(1, T + 1):
        z = f"z_{t}"
        for parent in plan.sites[z].model_parents:
            bad = (parent, z) in bad_model_edges
            edge(ax_p, parent, z, red if bad else "black", 2.2 if bad else 1.2)
        edge(ax_p, z, f"x_{t}")
        node(ax_p, z, f"$z_{t}$", "latent")
        node(ax_p, f"x_{t}", f"$x_{t}$", "observed")
    ax_p.set_title("model $p(z_{1:T}, x_{1:T})$", fontsize=11)

    # the guide: RNN states summarising the data, latent edges as found by the analysis
    order = plan.guide.order
    for t in range(1, T + 1):
        z, h = f"z_{t}", f"h_{t}"
        edge(ax_q, f"x_{t}", h)
        nxt = t + 1 if guide == "forward" else t - 1  # the RNN runs backward for the forward guide
        if 1 <= nxt <= T:
            edge(ax_q, f"h_{nxt}", h, "#555555", 1.0)
        edge(ax_q, h, z, "#555555", 1.0)
        for parent in plan.sites[z].guide_parents:
            bad = parent in bad_guide_nodes and z in bad_guide_nodes
            edge(ax_q, parent, z, red if bad else "black", 2.2 if bad else 1.2)
        node(ax_q, z, f"$z_{t}$", "latent")
        node(ax_q, h, f"$h_{t}$", "rnn")
        node(ax_q, f"x_{t}", f"$x_{t}$", "observed")
        x, y = pos[z]
        ax_q.text(x, y + 0.36, f"sampled #{order.index(z) + 1}", ha="center", fontsize=8)
    if guide == "forward":
        ax_q.set_title(
            r"forward guide $q(z_t \mid z_{t-1}, x_{t:T})$, $h_t$: RNN backward over $x_{t:T}$",
            fontsize=11,
        )
    else:
        ax_q.set_title(
            r"backward guide $q(z_t \mid z_{t+1}, x_{1:t})$, $h_t$: RNN forward over $x_{1:t}$",
            fontsize=11,
        )
    for ax in (ax_p, ax_q):
        ax.set_xlim(0.5, T + 0.5)
        ax.set_ylim(-0.95, 1.6)
        ax.set_aspect("equal")
        ax.axis("off")
    handles = [
        Patch(facecolor=colours["analytic"], edgecolor="black", label="analytic KL"),
        Patch(facecolor=colours["mc"], edgecolor="black", label="Monte Carlo"),
        Patch(facecolor="#bbbbbb", edgecolor="black", label="observed"),
    ]
    if bad_model_edges:
        handles.append(Patch(facecolor=red, label="model parent that is a guide descendant (bias)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    print(f"wrote {os.path.relpath(path, ROOT)}")


def _circle(xy, r, face):
    from matplotlib.patches import Circle

    return Circle(xy, r, facecolor=face, edgecolor="black", lw=1.0, zorder=3)


def _square(xy, half):
    from matplotlib.patches import Rectangle

    x, y = xy
    return Rectangle(
        (x - half, y - half), 2 * half, 2 * half, facecolor="white", edgecolor="#555555", zorder=3
    )


def switching_plan():
    """The plan of the switching state-space example on 5 simulated sequences of 3 steps."""
    import pyro

    from pyro_markov_kl import TraceMarkovKL_ELBO
    from pyro_markov_kl.examples.switching import SwitchingSSM, simulate

    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    data = simulate(num_sequences=5, T=3)
    ssm = SwitchingSSM()
    return TraceMarkovKL_ELBO(max_plate_nesting=1).explain(ssm.model, ssm.guide, data["x"])


def make_explain_and_dags() -> None:
    for guide in ("forward", "backward"):
        plan = small_dmm_plan(guide)
        _write(f"explain_{guide}.txt", str(plan))
        draw_dag(plan, guide, os.path.join(STATIC, f"dag_{guide}.png"))
    _write("explain_switching.txt", str(switching_plan()))


# --- part "fast": TraceMeanField_ELBO with a scale in the model only ---------------------------


def make_meanfield_scale() -> None:
    """
    KL annealing written in the model only: ``poutine.scale(0.1)`` around the model's latent
    site, none in the guide. The exact ELBO against the estimators' means.
    """
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro import poutine
    from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

    from pyro_markov_kl import TraceMarkovKL_ELBO

    def model():
        with poutine.scale(scale=0.1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(1.0))

    def guide():
        pyro.sample("z", dist.Normal(0.5, 0.5))

    q, p = dist.Normal(0.5, 0.5), dist.Normal(0.0, 1.0)
    # E_q[0.1 log p(z) + log p(x | z) - log q(z)], E_q[log p(z)] = -KL(q || p) - H(q),
    # E_q[log N(1; z, 1)] = log N(1; 0.5, 1) - Var_q(z) / 2
    exact = (
        0.1 * (-torch.distributions.kl_divergence(q, p) - q.entropy())
        + dist.Normal(0.5, 1.0).log_prob(torch.tensor(1.0))
        - 0.5 * 0.5**2
        + q.entropy()
    ).item()
    pyro.set_rng_seed(0)
    n = 100000
    kw = dict(num_particles=n, vectorize_particles=True, max_plate_nesting=0)
    rows = [("exact ELBO", exact, 0.0)]
    for elbo in (Trace_ELBO(**kw), TraceMeanField_ELBO(**kw), TraceMarkovKL_ELBO(**kw)):
        # the per-particle ELBO values, to give a standard error of the mean
        draws = torch.tensor([-elbo.loss(model, guide) for _ in range(20)])
        rows.append((type(elbo).__name__, draws.mean().item(), draws.std().item() / math.sqrt(20)))
    lines = [
        "model: with poutine.scale(scale=0.1): z ~ Normal(0, 1);  x ~ Normal(z, 1), x = 1",
        "guide: z ~ Normal(0.5, 0.5)  (no scale)",
        f"ELBO estimates: mean of 20 estimates of {n} particles each, with its standard error",
        "",
        f"{'':<22}{'ELBO':>10}{'SE':>10}",
    ]
    for name, value, se in rows:
        lines.append(f"{name:<22}{value:>10.4f}{se:>10.4f}")
    _write("meanfield_scale.txt", "\n".join(lines))


# --- part "fast": the catalogue of errors ------------------------------------------------------


def _error_cases() -> Dict[str, Callable[[], None]]:
    """
    The cases of ``errors.rst``, after ``tests/test_bad_input.py`` and
    ``tests/test_overrides_and_errors.py``: each function runs one bad input.
    """
    import pyro
    import pyro.distributions as dist
    import torch

    from pyro_markov_kl import TraceEnumMarkovKL_ELBO, TraceMarkovKL_ELBO

    MyNormal = _distributions()

    def chain_model():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        b = pyro.sample("b", dist.Normal(a, 1.0))
        pyro.sample("x", dist.Normal(b, 1.0), obs=torch.tensor(0.0))

    def event_shape_mismatch():
        def model():
            pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))

        def guide():
            pyro.sample("z", dist.Normal(torch.zeros(3), 1.0))

        TraceMarkovKL_ELBO().loss(model, guide)

    def unknown_kl_option():
        def guide():
            a = pyro.sample("a", dist.Normal(0.0, 1.0), infer={"kl": "closed-form"})
            pyro.sample("b", dist.Normal(a, 1.0))

        TraceMarkovKL_ELBO().loss(chain_model, guide)

    def analytic_override_biased():
        def backward_guide():
            b = pyro.sample("b", dist.Normal(0.0, 1.0), infer={"kl": "analytic"})
            pyro.sample("a", dist.Normal(b, 1.0))

        TraceMarkovKL_ELBO().loss(chain_model, backward_guide)

    def analytic_override_no_kl():
        def model():
            pyro.sample("s", dist.Gamma(2.0, 1.0))

        def guide():
            pyro.sample("s", dist.LogNormal(0.0, 1.0), infer={"kl": "analytic"})

        TraceMarkovKL_ELBO().loss(model, guide)

    def kl_wrong_shape():
        def model():
            pyro.sample("z", MyNormal(torch.zeros(4), 1.0).to_event(1))

        def guide():
            pyro.sample("z", MyNormal(torch.ones(4), 1.0).to_event(1))

        TraceMarkovKL_ELBO(kl_rules={(MyNormal, MyNormal): kl_summed_too_far}).loss(model, guide)

    def kl_returns_nan():
        def model():
            pyro.sample("z", MyNormal(0.0, 1.0))

        def guide():
            pyro.sample("z", MyNormal(1.0, 1.0))

        TraceMarkovKL_ELBO(kl_rules={(MyNormal, MyNormal): kl_nan}).loss(model, guide)

    def kl_negative_infinity():
        def model():
            pyro.sample("z", MyNormal(0.0, 1.0))

        def guide():
            pyro.sample("z", MyNormal(1.0, 1.0))

        TraceMarkovKL_ELBO(kl_rules={(MyNormal, MyNormal): kl_broken}).loss(model, guide)

    def support_mismatch():
        def model():
            pyro.sample("u", dist.Uniform(0.0, 1.0))

        def guide():
            pyro.sample("u", dist.Uniform(0.0, 2.0))

        TraceMarkovKL_ELBO().loss(model, guide)

    def nan_parameters():
        def model():
            pyro.sample("z", dist.Normal(torch.tensor(float("nan")), 1.0))

        def guide():
            pyro.sample("z", dist.Normal(0.0, 1.0))

        TraceMarkovKL_ELBO().loss(model, guide)

    def kl_rules_bad_key():
        def model():
            pyro.sample("z", dist.Normal(0.0, 1.0))

        TraceMarkovKL_ELBO(kl_rules={dist.Normal: lambda q, p: 0.0}).loss(
            model, lambda: pyro.sample("z", dist.Normal(0.0, 1.0))
        )

    def enum_plate_coupling():
        data = torch.tensor([0.3, -1.2, 2.0])

        def model():
            g = pyro.sample("g", dist.Normal(torch.zeros(1), 1.0))
            with pyro.plate("n", 3):
                k = pyro.sample("k", dist.Bernoulli(0.4))
                pyro.sample("x", dist.Normal(g + k, 0.5), obs=data)

        def guide():
            with pyro.plate("n", 3):
                k = pyro.sample("k", dist.Bernoulli(0.5))
            pyro.sample("g", dist.Normal(k.sum(-1, keepdim=True), 1.0))

        TraceEnumMarkovKL_ELBO(max_plate_nesting=1).loss(model, guide)

    return {
        "event_shape_mismatch": event_shape_mismatch,
        "unknown_kl_option": unknown_kl_option,
        "analytic_override_biased": analytic_override_biased,
        "analytic_override_no_kl": analytic_override_no_kl,
        "kl_wrong_shape": kl_wrong_shape,
        "kl_nan": kl_returns_nan,
        "kl_negative_infinity": kl_negative_infinity,
        "support_mismatch": support_mismatch,
        "nan_parameters": nan_parameters,
        "kl_rules_bad_key": kl_rules_bad_key,
        "enum_plate_coupling": enum_plate_coupling,
    }


def _fallback_cases() -> Dict[str, Callable[[], str]]:
    """Inputs that are not errors: the site falls back to Monte Carlo; ``explain()`` says why."""
    import pyro
    import pyro.distributions as dist
    import torch
    from torch.distributions.transforms import AffineTransform, ExpTransform

    from pyro_markov_kl import TraceMarkovKL_ELBO

    def explain(model, guide, **kw) -> str:
        return str(TraceMarkovKL_ELBO(**kw).explain(model, guide))

    def no_kl_for_pair():
        def model():
            pyro.sample("s", dist.Gamma(2.0, 1.0))

        def guide():
            pyro.sample("s", dist.LogNormal(0.0, 1.0))

        return explain(model, guide)

    def transforms_differ():
        def model():
            pyro.sample("s", dist.TransformedDistribution(dist.Normal(0.0, 1.0), ExpTransform()))

        def guide():
            base = dist.Normal(0.0, 1.0)
            pyro.sample("s", dist.TransformedDistribution(base, AffineTransform(1.0, 2.0)))

        return explain(model, guide)

    def mask_inside_event():
        def model():
            with pyro.plate("b", 2):
                mask = torch.tensor([True, False, True])
                pyro.sample("z", dist.Normal(torch.zeros(2, 3), 1.0).mask(mask).to_event(1))

        def guide():
            with pyro.plate("b", 2):
                cov = 0.25 * torch.eye(3)
                pyro.sample("z", dist.MultivariateNormal(torch.ones(2, 3), cov))

        return explain(model, guide, max_plate_nesting=1)

    def value_reaches_python():
        def model():
            a = pyro.sample("a", dist.Normal(0.0, 1.0))
            b = pyro.sample("b", dist.Normal(0.0, 1.0))
            loc = 1.0 if b.item() > 0 else 0.0  # b's value steers Python control flow
            pyro.sample("c", dist.Normal(loc + 0 * a, 1.0))

        def guide():
            c = pyro.sample("c", dist.Normal(0.0, 1.0))
            pyro.sample("a", dist.Normal(c, 1.0))
            pyro.sample("b", dist.Normal(0.0, 1.0))

        return explain(model, guide).replace(ROOT + os.sep, "")

    return {
        "fallback_no_kl": no_kl_for_pair,
        "fallback_transforms": transforms_differ,
        "fallback_mask": mask_inside_event,
        "fallback_escape": value_reaches_python,
    }


def _wrap(text: str, width: int = 92) -> str:
    out = []
    for line in text.splitlines():
        out.extend(
            textwrap.wrap(line, width, break_long_words=False, break_on_hyphens=False) or [""]
        )
    return "\n".join(out)


def _capture(fn: Callable[[], None], validation: bool) -> str:
    import pyro

    with pyro.validation_enabled(validation), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the message is what we want
            text = f"{type(e).__name__}: {e}".replace(ROOT + os.sep, "")
        else:
            text = "(no error)"
    for w in caught:
        if issubclass(w.category, (DeprecationWarning, FutureWarning)):
            continue
        text = f"{w.category.__name__}: {w.message}\n" + text
    return _wrap(text)


def make_errors() -> None:
    """Run every case with Pyro's validation on and off; save the messages."""
    os.makedirs(os.path.join(STATIC, "errors"), exist_ok=True)
    for name, fn in _error_cases().items():
        with_validation = _capture(fn, True)
        without = _capture(fn, False)
        if with_validation == without:
            text = with_validation
        else:
            text = (
                "with validation (pyro.enable_validation(True), Pyro's default):\n"
                + with_validation
                + "\n\nwithout validation (pyro.enable_validation(False)):\n"
                + without
            )
        _write(os.path.join("errors", f"{name}.txt"), text)
    for name, fn in _fallback_cases().items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _write(os.path.join("errors", f"{name}.txt"), fn())


def make_fast() -> None:
    make_explain_and_dags()
    make_meanfield_scale()
    make_errors()


# --- part "runs" ---------------------------------------------------------------------------------


def _command_line(argv: Sequence[str], width: int = 88) -> str:
    """``python ARGS``, wrapped with backslashes before options so that it fits ``width``."""
    words = ["python"] + [shlex.quote(a) for a in argv]
    lines = [words[0]]
    for i, word in enumerate(words[1:], 1):
        starts_option = word.startswith("-") and i > 2
        if starts_option and len(lines[-1]) + 1 + len(word) + 8 > width:
            lines[-1] += " \\"
            lines.append("    " + word)
        else:
            lines[-1] += " " + word
    return "\n".join(lines)


def run_commands(names: Sequence[str] = ()) -> None:
    """Run the commands of :data:`RUNS` (or those named) and save their output."""
    for name, argv in RUNS:
        if names and name not in names:
            continue
        shown = _command_line(argv)
        print(f"$ {shown}", flush=True)
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, check=False
        )
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            sys.stderr.write(result.stderr)
            raise SystemExit(f"{shown} failed with exit status {result.returncode}")
        _write(f"{name}.txt", f"$ {shown}\n{result.stdout}")
        print(f"  ({seconds:.0f} s)", flush=True)
        if name.startswith("dmm_compare_"):
            summarise_dmm_compare(name[len("dmm_compare_") :])


def summarise_dmm_compare(guide: str) -> None:
    """
    The table of ``tutorial_dmm.rst`` from ``docs/_static/dmm_compare_<guide>.csv``: for every
    estimator and evaluated epoch, the validation and test NLL bounds and the gradient variance
    of each estimator at that model's parameters. Written only for a run with ``--compare``.
    """
    import csv

    path = os.path.join(STATIC, f"dmm_compare_{guide}.csv")
    with open(path, encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["valid_nll_per_slice"] != "nan"]
    grad_keys = [k for k in rows[0] if k.startswith("grad_var[")]
    if not grad_keys:
        return
    names = [k[len("grad_var[") : -1] for k in grad_keys]
    header = f"{'trained by':<11}{'epoch':>6}{'valid NLL':>11}{'test NLL':>10}"
    header += "   grad var:" + "".join(f"{n:>11}" for n in names)
    if "trace" in names and "markov-kl" in names:
        header += f"{'trace/markov-kl':>17}"
    lines = [header]
    for r in rows:
        line = (
            f"{r['elbo']:<11}{int(r['epoch']):>6}{float(r['valid_nll_per_slice']):>11.4f}"
            f"{float(r['test_nll_per_slice']):>10.4f}"
        )
        line += " " * 11 + "".join(f"{float(r[k]):>11.3g}" for k in grad_keys)
        if "trace" in names and "markov-kl" in names:
            ratio = float(r["grad_var[trace]"]) / float(r["grad_var[markov-kl]"])
            line += f"{ratio:>17.1f}"
        lines.append(line)
    _write(f"dmm_compare_{guide}_table.txt", "\n".join(lines))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--part", choices=("fast", "runs", "tables", "all"), default="fast")
    parser.add_argument(
        "--only", default="", help="comma-separated names of RUNS to run (default: all)"
    )
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    if args.part in ("fast", "all"):
        make_fast()
    if args.part in ("runs", "all"):
        run_commands([n for n in args.only.split(",") if n])
    if args.part == "tables":  # the table of --part runs again, from the CSV files
        for guide in ("forward", "backward"):
            summarise_dmm_compare(guide)


if __name__ == "__main__":
    main()
