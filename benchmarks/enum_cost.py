# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
Step time of TraceEnumMarkovKL_ELBO against TraceEnum_ELBO on an HMM with enumerated states.

Set-up: an HMM over ``--length`` steps (default T = 200) with ``--states`` hidden states
enumerated in parallel under ``pyro.markov`` (TraceEnum_ELBO's sum-product, linear in T), a
batch of ``--batch-size`` sequences in a plate, learnable transition logits and emission means,
and two continuous global latents, an emission offset and a log emission scale, with Normal
priors and a Normal guide: TraceEnumMarkovKL_ELBO takes their KL analytically, everything else
is TraceEnum_ELBO's computation.

What is measured, and how (one torch thread):

* Step time: zeroing the gradients plus ``loss_and_grads``, ``--reps`` times per ELBO,
  interleaved (order rotated every repetition) after ``--warmup`` untimed rounds, which include
  the dependency analysis of TraceEnumMarkovKL_ELBO's first step; medians, IQRs and the ratio
  ``median(TraceEnumMarkovKL_ELBO) / median(TraceEnum_ELBO)``.
* The cost of the one-off analysis: the time of TraceEnumMarkovKL_ELBO's first step.
* Checks: the plan (2 analytic sites, T enumerated), and a time-scaling check: the step time
  at T/2 and T, whose ratio is about 2 if enumeration stays linear in T.

Target (PASS/MISS): ratio <= 1.5.

Run ``python benchmarks/enum_cost.py`` (under a minute), ``--quick`` for a smoke run.
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
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from pyro.distributions import constraints  # noqa: E402
from pyro.infer import TraceEnum_ELBO  # noqa: E402
from pyro.ops.indexing import Vindex  # noqa: E402

from pyro_markov_kl.trace_enum_markov_kl_elbo import TraceEnumMarkovKL_ELBO  # noqa: E402


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(p)
    p.add_argument("--reps", type=int, default=20, help="timed steps per ELBO")
    p.add_argument("--warmup", type=int, default=3, help="untimed interleaved rounds first")
    p.add_argument("--length", type=int, default=200, help="time steps T")
    p.add_argument("--states", type=int, default=4, help="hidden states")
    p.add_argument("--batch-size", type=int, default=10, help="sequences")
    return p


def make_hmm(states: int, batch: int, length: int, seed: int):
    """Synthetic data and a (model, guide) pair with pyro.markov over ``length`` steps."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(length, batch, generator=g) + torch.randint(
        0, states, (length, batch), generator=g
    )

    def model(data):
        logits = pyro.param("trans_logits", torch.zeros(states, states))
        means = pyro.param("means", torch.arange(states, dtype=torch.float))
        offset = pyro.sample("offset", dist.Normal(0.0, 1.0))
        log_scale = pyro.sample("log_scale", dist.Normal(0.0, 0.5))
        with pyro.plate("seqs", data.size(1)):
            x = 0
            for t in pyro.markov(range(data.size(0))):
                x = pyro.sample(
                    f"x_{t}",
                    dist.Categorical(logits=Vindex(logits)[..., x, :]),
                    infer={"enumerate": "parallel"},
                )
                pyro.sample(
                    f"y_{t}",
                    dist.Normal(Vindex(means)[..., x] + offset, log_scale.exp()),
                    obs=data[t],
                )

    def guide(data):
        for name in ("offset", "log_scale"):
            loc = pyro.param(f"{name}_loc", torch.tensor(0.0))
            scale = pyro.param(f"{name}_scale", torch.tensor(0.3), constraint=constraints.positive)
            pyro.sample(name, dist.Normal(loc, scale))

    return model, guide, data


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    C.set_threads(args.threads)
    if args.quick:
        args.reps, args.warmup, args.length = 3, 1, 20
    warnings.filterwarnings("ignore", category=UserWarning)
    C.header("TraceEnumMarkovKL_ELBO vs TraceEnum_ELBO, HMM with enumerated states", args)
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    model, guide, data = make_hmm(args.states, args.batch_size, args.length, args.seed)
    elbos = {
        "TraceEnumMarkovKL_ELBO": TraceEnumMarkovKL_ELBO(max_plate_nesting=1),
        "TraceEnum_ELBO": TraceEnum_ELBO(max_plate_nesting=1),
    }
    plan = elbos["TraceEnumMarkovKL_ELBO"].explain(model, guide, data)
    print(
        f"HMM: T={args.length}, {args.states} states, {args.batch_size} sequences; plan: "
        f"analytic {', '.join(plan.analytic_sites())}; {len(plan.model_enumerated)} sites "
        "enumerated in the model"
    )
    params = None

    def step_of(elbo, data):
        def step():
            nonlocal params
            if params is not None:
                for p in params:
                    p.grad = None
            loss = elbo.loss_and_grads(model, guide, data)
            if params is None:
                params = [v.unconstrained() for v in pyro.get_param_store().values()]
            return loss

        return step

    fresh = TraceEnumMarkovKL_ELBO(max_plate_nesting=1)
    start = time.perf_counter()
    step_of(fresh, data)()
    first = time.perf_counter() - start
    print(f"first step of a fresh TraceEnumMarkovKL_ELBO (with the analysis): {first:.2f} s")
    print()

    steps = {n: step_of(e, data) for n, e in elbos.items()}
    times = C.interleaved_times(steps, reps=args.reps, warmup=args.warmup)
    med = {n: C.median(t) for n, t in times.items()}
    ratio = med["TraceEnumMarkovKL_ELBO"] / med["TraceEnum_ELBO"]
    rows = []
    for n in elbos:
        lo, hi = C.iqr(times[n])
        rows.append(
            (
                n,
                C.fmt_ms(med[n]),
                f"{C.fmt_ms(lo)}-{C.fmt_ms(hi)}",
                f"{med[n] / med['TraceEnum_ELBO']:.2f}",
            )
        )
    print(f"## Step time, T={args.length} ({args.reps} interleaved steps per ELBO)")
    print()
    C.table(("ELBO", "median ms", "IQR ms", "ratio to TraceEnum_ELBO"), rows)

    # linear in T: time at T/2 against T, TraceEnumMarkovKL_ELBO only
    half = data[: args.length // 2]
    half_times = C.interleaved_times(
        {"half": step_of(elbos["TraceEnumMarkovKL_ELBO"], half)},
        reps=max(3, args.reps // 3),
        warmup=1,
    )
    scaling = med["TraceEnumMarkovKL_ELBO"] / C.median(half_times["half"])
    print(
        f"TraceEnumMarkovKL_ELBO step time at T={args.length} / at T={args.length // 2}: "
        f"{scaling:.2f} (2 if linear in T)"
    )
    print()
    targets = C.Targets()
    targets.check(
        "step time ratio TraceEnumMarkovKL_ELBO / TraceEnum_ELBO", ratio, "<=", 1.5, f"{ratio:.2f}"
    )
    targets.check("plan: 2 analytic sites (check)", len(plan.analytic_sites()), ">=", 2)
    targets.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
