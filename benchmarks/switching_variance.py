# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
Switching state-space model: gradient variance of the guide parameters and step time of
TraceMarkovKL_ELBO against TraceGraph_ELBO and Trace_ELBO (issue 4).

The model and guide are :class:`pyro_markov_kl.examples.switching.SwitchingSSM` on data from
:func:`pyro_markov_kl.examples.switching.simulate` (``--sequences`` x ``--length``). The regimes
are Bernoulli, so every ELBO needs score-function terms: Trace_ELBO weights each by the whole
Monte Carlo ELBO, TraceGraph_ELBO by its Monte Carlo downstream cost, TraceMarkovKL_ELBO by the
downstream cost with analytic per-step KLs in it.

What is measured, and how (one torch thread, one particle per step):

* Gradient variance at fixed parameters, at initialisation and after ``--train-steps`` Adam
  steps with TraceMarkovKL_ELBO: ``--draws`` draws per ELBO; the total variance is the sum over
  the guide's parameters (``regime_net``, ``state_net``) of the per-coordinate sample variance
  (the same over all parameters is shown for information). The ELBOs are interleaved draw by
  draw and draw ``d`` of every ELBO uses the same seed, so all three see the same guide samples;
  ratio standard errors are paired (delta method on the per-draw contributions).
* Step time: each draw above is timed (zeroing the gradients plus ``loss_and_grads``); medians
  over both phases and ratios of medians.

Target (PASS/MISS at the end): guide-parameter gradient variance of TraceMarkovKL_ELBO at most
0.5x TraceGraph_ELBO's, in both phases.

Run ``python benchmarks/switching_variance.py`` (about 3 minutes on 2 cores), ``--quick`` for a
smoke run of a few seconds.
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

from pyro_markov_kl.examples.switching import SwitchingSSM, build_elbo, simulate  # noqa: E402

LABELS = {"markov-kl": "TraceMarkovKL_ELBO", "tracegraph": "TraceGraph_ELBO", "trace": "Trace_ELBO"}
NAMES = tuple(LABELS)
OURS, GRAPH, TRACE = NAMES


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(p)
    p.add_argument("--draws", type=int, default=100, help="gradient draws per ELBO and phase")
    p.add_argument("--train-steps", type=int, default=100, help="Adam steps before phase 2")
    p.add_argument("--lr", type=float, default=0.02, help="Adam step size (the example's)")
    p.add_argument("--sequences", type=int, default=20, help="number of sequences")
    p.add_argument("--length", type=int, default=25, help="time steps")
    p.add_argument("--hidden", type=int, default=16, help="hidden units of the guide networks")
    return p


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    C.set_threads(args.threads)
    if args.quick:
        args.draws, args.train_steps, args.length = 4, 2, 5
    warnings.filterwarnings("ignore", message=".*baseline.*")
    C.header("Switching SSM: TraceMarkovKL_ELBO vs TraceGraph_ELBO vs Trace_ELBO", args)
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
    elbos = {n: build_elbo(n, num_particles=1) for n in NAMES}
    plan = elbos[OURS].explain(ssm.model, ssm.guide, data)
    n_sf = len(plan.score_function_sites())
    n_an = len(plan.analytic_sites())
    print(
        f"data: {args.sequences} sequences x {args.length} steps; {len(params)} parameter tensors "
        f"({guide_idx.sum()} guide coordinates of {guide_idx.numel()}); TraceMarkovKL_ELBO plan: "
        f"{n_an} analytic, {len(plan.sites) - n_an} Monte Carlo latent sites, {n_sf} "
        "score-function sites"
    )
    print(flush=True)

    def step_of(elbo):
        def step():
            for p in params:
                p.grad = None
            return elbo.loss_and_grads(ssm.model, ssm.guide, data)

        return step

    steps = {n: step_of(e) for n, e in elbos.items()}
    times = {n: [] for n in NAMES}
    var_rows, targets = [], C.Targets()
    for phase in ("init", "trained"):
        if phase == "trained":
            optim = torch.optim.Adam(params, lr=args.lr)
            for _ in range(args.train_steps):
                optim.zero_grad(set_to_none=True)
                elbos[OURS].loss_and_grads(ssm.model, ssm.guide, data)
                optim.step()
            optim.zero_grad(set_to_none=True)
        for step in steps.values():
            step()  # warm-up (plan analysis)
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
                    C.fmt_pm(*C.variance_ratio(guide[n], guide[TRACE])),
                    C.fmt_pm(va, sea),
                    C.fmt_pm(*C.variance_ratio(draws[n], draws[GRAPH])),
                )
            )
        r = C.variance_ratio(guide[OURS], guide[GRAPH])
        targets.check(
            f"{phase}: guide grad variance vs TraceGraph_ELBO", r[0], "<=", 0.5, C.fmt_pm(*r)
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
            "vs Trace_ELBO",
            "all params",
            "all: vs TraceGraph_ELBO",
        ),
        var_rows,
    )
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
