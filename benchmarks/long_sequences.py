# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
Long sequences: peak memory of a training step and cost of the plan analysis as T grows, for
TraceMarkovKL_ELBO against Trace_ELBO on the Deep Markov Model (issue 9, item 3).

Workloads (forward guide; sizes in ``benchmarks/_dmm.py``):

* ``T=1000``: the small DMM (z 16, RNN 128) on ``--batch-size`` synthetic sequences of
  ``--length`` (1000) steps;
* ``JSB test``: Pyro's full-size DMM (z 100, RNN 600) on the whole JSB Chorales test split in
  one batch (77 sequences, T_max 160, ragged and masked).

What is measured, and how (one torch thread):

* Peak memory: each ELBO runs in its own fresh subprocess per workload (same set-up and seed);
  glibc's ``MALLOC_MMAP_THRESHOLD_`` is fixed at 64 KiB so that freed tensors are returned to the
  OS and the resident set size follows live memory. After a warm-up step on a tiny batch (lazy
  imports, code pages), the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``) and read
  back (``VmHWM``) around the first step on the workload (for TraceMarkovKL_ELBO a plan cache
  miss, so it includes the dependency analysis) and around each of three further (cached)
  steps, after a garbage collection and glibc's ``malloc_trim(0)``. The target compares the
  larger of the peaks above the RSS before the step (the peak of a training run) with
  Trace_ELBO's.
* Plan analysis cost: on the small DMM with ``--batch-size`` synthetic sequences of T = 100, 300
  and 1000 steps, ``elbo.explain`` with an empty plan cache (trace + analysis) against
  ``explain`` with the plan cached (trace only), ``--reps`` interleaved pairs; the difference of
  medians is the analysis cost, and the exponent k of cost ~ T^k is fitted by least squares on
  the log-log points. A cached step at each T is timed too, for scale.

Targets (PASS/MISS): peak memory <= 1.1x Trace_ELBO's on both workloads; k <= 1.2 (linear).

Run ``python benchmarks/long_sequences.py`` (about 3 minutes on 2 cores), ``--quick`` for a smoke
run of a few seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402
import _dmm as D  # noqa: E402
import pyro  # noqa: E402

NAMES = ("markov-kl", "trace")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(p)
    p.add_argument("--length", type=int, default=1000, help="T of the long synthetic workload")
    p.add_argument("--batch-size", type=int, default=20, help="sequences of synthetic workloads")
    p.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=[100, 300, 1000],
        help="T values of the plan-analysis scaling",
    )
    p.add_argument("--reps", type=int, default=3, help="miss/hit pairs per T")
    p.add_argument("--jsb-size", choices=("small", "full"), default="full", help="DMM on JSB test")
    p.add_argument("--skip-memory", action="store_true", help="no memory subprocesses")
    p.add_argument("--memory-child", nargs=2, metavar=("WORKLOAD", "ELBO"), help=argparse.SUPPRESS)
    return p


def workload(name: str, args):
    """(DMM size, batch) of a memory workload."""
    if name == "long":
        return "small", D.synthetic_batch(args.batch_size, args.length, seed=args.seed)
    return args.jsb_size, D.jsb_batch("test", 0)


def memory_child(args) -> None:
    work, name = args.memory_child
    size, batch = workload(work, args)
    dmm = D.make_dmm(size, "forward", seed=args.seed)
    elbo = D.make_elbos((name,))[name]
    D.step_fn(elbo, dmm, D.synthetic_batch(2, 3, seed=args.seed))()  # warm-up, another structure
    step = D.step_fn(elbo, dmm, batch)
    pyro.set_rng_seed(args.seed)
    result = C.step_memory(step)
    result.update(
        B=int(batch[0].shape[0]), T=int(batch[0].shape[1]), slices=D.num_slices(batch), size=size
    )
    C.emit_memory_result(result)


