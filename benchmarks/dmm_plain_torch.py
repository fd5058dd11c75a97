# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
Step time of the small Deep Markov Model against the same program written in plain torch.

The plain program (:func:`plain_loss`) is the DMM of ``pyro_markov_kl.examples.dmm`` with the
forward guide, run as written without Pyro: the guide RNN over the packed time-reversed
mini-batch, then a loop over t that samples ``z_t ~ q(z_t | z_{t-1}, x_{t:T})`` by
reparameterisation, adds the per-step analytic ``kl_divergence(Normal(q), Normal(p))`` (masked,
scaled by the annealing factor) and subtracts the Bernoulli log-likelihood of ``x_t``. It uses the
same modules (same weights) and draws its random numbers as Pyro's guide does, so its loss at a
seed equals ``TraceMarkovKL_ELBO``'s (checked and printed): it is the floor for running this
program as written, one step at a time.

Candidates, on one real JSB Chorales training mini-batch (``--batch-size`` sequences chosen by a
seeded permutation, ragged, masked), annealing factor 1 (a float, as the example passes it; a
scalar tensor to the compiled loss, as ``--jit`` passes it), one torch thread:

* ``plain torch``: :func:`plain_loss` and ``backward()``;
* ``TraceMarkovKL_ELBO``: ``loss_and_grads`` on the packed mini-batch (as the example runs it);
* ``JitTraceMarkovKL_ELBO``: ``loss_and_grads`` on the padded mini-batch (the reversed copy as a
  padded tensor, as ``--jit`` runs it), compiled before timing and run with TorchScript's
  optimising executor off, as the example does;
* ``Trace_ELBO``: Pyro's Monte Carlo ELBO on the packed mini-batch.

A step is zeroing the gradients plus the loss and its gradients. The candidates run interleaved
(order rotated each repetition); medians, interquartile ranges and ratios of medians to plain
torch are printed. Then ``cProfile`` over ``--profile-steps`` steps of ``TraceMarkovKL_ELBO`` and
of plain torch says where the extra time goes, by package (torch's backward pass, Pyro's
handlers and distributions, this library) and by function.

Targets (PASS/MISS): ``TraceMarkovKL_ELBO`` <= 1.10x plain torch; ``JitTraceMarkovKL_ELBO``
<= 0.9x plain torch.

Run ``python benchmarks/dmm_plain_torch.py`` (about a minute on an idle machine), ``--quick``
for a smoke run, ``--size example`` for the example's default sizes (RNN 64).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
import warnings
from typing import Callable, Dict, List, Tuple, Union

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402
import _dmm as D  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from torch.distributions import Bernoulli, Normal, kl_divergence  # noqa: E402
from torch.nn.utils.rnn import PackedSequence  # noqa: E402

from pyro_markov_kl.data import (  # noqa: E402
    bucket_length,
    bucket_lengths,
    get_mini_batch,
    load_jsb_chorales,
    pad_and_reverse,
)
from pyro_markov_kl.examples.dmm import DMM, build_elbo  # noqa: E402

NAMES = ("plain torch", "TraceMarkovKL_ELBO", "JitTraceMarkovKL_ELBO", "Trace_ELBO")


def plain_loss(
    dmm: DMM,
    mini_batch: torch.Tensor,
    mini_batch_reversed: PackedSequence,
    mini_batch_mask: torch.Tensor,
    mini_batch_seq_lengths: torch.Tensor,
    annealing_factor: float = 1.0,
) -> torch.Tensor:
    """
    The negative ELBO of the DMM with the forward guide, one analytic KL per step, in plain
    torch: the program of ``DMM.model`` and ``DMM.guide`` as written, without Pyro.
    """
    batch_size, T_max = mini_batch.shape[:2]
    h_0 = dmm.h_0.expand(1, batch_size, dmm.rnn.hidden_size).contiguous()
    rnn_output, _ = dmm.rnn(mini_batch_reversed, h_0)
    rnn_output = pad_and_reverse(rnn_output, mini_batch_seq_lengths, T_max)
    z_q = dmm.z_q_0.expand(batch_size, dmm.z_q_0.size(0))
    z_p = dmm.z_0.expand(batch_size, dmm.z_0.size(0))
    loss = torch.zeros(())
    for t in range(T_max):
        mask_t = mini_batch_mask[:, t]
        q_loc, q_scale = dmm.combiner(z_q, rnn_output[:, t])
        q = Normal(q_loc, q_scale)
        z_t = q.rsample()
        p_loc, p_scale = dmm.trans(z_p)
        kl = kl_divergence(q, Normal(p_loc, p_scale)).sum(-1)
        log_lik = Bernoulli(dmm.emitter(z_t)).log_prob(mini_batch[:, t]).sum(-1)
        loss = loss + (annealing_factor * kl * mask_t).sum() - (log_lik * mask_t).sum()
        z_q = z_p = z_t
    return loss


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(p)
    p.add_argument("--reps", type=int, default=30, help="timed steps per candidate")
    p.add_argument("--warmup", type=int, default=3, help="untimed interleaved rounds first")
    p.add_argument("--batch-size", type=int, default=20, help="JSB sequences in the mini-batch")
    p.add_argument(
        "--size",
        choices=sorted(D.SIZES),
        default="small",
        help="DMM sizes (benchmarks/_dmm.py): small (RNN 128), example (the example's "
        "defaults, RNN 64), full (Pyro's)",
    )
    p.add_argument("--profile-steps", type=int, default=5, help="steps profiled per program")
    p.add_argument(
        "--epoch-reps",
        type=int,
        default=2,
        help="timed epochs of every mini-batch of the training set per program (0: skip)",
    )
    p.add_argument(
        "--jit-buckets",
        type=int,
        default=4,
        help="bucket lengths of the JIT in the epoch measurement (as the example's option)",
    )
    p.add_argument("--profile-top", type=int, default=15, help="functions listed per profile")
    return p


