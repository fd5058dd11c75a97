# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
Switching state-space model: gradient variance of the guide parameters and step time of
TraceMarkovKL_ELBO (with and without its leave-one-out baseline) against TraceGraph_ELBO (with
and without a decaying-average baseline) and Trace_ELBO (issue 4).

The model and guide are :class:`pyro_markov_kl.examples.switching.SwitchingSSM` on data from
:func:`pyro_markov_kl.examples.switching.simulate` (``--sequences`` x ``--length``). The regimes
are Bernoulli, so every ELBO needs score-function terms: Trace_ELBO weights each by the whole
Monte Carlo ELBO, TraceGraph_ELBO by its Monte Carlo downstream cost, TraceMarkovKL_ELBO by the
downstream cost with analytic per-step KLs in it. The five estimators, all with one particle:

* ``TraceMarkovKL_ELBO``: the default, whose score-function terms get the leave-one-out
  baseline (the mean downstream cost of the other sequences, elements of the same plate) at
  every regime site ``r_t``;
* ``TraceMarkovKL_ELBO, no baseline``: ``leave_one_out_baseline=False``, so the analytic KLs
  alone (TraceGraph_ELBO's default of no baseline);
* ``TraceGraph_ELBO``: Pyro's default, no baseline;
* ``TraceGraph_ELBO + decaying-average baseline``: the guide wrapped in
  ``poutine.infer_config`` to give every ``r_t`` ``infer={"baseline":
  {"use_decaying_avg_baseline": True}}`` (Pyro's default ``baseline_beta`` 0.9), a running
  average of each sequence's downstream cost kept in the param store
  (``__baseline_avg_downstream_cost_r_t``; not a parameter of the model or guide, so not in the
  gradient vectors). Before each phase's draws it is warmed up with ``--baseline-warmup``
  gradient steps at the fixed parameters (gradients discarded, no optimiser step); it keeps
  updating during the draws, as it would in training;
* ``Trace_ELBO``.

What is measured, and how (one torch thread):

* Gradient variance at fixed parameters, at initialisation and after ``--train-steps`` Adam
  steps with TraceMarkovKL_ELBO (default; seeded with ``--seed`` + 1): ``--draws`` draws per
  ELBO; the total variance is the sum over the guide's parameters (``regime_net``,
  ``state_net``) of the per-coordinate sample variance (the same over all parameters is shown
  for information). The ELBOs are interleaved draw by draw and draw ``d`` of every ELBO uses
  the same seed, so all of them see the same guide samples; ratio standard errors are paired
  (delta method on the per-draw contributions). A "Contributions" table splits the reduction
  against TraceGraph_ELBO into the analytic KL's part (no baseline against TraceGraph_ELBO) and
  the leave-one-out baseline's part, and compares with TraceGraph_ELBO's own decaying-average
  baseline (informational).
* Step time: each draw above is timed (zeroing the gradients plus ``loss_and_grads``); medians
  over both phases and ratios of medians.

Target (PASS/MISS at the end): guide-parameter gradient variance of TraceMarkovKL_ELBO (default)
at most 0.5x TraceGraph_ELBO's (default), in both phases.

Run ``python benchmarks/switching_variance.py`` (about 4 minutes on 2 cores, most of it in the
two TraceGraph_ELBO estimators), ``--quick`` for a smoke run of a few seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer import TraceGraph_ELBO  # noqa: E402

from pyro_markov_kl import TraceMarkovKL_ELBO  # noqa: E402
from pyro_markov_kl.examples.switching import SwitchingSSM, build_elbo, simulate  # noqa: E402

LABELS = {
    "markov-kl": "TraceMarkovKL_ELBO",
    "markov-kl-nobase": "TraceMarkovKL_ELBO, no baseline",
    "tracegraph": "TraceGraph_ELBO",
    "tracegraph-avg": "TraceGraph_ELBO + decaying-average baseline",
    "trace": "Trace_ELBO",
}
NAMES = tuple(LABELS)
OURS, OURS_NOBASE, GRAPH, GRAPH_AVG, TRACE = NAMES
AVG_PREFIX = "__baseline_avg_downstream_cost_"
# informational variance ratios (numerator / denominator): what each part of the reduction is
CONTRIBUTIONS = (
    ("analytic KL alone", OURS_NOBASE, GRAPH),
    ("leave-one-out baseline on top of it", OURS, OURS_NOBASE),
    ("decaying-average baseline alone", GRAPH_AVG, GRAPH),
    ("ours against TraceGraph's own baseline", OURS, GRAPH_AVG),
)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(p)
    p.add_argument("--draws", type=int, default=100, help="gradient draws per ELBO and phase")
    p.add_argument("--train-steps", type=int, default=100, help="Adam steps before phase 2")
    p.add_argument("--lr", type=float, default=0.02, help="Adam step size (the example's)")
    p.add_argument("--sequences", type=int, default=20, help="number of sequences")
    p.add_argument("--length", type=int, default=25, help="time steps")
    p.add_argument("--hidden", type=int, default=16, help="hidden units of the guide networks")
    p.add_argument(
        "--baseline-warmup",
        type=int,
        default=50,
        help="steps warming up TraceGraph_ELBO's decaying averages before each phase's draws",
    )
    return p


def avg_baseline_config(site) -> dict:
    """``infer`` of TraceGraph_ELBO's decaying-average baseline for the regime sites ``r_t``."""
    if site["type"] == "sample" and site["name"].startswith("r_"):
        return {"baseline": {"use_decaying_avg_baseline": True}}
    return {}


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    C.set_threads(args.threads)
    if args.quick:
        args.draws, args.train_steps, args.length, args.baseline_warmup = 4, 2, 5, 3
    warnings.filterwarnings("ignore", message=".*baseline.*")
    C.header("Switching SSM: TraceMarkovKL_ELBO vs TraceGraph_ELBO vs Trace_ELBO, baselines", args)
    start = time.perf_counter()

    pyro.clear_param_store()
    torch.manual_seed(args.seed)
    data = simulate(args.sequences, args.length, seed=args.seed)["x"]
    ssm = SwitchingSSM(hidden=args.hidden)
    params = list(ssm.parameters())
    guide_idx = torch.cat(
        [
            torch.full((p.numel(),), n.startswith(("regime_net", "state_net")), dtype=torch.bool)
            for n, p in ssm.named_parameters()
        ]
    )
    kw = dict(num_particles=1, vectorize_particles=False, max_plate_nesting=1)
    elbos = {
        OURS: build_elbo("markov-kl", num_particles=1),
        OURS_NOBASE: TraceMarkovKL_ELBO(leave_one_out_baseline=False, **kw),
        GRAPH: build_elbo("tracegraph", num_particles=1),
        GRAPH_AVG: TraceGraph_ELBO(**kw),
        TRACE: build_elbo("trace", num_particles=1),
    }
    assert elbos[OURS].leave_one_out_baseline, "TraceMarkovKL_ELBO's default changed"
    guides = {n: ssm.guide for n in NAMES}
    guides[GRAPH_AVG] = pyro.poutine.infer_config(ssm.guide, avg_baseline_config)
    # the wrapped guide gives the regime sites, and only those, the baseline option
    tr = pyro.poutine.trace(guides[GRAPH_AVG]).get_trace(data)
    with_baseline = [
        n for n, s in tr.nodes.items() if s["type"] == "sample" and "baseline" in s["infer"]
    ]
    assert with_baseline == [f"r_{t}" for t in range(args.length)], with_baseline

    plan = elbos[OURS].explain(ssm.model, ssm.guide, data)
    n_sf = len(plan.score_function_sites())
    n_an = len(plan.analytic_sites())
    print(
        f"data: {args.sequences} sequences x {args.length} steps; {len(params)} parameter tensors "
        f"({guide_idx.sum()} guide coordinates of {guide_idx.numel()}); TraceMarkovKL_ELBO plan: "
        f"{n_an} analytic, {len(plan.sites) - n_an} Monte Carlo latent sites, {n_sf} "
        "score-function sites"
    )

    def step_of(name):
        elbo, guide = elbos[name], guides[name]

        def step():
            for p in params:
                p.grad = None
            return elbo.loss_and_grads(ssm.model, guide, data)

        return step

    def warm_up_averages() -> None:
        for _ in range(args.baseline_warmup):
            steps[GRAPH_AVG]()
        C.zero_grads(params)

    steps = {n: step_of(n) for n in NAMES}
    times = {n: [] for n in NAMES}
    var_rows, contrib_rows, targets = [], [], C.Targets()
    for phase in ("init", "trained"):
        if phase == "trained":
            # seeded, so that the trained parameters do not depend on the estimators drawn above
            pyro.set_rng_seed(args.seed + 1)
            optim = torch.optim.Adam(params, lr=args.lr)
            for _ in range(args.train_steps):
                optim.zero_grad(set_to_none=True)
                elbos[OURS].loss_and_grads(ssm.model, ssm.guide, data)
                optim.step()
            optim.zero_grad(set_to_none=True)
        for step in steps.values():
            step()  # warm-up (plan analysis; creates the decaying averages)
        warm_up_averages()
        if phase == "init":
            store = pyro.get_param_store()
            avgs = sorted(k for k in store.keys() if k.startswith(AVG_PREFIX))
            assert avgs == sorted(AVG_PREFIX + f"r_{t}" for t in range(args.length)), avgs
            param_ids = {id(p) for p in params}
            assert not any(id(store[k]) in param_ids for k in avgs)
            shape = tuple(store[avgs[0]].shape)
            print(
                f"TraceGraph_ELBO decaying-average baseline: {len(avgs)} running averages of shape "
                f"{shape} in the param store ({avgs[0]}, ...), not among the gradient "
                f"coordinates; {args.baseline_warmup} warm-up steps (beta 0.9) before each "
                "phase's draws"
            )
            print(flush=True)
        draws, t = C.gradient_draws(steps, params, args.draws, args.seed + 1000)
        for n in NAMES:
            times[n] += t[n]
        guide = {n: d[:, guide_idx] for n, d in draws.items()}
        for n in NAMES:
            v, se = C.total_variance(guide[n])
            va, sea = C.total_variance(draws[n])
            var_rows.append(
                (
                    phase if n == OURS else "",
                    LABELS[n],
                    C.fmt_pm(v, se),
                    C.fmt_pm(*C.variance_ratio(guide[n], guide[GRAPH])),
                    C.fmt_pm(*C.variance_ratio(guide[n], guide[GRAPH_AVG])),
                    C.fmt_pm(*C.variance_ratio(guide[n], guide[TRACE])),
                    C.fmt_pm(va, sea),
                    C.fmt_pm(*C.variance_ratio(draws[n], draws[GRAPH])),
                )
            )
        r = C.variance_ratio(guide[OURS], guide[GRAPH])
        targets.check(
            f"{phase}: guide grad variance vs TraceGraph_ELBO", r[0], "<=", 0.5, C.fmt_pm(*r)
        )
        for i, (what, a, b) in enumerate(CONTRIBUTIONS):
            contrib_rows.append(
                (
                    "" if i else phase,
                    what,
                    f"{LABELS[a]} / {LABELS[b]}",
                    C.fmt_pm(*C.variance_ratio(guide[a], guide[b])),
                )
            )
        del draws, guide

    print(f"## Total gradient variance ({args.draws} draws per ELBO and phase)")
    print()
    C.table(
        (
            "phase",
            "ELBO",
            "guide params",
            "vs TraceGraph_ELBO",
            "vs TraceGraph + avg baseline",
            "vs Trace_ELBO",
            "all params",
            "all: vs TraceGraph_ELBO",
        ),
        var_rows,
    )
    print("## Contributions (guide-parameter gradient variance ratios; informational)")
    print()
    C.table(("phase", "part", "ratio of", "variance ratio"), contrib_rows)
    med = {n: C.median(times[n]) for n in NAMES}
    print(f"## Step time ({len(times[OURS])} interleaved steps per ELBO)")
    print()
    rows = []
    for n in NAMES:
        lo, hi = C.iqr(times[n])
        rows.append(
            (
                LABELS[n],
                C.fmt_ms(med[n]),
                f"{C.fmt_ms(lo)}-{C.fmt_ms(hi)}",
                f"{med[n] / med[GRAPH]:.3f}",
                f"{med[n] / med[TRACE]:.3f}",
            )
        )
    C.table(("ELBO", "median ms", "IQR ms", "vs TraceGraph_ELBO", "vs Trace_ELBO"), rows)
    targets.print()
    print(f"total time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
