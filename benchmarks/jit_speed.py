# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
Step time of JitTraceMarkovKL_ELBO against TraceMarkovKL_ELBO on the small Deep Markov Model.

If ``pyro_markov_kl`` has no ``JitTraceMarkovKL_ELBO``, the script says so and exits with 0.

Set-up: the ``small`` DMM of ``benchmarks/_dmm.py`` (z 16, emission 32, transition 64, RNN 128,
forward guide) on a synthetic batch (``--batch-size`` x ``--length``). ``torch.jit.trace`` cannot
take the example's :class:`~torch.nn.utils.rnn.PackedSequence` argument (it holds ``None``
fields), so both ELBOs get the same thin wrappers of ``DMM.model`` / ``DMM.guide`` that take the
time-reversed batch as a padded tensor and pack it inside.

What is measured, and how (one torch thread):

* Compilation: the JIT ELBO is called ``--warmup`` times first (the first call traces, the next
  ones let TorchScript's profiling executor optimise); the time of the first call and the number
  of compilations (calls of ``torch.jit.trace``, counted by wrapping it) are printed.
* Step time after warm-up: zeroing the gradients plus ``loss_and_grads``, ``--reps`` times per
  ELBO, interleaved (order rotated every repetition); medians and the speed-up
  ``median(TraceMarkovKL_ELBO) / median(JitTraceMarkovKL_ELBO)``.
* Checks: the estimator counts of every plan the JIT ELBO built, and the loss of both ELBOs at
  the same seed (both sample the guide alike, so equal estimators give equal losses).

Target (PASS/MISS): speed-up >= 1.5x.

Run ``python benchmarks/jit_speed.py`` (under a minute), ``--quick`` for a smoke run.
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
import torch  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402

from pyro_markov_kl.data import reverse_sequences  # noqa: E402


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(p)
    p.add_argument("--reps", type=int, default=40, help="timed steps per ELBO")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls of each ELBO first")
    p.add_argument("--batch-size", type=int, default=20, help="sequences")
    p.add_argument("--length", type=int, default=50, help="time steps")
    return p


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    C.set_threads(args.threads)
    if args.quick:
        args.reps, args.warmup, args.batch_size, args.length = 3, 3, 4, 6
    import pyro_markov_kl

    Jit = getattr(pyro_markov_kl, "JitTraceMarkovKL_ELBO", None)
    if Jit is None:
        print("pyro_markov_kl has no JitTraceMarkovKL_ELBO yet: nothing to measure")
        return 0
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    C.header("JitTraceMarkovKL_ELBO vs TraceMarkovKL_ELBO, small DMM", args)

    compilations = [0]
    trace = torch.jit.trace

    def counting_trace(*a, **k):
        compilations[0] += 1
        return trace(*a, **k)

    torch.jit.trace = counting_trace

    dmm = D.make_dmm("small", "forward", seed=args.seed)
    mini_batch, _, mask, lengths = D.synthetic_batch(args.batch_size, args.length, args.seed)
    batch = (mini_batch, reverse_sequences(mini_batch, lengths), mask, lengths)

    def model(mini_batch, reversed_padded, mask, lengths):
        packed = pack_padded_sequence(reversed_padded, lengths, batch_first=True)
        return dmm.model(mini_batch, packed, mask, lengths)

    def guide(mini_batch, reversed_padded, mask, lengths):
        packed = pack_padded_sequence(reversed_padded, lengths, batch_first=True)
        return dmm.guide(mini_batch, packed, mask, lengths)

    params = list(dmm.parameters())
    elbos = {
        "JitTraceMarkovKL_ELBO": Jit(max_plate_nesting=1),
        "TraceMarkovKL_ELBO": pyro_markov_kl.TraceMarkovKL_ELBO(max_plate_nesting=1),
    }

    def step_of(elbo):
        def step():
            for p in params:
                p.grad = None
            return elbo.loss_and_grads(model, guide, *batch)

        return step

    steps = {n: step_of(e) for n, e in elbos.items()}
    warm = {}
    for name, step in steps.items():
        warm[name] = []
        for _ in range(args.warmup):
            start = time.perf_counter()
            step()
            warm[name].append(time.perf_counter() - start)
    print(
        f"small DMM, B={args.batch_size}, T={args.length}; warm-up call times (s): "
        + "; ".join(f"{n}: {', '.join(f'{t:.2f}' for t in ts)}" for n, ts in warm.items())
    )
    print(f"compilations after warm-up: {compilations[0]}")
    print()

    times = C.interleaved_times(steps, reps=args.reps, warmup=0)
    med = {n: C.median(t) for n, t in times.items()}
    jit_name, eager_name = list(elbos)
    speedup = med[eager_name] / med[jit_name]
    rows = []
    for n in elbos:
        lo, hi = C.iqr(times[n])
        rows.append(
            (
                n,
                C.fmt_ms(med[n]),
                f"{C.fmt_ms(lo)}-{C.fmt_ms(hi)}",
                f"{med[eager_name] / med[n]:.2f}x",
            )
        )
    print(f"## Step time after warm-up ({args.reps} interleaved steps per ELBO)")
    print()
    C.table(("ELBO", "median ms", "IQR ms", "speed-up vs TraceMarkovKL_ELBO"), rows)
    print(f"compilations in total: {compilations[0]}")

    # checks: which estimators the JIT ELBO used, and same-seed losses
    plans = list(elbos[jit_name].plan_cache.values())
    counts = ", ".join(
        f"{len(p.analytic_sites())} analytic / {len(p.mc_sites())} mc" for p in plans
    )
    eager_plans = list(elbos[eager_name].plan_cache.values())
    eager_counts = ", ".join(
        f"{len(p.analytic_sites())} analytic / {len(p.mc_sites())} mc" for p in eager_plans
    )
    losses = {}
    for n, e in elbos.items():
        pyro.set_rng_seed(args.seed + 7)
        with torch.no_grad():
            losses[n] = e.loss(model, guide, *batch)
    same = abs(losses[jit_name] - losses[eager_name]) <= 1e-4 * abs(losses[eager_name]) + 1e-3
    print(f"plans built by JitTraceMarkovKL_ELBO: {len(plans)} ({counts})")
    print(f"plans built by TraceMarkovKL_ELBO: {len(eager_plans)} ({eager_counts})")
    print(
        f"loss at the same seed: JIT {losses[jit_name]:.4f}, eager {losses[eager_name]:.4f} "
        f"({'equal' if same else 'DIFFERENT: the JIT ELBO computes another estimator'})"
    )
    print()
    targets = C.Targets()
    targets.check("JIT speed-up over TraceMarkovKL_ELBO", speedup, ">=", 1.5, f"{speedup:.2f}x")
    targets.check(
        "JIT computes the same estimator (same-seed loss, check)",
        float(same),
        ">=",
        1,
        "yes" if same else "no",
    )
    targets.print()
    torch.jit.trace = trace
    return 0


if __name__ == "__main__":
    sys.exit(main())