def _batches(batch_size: int, seed: int) -> Tuple[tuple, tuple]:
    data = load_jsb_chorales("train")
    n = len(data["sequence_lengths"])
    indices = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:batch_size]
    packed = get_mini_batch(indices, data["sequences"], data["sequence_lengths"])
    padded = get_mini_batch(indices, data["sequences"], data["sequence_lengths"], pack=False)
    return packed, padded


def _group(filename: str) -> str:
    """The package a profiled function belongs to, for the per-package table."""
    f = filename.replace("\\", "/")
    if "pyro_markov_kl/examples" in f:
        return "the DMM's own code (examples/dmm.py)"
    if "pyro_markov_kl" in f:
        return "pyro_markov_kl (the estimator)"
    if "/pyro/poutine/" in f:
        return "pyro.poutine (handlers)"
    if "/pyro/distributions/" in f:
        return "pyro.distributions"
    if "/pyro/" in f:
        return "pyro (other)"
    if "/torch/autograd/" in f or "run_backward" in f:
        return "torch autograd (backward)"
    if "/torch/distributions/" in f:
        return "torch.distributions"
    if "/torch/nn/" in f:
        return "torch.nn"
    if "/torch/" in f:
        return "torch (other)"
    if f.startswith("~") or f.startswith("<built-in") or f == "~":
        return "builtins / C (torch ops)"
    return "other"


def profile(step: Callable[[], object], steps: int) -> pstats.Stats:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    return pstats.Stats(prof)


def by_group(stats: pstats.Stats) -> Dict[str, float]:
    """Own (exclusive) time per package, in seconds."""
    out: Dict[str, float] = {}
    for (filename, _, name), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore
        g = _group(filename if filename != "~" else f"<built-in {name}")
        out[g] = out.get(g, 0.0) + tottime
    return out


def top_functions(stats: pstats.Stats, n: int, key: int) -> list:
    """The ``n`` functions with the largest own (key 2) or cumulative (key 3) time."""
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][key])[:n]  # type: ignore
    out = []
    for (filename, line, name), (_, nc, tottime, cumtime, _) in rows:
        where = os.path.basename(filename) + f":{line}" if filename != "~" else "~"
        out.append((f"{name} ({where})", nc, f"{tottime * 1e3:.1f}", f"{cumtime * 1e3:.1f}"))
    return out


