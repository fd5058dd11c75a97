# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
What the plan-cache checks that keep a plan from going stale cost per step, on the small DMM.

Every step, :class:`~pyro_markov_kl.plan_cache.PlanCache` builds the plan key: the traces'
structure (:func:`~pyro_markov_kl.plan_cache.structure_key`, which also walks every guide/model site
pair for ``TransformedDistribution`` transforms to compare), the non-tensor arguments
(:func:`~pyro_markov_kl.plan_cache.argument_key`) and the ELBO's settings. This script times,
side by side in one run (interleaved, medians), a whole training step of
``TraceMarkovKL_ELBO`` (plan cached) and each part of the key on the traces of that step, and
prints their share of the step, and the cost of one fresh analysis, which the cache's checks of
a cached plan (at a plan's uses 2, 16, 128 and every 256 after) spend. The checks added
against stale plans are the argument key, the settings, the transform walk and those fresh
analyses; the issue's budget is 2% of a step.

    python benchmarks/plan_key_cost.py            # small DMM, 20 sequences x 50 steps
    python benchmarks/plan_key_cost.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import sys

import _common as C
import _dmm as D
from pyro import poutine

from pyro_markov_kl import TraceMarkovKL_ELBO
from pyro_markov_kl.plan_cache import (
    CHECK_AT,
    CHECK_EVERY,
    _transform_equalities,
    argument_key,
    structure_key,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(p)
    p.add_argument("--reps", type=int, default=30, help="timed repetitions of each candidate")
    p.add_argument("--batch-size", type=int, default=20, help="sequences")
    p.add_argument("--length", type=int, default=50, help="time steps")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.length = 3, 5
    C.set_threads(args.threads)
    C.header("Plan-key checks: cost per step (small DMM)", args)

    dmm = D.make_dmm("small", "forward", seed=args.seed)
    batch = D.synthetic_batch(args.batch_size, args.length, seed=args.seed) + (0.5,)
    elbo = TraceMarkovKL_ELBO(max_plate_nesting=1)
    step = D.step_fn(elbo, dmm, batch)
    step()  # analyse and cache the plan
    guide_trace = poutine.trace(dmm.guide).get_trace(*batch)
    model_trace = poutine.trace(poutine.replay(dmm.model, trace=guide_trace)).get_trace(*batch)
    pairs = [
        (site["fn"], model_trace.nodes[name]["fn"])
        for name, site in guide_trace.nodes.items()
        if site["type"] == "sample" and name in model_trace.nodes
    ]

    def transform_walk():
        for q, p_ in pairs:
            _transform_equalities(q, p_)

    def settings():
        return (elbo.vectorize_particles, elbo.leave_one_out_baseline, tuple(elbo.kl_rules.items()))

    def miss():
        elbo.plan_cache.clear()
        step()

    candidates = {
        "step": step,
        "step analysing anew": miss,
        "structure_key": lambda: structure_key(model_trace, guide_trace),
        "transform walk": transform_walk,
        "argument_key": lambda: argument_key(batch, {}),
        "settings": settings,
    }
    times = C.interleaved_times(candidates, reps=args.reps)
    step_time = C.median(times["step"])
    rows = []
    for name, ts in times.items():
        t = C.median(ts)
        rows.append((name, C.fmt_ms(t), f"{100 * t / step_time:.3f}%"))
    C.table(["part", "median", "share of a step"], rows)
    added = sum(C.median(times[n]) for n in ("transform walk", "argument_key", "settings"))
    analysis = C.median(times["step analysing anew"]) - step_time
    first = len(CHECK_AT) + 1  # checks in a plan's first CHECK_EVERY uses
    checks = analysis / CHECK_EVERY
    print()
    print(f"one analysis: {C.fmt_ms(analysis)} ms = {analysis / step_time:.2f} steps")
    print(
        f"checks against a fresh analysis at uses {CHECK_AT} and every {CHECK_EVERY}: "
        f"{100 * first * analysis / (CHECK_EVERY * step_time):.2f}% of a step over a plan's "
        f"first {CHECK_EVERY} uses, {100 * checks / step_time:.2f}% after"
    )
    total = added + checks
    print(
        f"checks added against stale plans, in the long run: {100 * total / step_time:.2f}% of a "
        f"step (budget 2%): {'met' if total <= 0.02 * step_time else 'MISSED'}"
    )
    print(f"sites: {len(pairs)} guide/model pairs, {len(batch)} arguments")
    return 0


if __name__ == "__main__":
    sys.exit(main())