def memory(args, targets: C.Targets) -> None:
    script = os.path.abspath(__file__)
    common = ["--threads", str(args.threads), "--seed", str(args.seed)]
    common += ["--length", str(args.length), "--batch-size", str(args.batch_size)]
    common += ["--jsb-size", args.jsb_size]
    for work, label in (("long", f"T={args.length}"), ("jsb-test", "JSB test")):
        res = C.run_memory_children(
            script, [["--memory-child", work, n] + common for n in NAMES], parallel=args.quick
        )
        res = dict(zip(NAMES, res))
        r = res["trace"]
        print(
            f"## Peak memory of a training step: {label}, {r['size']} DMM, B={r['B']}, "
            f"T_max={r['T']}, {r['slices']} time slices (one subprocess per ELBO)"
        )
        print()
        C.table(C.MEMORY_HEADERS, C.memory_rows(res, D.LABELS, "trace"))
        ratio = res["markov-kl"]["run_delta_mib"] / r["run_delta_mib"]
        targets.check(f"{label}: peak memory (run) vs Trace_ELBO", ratio, "<=", 1.1)
    print(
        "(RSS above the RSS before the step; ratios to Trace_ELBO; cached: median of 3 steps; "
        f"run peak: the larger; method: {r['method']}, MALLOC_MMAP_THRESHOLD_=65536)"
    )
    print()


def analysis_scaling(args, targets: C.Targets) -> None:
    from pyro_markov_kl import TraceMarkovKL_ELBO

    elbo = TraceMarkovKL_ELBO(max_plate_nesting=1)
    dmm = D.make_dmm("small", "forward", seed=args.seed)
    elbo.explain(dmm.model, dmm.guide, *D.synthetic_batch(2, 3, seed=args.seed))  # warm-up
    rows, costs = [], []
    for T in args.lengths:
        batch = D.synthetic_batch(args.batch_size, T, seed=args.seed)

        def miss(batch=batch):
            elbo.plan_cache.clear()
            elbo.explain(dmm.model, dmm.guide, *batch)

        def hit(batch=batch):
            elbo.explain(dmm.model, dmm.guide, *batch)

        hit()
        times = C.interleaved_times({"miss": miss, "hit": hit}, reps=args.reps, warmup=0)
        step_times = C.interleaved_times(
            {"step": D.step_fn(elbo, dmm, batch)}, reps=max(args.reps, 3), warmup=1
        )
        cost = C.median(times["miss"]) - C.median(times["hit"])
        step = C.median(step_times["step"])
        costs.append(cost)
        rows.append(
            (
                T,
                f"{C.median(times['miss']):.3f}",
                f"{C.median(times['hit']):.3f}",
                f"{cost:.3f}",
                f"{1e3 * cost / T:.2f}",
                f"{step:.3f}",
                f"{cost / step:.1f}",
            )
        )
    k = C.loglog_slope(args.lengths, costs)
    print(
        f"## Plan analysis cost vs T (small DMM, B={args.batch_size}, {args.reps} interleaved "
        "miss/hit pairs)"
    )
    print()
    C.table(
        (
            "T",
            "explain, miss s",
            "explain, cached s",
            "analysis s",
            "analysis ms per step of T",
            "cached train step s",
            "analysis / step",
        ),
        rows,
    )
    print(f"fitted exponent: analysis cost ~ T^{k:.2f}")
    print()
    targets.check("plan analysis cost exponent k (cost ~ T^k)", k, "<=", 1.2, f"{k:.2f}")


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    C.set_threads(args.threads)
    if args.quick:
        args.length, args.batch_size, args.lengths, args.reps = 30, 4, [10, 20, 40], 1
        args.jsb_size = "small"
    if args.memory_child:
        memory_child(args)
        return 0
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.nn.modules.rnn")
    C.header("Long sequences: TraceMarkovKL_ELBO vs Trace_ELBO", args)
    start = time.perf_counter()
    targets = C.Targets()
    analysis_scaling(args, targets)
    if not args.skip_memory:
        memory(args, targets)
    targets.print()
    print(f"total time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