def epoch_section(args: argparse.Namespace, dmm: DMM, elbos: dict) -> None:
    """
    Time per epoch over the whole training set (the mini-batches of one seeded shuffle), each
    program stepping each mini-batch in turn, interleaved mini-batch by mini-batch: plain torch,
    TraceMarkovKL_ELBO and Trace_ELBO on the packed mini-batches, the JIT on the mini-batches
    padded to the bucket lengths as the example's ``--jit`` pads them.
    """
    data = load_jsb_chorales("train")
    sequences, lengths = data["sequences"], data["sequence_lengths"]
    n = len(lengths) if not args.quick else 2 * args.batch_size
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + 1))
    chunks = [order[i : i + args.batch_size] for i in range(0, n, args.batch_size)]
    buckets = bucket_lengths(int(lengths[:n].max()), args.jit_buckets)
    packed = [get_mini_batch(c, sequences, lengths) for c in chunks]
    padded = [
        get_mini_batch(
            c,
            sequences,
            lengths,
            pack=False,
            pad_to=bucket_length(int(lengths[c].max()), buckets),
            pad_batch_to=args.batch_size,
        )
        for c in chunks
    ]
    # the annealing factor as the example passes it: a float, a tensor to the compiled loss
    factor, jit_factor = 1.0, torch.tensor(1.0)
    params = list(dmm.parameters())
    jit = build_elbo("markov-kl", jit=True)  # a fresh one: compiles the bucket shapes
    eager, trace = elbos["TraceMarkovKL_ELBO"], elbos["Trace_ELBO"]

    def zero() -> None:
        for p in params:
            p.grad = None

    def run(name: str, k: int) -> None:
        zero()
        if name == "plain torch":
            plain_loss(dmm, *packed[k], factor).backward()
        elif name == "JitTraceMarkovKL_ELBO":
            with torch.jit.optimized_execution(False):
                jit.loss_and_grads(dmm.model, dmm.guide, *padded[k], jit_factor)
        else:
            elbo = eager if name == "TraceMarkovKL_ELBO" else trace
            elbo.loss_and_grads(dmm.model, dmm.guide, *packed[k], factor)

    compile_s, shapes = 0.0, set()
    for k, b in enumerate(padded):
        if tuple(b[0].shape) not in shapes:
            shapes.add(tuple(b[0].shape))
            start = time.perf_counter()
            run("JitTraceMarkovKL_ELBO", k)
            compile_s += time.perf_counter() - start
    # the eager plan of every mini-batch shape, outside the timing: the plan cache analyses a
    # shape at its first and second use (and checks again at the 16th, 128th and every 256th)
    for _ in range(2):
        for k in range(len(chunks)):
            run("TraceMarkovKL_ELBO", k)
    totals: Dict[str, List[float]] = {name: [] for name in NAMES}
    for r in range(args.epoch_reps):
        epoch = {name: 0.0 for name in NAMES}
        for k in range(len(chunks)):
            j = (r * len(chunks) + k) % len(NAMES)
            for name in NAMES[j:] + NAMES[:j]:
                start = time.perf_counter()
                run(name, k)
                epoch[name] += time.perf_counter() - start
        for name in NAMES:
            totals[name].append(epoch[name])
    med = {name: C.median(v) for name, v in totals.items()}
    mean_t = sum(int(b[0].size(1)) for b in packed) / len(packed)
    mean_pad = sum(int(b[0].size(1)) for b in padded) / len(padded)
    print(
        f"## Time per epoch: {len(chunks)} mini-batches of <= {args.batch_size} of {n} JSB "
        f"training sequences, interleaved mini-batch by mini-batch ({args.epoch_reps} epochs)"
    )
    print()
    print(
        f"JIT: buckets {buckets}, {len(shapes)} graphs compiled in {compile_s:.1f} s; mean "
        f"mini-batch length {mean_t:.1f} steps, padded {mean_pad:.1f}"
    )
    print()
    rows = [
        (
            name,
            f"{med[name]:.2f}",
            f"{med[name] / med['plain torch']:.3f}",
            f"{med[name] / med['TraceMarkovKL_ELBO']:.3f}",
            f"{med[name] / med['Trace_ELBO']:.3f}",
        )
        for name in NAMES
    ]
    C.table(
        ("program", "s per epoch", "vs plain torch", "vs TraceMarkovKL_ELBO", "vs Trace_ELBO"),
        rows,
    )


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    C.set_threads(args.threads)
    if args.quick:
        args.reps, args.warmup, args.batch_size, args.profile_steps = 3, 1, 4, 1
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    C.header("Small DMM: the Pyro program vs the same program in plain torch", args)

    dmm = D.make_dmm(args.size, "forward", seed=args.seed)
    packed, padded = _batches(args.batch_size, args.seed)
    # the annealing factor as the example passes it: a float, a tensor to the compiled loss
    factor, jit_factor = 1.0, torch.tensor(1.0)
    params = list(dmm.parameters())
    elbos = {
        "TraceMarkovKL_ELBO": build_elbo("markov-kl"),
        "JitTraceMarkovKL_ELBO": build_elbo("markov-kl", jit=True),
        "Trace_ELBO": build_elbo("trace"),
    }

    def zero() -> None:
        for p in params:
            p.grad = None

    def plain_step() -> float:
        zero()
        loss = plain_loss(dmm, *packed, factor)
        loss.backward()
        return loss.item()

    def elbo_step(
        name: str, batch: tuple, factor: Union[float, torch.Tensor]
    ) -> Callable[[], float]:
        elbo = elbos[name]

        def step() -> float:
            zero()
            return elbo.loss_and_grads(dmm.model, dmm.guide, *batch, factor)

        return step

    jit_inner = elbo_step("JitTraceMarkovKL_ELBO", padded, jit_factor)

    def jit_step() -> float:
        with torch.jit.optimized_execution(False):  # as the example's --jit
            return jit_inner()

    steps = {
        "plain torch": plain_step,
        "TraceMarkovKL_ELBO": elbo_step("TraceMarkovKL_ELBO", packed, factor),
        "JitTraceMarkovKL_ELBO": jit_step,
        "Trace_ELBO": elbo_step("Trace_ELBO", packed, factor),
    }

    # the same estimator: the plain program's loss at a seed is TraceMarkovKL_ELBO's
    losses = {}
    for name in ("plain torch", "TraceMarkovKL_ELBO", "JitTraceMarkovKL_ELBO"):
        start = time.perf_counter()
        pyro.set_rng_seed(args.seed + 11)
        losses[name] = steps[name]()
        if name == "JitTraceMarkovKL_ELBO":
            print(f"JIT: first call (tracing and compilation) {time.perf_counter() - start:.1f} s")
            pyro.set_rng_seed(args.seed + 11)
            losses[name] = steps[name]()
    ref = losses["TraceMarkovKL_ELBO"]
    same = all(abs(v - ref) <= 1e-4 * abs(ref) + 1e-3 for v in losses.values())
    slices = D.num_slices(packed)
    print(
        f"{args.size} DMM {D.SIZES[args.size]}, JSB train mini-batch of {args.batch_size} "
        f"sequences, T_max={packed[0].size(1)}, {slices} time slices"
    )
    print(
        "loss at the same seed: "
        + ", ".join(f"{n} {v:.3f}" for n, v in losses.items())
        + f" ({'equal' if same else 'DIFFERENT'})"
    )
    print()

    times = C.interleaved_times(steps, reps=args.reps, warmup=args.warmup)
    med = {n: C.median(t) for n, t in times.items()}
    plain = med["plain torch"]
    rows = []
    for n in NAMES:
        lo, hi = C.iqr(times[n])
        rows.append(
            (
                n,
                C.fmt_ms(med[n]),
                f"{C.fmt_ms(lo)}-{C.fmt_ms(hi)}",
                f"{med[n] / plain:.3f}",
                f"{med[n] / med['Trace_ELBO']:.3f}",
            )
        )
    print(f"## Step time ({args.reps} interleaved steps per program)")
    print()
    C.table(("program", "median ms", "IQR ms", "vs plain torch", "vs Trace_ELBO"), rows)

    # where the extra time goes
    profiles = {
        "plain torch": profile(plain_step, args.profile_steps),
        "TraceMarkovKL_ELBO": profile(steps["TraceMarkovKL_ELBO"], args.profile_steps),
    }
    groups = {n: by_group(s) for n, s in profiles.items()}
    names = sorted(set(groups["plain torch"]) | set(groups["TraceMarkovKL_ELBO"]))
    names.sort(key=lambda g: -groups["TraceMarkovKL_ELBO"].get(g, 0.0))
    k = args.profile_steps
    print(f"## Profile: own time per package, ms per step (cProfile, {k} steps each)")
    print()
    rows = []
    for g in names:
        ours, base = groups["TraceMarkovKL_ELBO"].get(g, 0.0), groups["plain torch"].get(g, 0.0)
        rows.append(
            (g, f"{ours / k * 1e3:.1f}", f"{base / k * 1e3:.1f}", f"{(ours - base) / k * 1e3:+.1f}")
        )
    total_o = sum(groups["TraceMarkovKL_ELBO"].values())
    total_b = sum(groups["plain torch"].values())
    rows.append(
        (
            "total (under cProfile)",
            f"{total_o / k * 1e3:.1f}",
            f"{total_b / k * 1e3:.1f}",
            f"{(total_o - total_b) / k * 1e3:+.1f}",
        )
    )
    C.table(("package", "TraceMarkovKL_ELBO", "plain torch", "difference"), rows)
    print(
        f"## Profile: TraceMarkovKL_ELBO, top {args.profile_top} functions by own time ({k} steps)"
    )
    print()
    C.table(
        ("function", "calls", "own ms", "cumulative ms"),
        top_functions(profiles["TraceMarkovKL_ELBO"], args.profile_top, 2),
    )
    print(f"## Profile: TraceMarkovKL_ELBO, top {args.profile_top} functions by cumulative time")
    print()
    C.table(
        ("function", "calls", "own ms", "cumulative ms"),
        top_functions(profiles["TraceMarkovKL_ELBO"], args.profile_top, 3),
    )

    if args.epoch_reps > 0:
        epoch_section(args, dmm, elbos)

    targets = C.Targets()
    ratio_eager = med["TraceMarkovKL_ELBO"] / plain
    ratio_jit = med["JitTraceMarkovKL_ELBO"] / plain
    targets.check(
        "TraceMarkovKL_ELBO step / plain torch", ratio_eager, "<=", 1.10, f"{ratio_eager:.3f}x"
    )
    targets.check(
        "JitTraceMarkovKL_ELBO step / plain torch", ratio_jit, "<=", 0.9, f"{ratio_jit:.3f}x"
    )
    targets.check(
        "same estimator (same-seed loss, check)", float(same), ">=", 1, "yes" if same else "no"
    )
    targets.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
