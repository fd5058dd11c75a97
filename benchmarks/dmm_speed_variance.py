# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
Deep Markov Model: step time, gradient variance, peak memory and plan-analysis cost of
TraceMarkovKL_ELBO against Trace_ELBO and TraceMeanField_ELBO, and TraceMeanField_ELBO's bias
with the backward guide (issue 6).

Two configurations (see ``benchmarks/_dmm.py``), with Pyro's forward guide
q(z_t | z_{t-1}, x_{t:T}), for which the analytic KL is unbiased at every step:

* ``small``: z 16, emission 32, transition 64, RNN 128, synthetic Bernoulli data, B=20, T=50;
* ``full``: Pyro's full-size DMM (z 100, emission 100, transition 200, RNN 600) on a real JSB
  Chorales training mini-batch of 20 sequences.

What is measured, and how (all in one process unless said otherwise, one torch thread):

* Gradient variance, at initialisation and after ``--train-steps`` (small) or
  ``--full-train-steps`` (full) Adam steps (trained with ``--train-elbo``): ``--draws``
  (``--full-draws``) gradient draws per ELBO at fixed parameters; the total variance is the
  sum over all DMM parameters of the per-coordinate sample variance. The ELBOs are
  interleaved draw by draw and draw ``d`` of every ELBO uses the same seed (common random
  numbers), so ELBOs that compute the same function of the guide's sample agree draw by draw;
  ratio standard errors are paired (delta method on the per-draw contributions).
* Step time: every gradient draw above is timed (zeroing the gradients plus ``loss_and_grads``,
  i.e. an SVI step without the optimiser update); the ELBOs are interleaved, with the order
  rotated every draw. Reported: medians over both phases, and ratios of medians.
* Plan analysis: ``elbo.plan_cache.clear()`` then a step (a cache miss) against a cached step,
  interleaved ``--miss-reps`` times; the difference of medians is the cost of one analysis,
  reported amortised over 100 steps as a percentage of the cached step time. For the JSB
  configuration it also counts the distinct plan structures (one per mini-batch ``T_max``) met
  in ``--epochs`` epochs of shuffled mini-batches of 20, to show the amortisation of real training.
* Peak memory: each ELBO runs in its own fresh subprocess (same set-up and seed); glibc's
  ``MALLOC_MMAP_THRESHOLD_`` is fixed at 64 KiB so that freed tensors are returned to the OS
  and the resident set size follows live memory. After a warm-up step on a tiny batch (lazy
  imports, code pages), before each region measured the garbage is collected, glibc's
  ``malloc_trim(0)`` returns freed heap pages, and the kernel's peak-RSS mark is reset
  (``/proc/self/clear_refs``); the peak is read back as ``VmHWM`` (``getrusage``'s
  ``ru_maxrss`` cannot be reset and, after fork and exec, also counts the parent's RSS).
  Reported: the peak RSS above the RSS before the step, for the first step on the batch (for
  TraceMarkovKL_ELBO a plan cache miss: it includes the dependency analysis) and for three
  cached steps (median); the target uses the larger, i.e. the peak of a training run.
  tracemalloc is not used: it does not see torch's CPU allocations.
* Bias with the backward guide q(z_t | z_{t+1}, x_{1:t}), where TraceMeanField_ELBO's
  per-step KL is biased: the mean over ``--bias-draws`` seeds of (loss of the ELBO - loss of
  Trace_ELBO), with the same seed for all ELBOs (paired), with standard errors; at
  initialisation for both configurations and after training (with Trace_ELBO) for ``small``.

Targets (PASS/MISS at the end): small DMM step time <= 0.85x Trace_ELBO's and
TraceMeanField_ELBO's; full DMM on JSB <= 1.0x both; gradient variance <= 1.05x
TraceMeanField_ELBO's and, at initialisation, < 0.2x Trace_ELBO's; plan analysis amortised over
100 steps < 2% of the step time; peak memory <= 1.1x Trace_ELBO's.

Run ``python benchmarks/dmm_speed_variance.py`` (about 5 minutes on 2 cores), ``--quick`` for a
smoke run of a few seconds, ``--skip-full`` for the small configuration only.
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

NAMES = tuple(D.LABELS)  # markov-kl, trace, meanfield
OURS, TRACE, MF = NAMES


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(p)
    p.add_argument("--draws", type=int, default=50, help="gradient draws per ELBO and phase")
    p.add_argument("--full-draws", type=int, default=50, help="--draws for the full DMM")
    p.add_argument("--train-steps", type=int, default=50, help="Adam steps before phase 2")
    p.add_argument("--full-train-steps", type=int, default=30, help="--train-steps, full DMM")
    p.add_argument("--train-elbo", choices=NAMES, default=OURS, help="ELBO used for training")
    p.add_argument("--small-lr", type=float, default=3e-3, help="Adam step size, small DMM")
    p.add_argument("--full-lr", type=float, default=3e-4, help="Adam step size, full DMM (Pyro's)")
    p.add_argument("--miss-reps", type=int, default=6, help="cache-miss repetitions (small)")
    p.add_argument("--full-miss-reps", type=int, default=3, help="cache-miss repetitions (full)")
    p.add_argument("--bias-draws", type=int, default=100, help="loss draws per ELBO (small)")
    p.add_argument("--full-bias-draws", type=int, default=16, help="loss draws per ELBO (full)")
    p.add_argument("--epochs", type=int, default=100, help="epochs for the JSB structure count")
    p.add_argument("--batch-size", type=int, default=20, help="small DMM: sequences")
    p.add_argument("--length", type=int, default=50, help="small DMM: time steps")
    p.add_argument("--skip-full", action="store_true", help="only the small configuration")
    p.add_argument("--skip-memory", action="store_true", help="no memory subprocesses")
    p.add_argument("--memory-child", nargs=2, metavar=("SIZE", "ELBO"), help=argparse.SUPPRESS)
    return p


def make_batch(size: str, args) -> tuple:
    if size == "small":
        return D.synthetic_batch(args.batch_size, args.length, seed=args.seed)
    return D.jsb_batch("train", 20, seed=args.seed)


# --- memory child ---------------------------------------------------------------------------------
def memory_child(args) -> None:
    size, name = args.memory_child
    D.quiet_meanfield_warnings()
    dmm = D.make_dmm(size, "forward", seed=args.seed)
    batch = make_batch(size, args)
    elbo = D.make_elbos((name,))[name]
    # warm up (lazy imports, code pages, allocator) on a tiny batch of another structure, so
    # that the first measured step of TraceMarkovKL_ELBO still analyses its plan
    D.step_fn(elbo, dmm, D.synthetic_batch(2, 3, seed=args.seed))()
    step = D.step_fn(elbo, dmm, batch)
    pyro.set_rng_seed(args.seed)
    C.emit_memory_result(C.step_memory(step))


# --- measurements ---------------------------------------------------------------------------------
def variance_phase(dmm, batch, elbos, draws, seed):
    params = list(dmm.parameters())
    steps = {n: D.step_fn(e, dmm, batch) for n, e in elbos.items()}
    for step in steps.values():  # warm-up; TraceMarkovKL_ELBO analyses the plan here
        step()
    return C.gradient_draws(steps, params, draws, seed)


def plan_miss_cost(dmm, batch, elbo, reps, seed):
    step = D.step_fn(elbo, dmm, batch)

    def miss():
        elbo.plan_cache.clear()
        step()

    times = C.interleaved_times({"miss": miss, "hit": step}, reps=reps, warmup=0)
    return C.median(times["miss"]), C.median(times["hit"])


def bias_draws(dmm, batch, elbos, draws, seed):
    """Paired loss differences to Trace_ELBO, same seed per draw for all ELBOs."""
    losses = {n: [] for n in elbos}
    with torch.no_grad():
        for d in range(draws):
            for n, e in elbos.items():
                pyro.set_rng_seed(seed + d)
                losses[n].append(e.loss(dmm.model, dmm.guide, *batch))
    return {n: [a - b for a, b in zip(losses[n], losses[TRACE])] for n in elbos}


def jsb_structure_count(epochs: int, seed: int):
    """Distinct mini-batch T_max (= plan structures) over ``epochs`` shuffled epochs of 20."""
    lengths = D.load_jsb_chorales("train")["sequence_lengths"]
    g = torch.Generator().manual_seed(seed)
    t_maxes, steps = set(), 0
    for _ in range(epochs):
        perm = torch.randperm(len(lengths), generator=g)
        for i in range(0, len(lengths), 20):
            t_maxes.add(int(lengths[perm[i : i + 20]].max()))
            steps += 1
    return sorted(t_maxes), steps


# --- one configuration ----------------------------------------------------------------------------
def run_config(size: str, args, targets: C.Targets, results: dict) -> None:
    quick = args.quick
    draws = args.draws if size == "small" else args.full_draws
    miss_reps = args.miss_reps if size == "small" else args.full_miss_reps
    bias_n = args.bias_draws if size == "small" else args.full_bias_draws
    lr = args.small_lr if size == "small" else args.full_lr
    train_steps = args.train_steps if size == "small" else args.full_train_steps
    if quick:
        draws, miss_reps, bias_n = 3, 1, 4

    dmm = D.make_dmm(size, "forward", seed=args.seed)
    batch = make_batch(size, args)
    B, T = batch[0].shape[:2]
    n_params = sum(p.numel() for p in dmm.parameters())
    an, mc = D.estimator_counts(dmm, batch)
    print(f"## {size} DMM: {D.SIZES[size]}")
    print()
    print(
        f"data: {'synthetic Bernoulli' if size == 'small' else 'JSB train'} mini-batch, B={B}, "
        f"T_max={T}, {D.num_slices(batch)} time slices; {n_params} parameters; forward guide: "
        f"TraceMarkovKL_ELBO plan has {an} analytic and {mc} Monte Carlo latent sites"
    )
    print(flush=True)

    elbos = D.make_elbos()
    t0 = time.perf_counter()
    var, times = {}, {n: [] for n in NAMES}
    for phase in ("init", "trained"):
        if phase == "trained":
            steps = 2 if quick else train_steps
            D.train(dmm, batch, D.make_elbos((args.train_elbo,))[args.train_elbo], steps, lr)
        g, t = variance_phase(dmm, batch, elbos, draws, args.seed + 1000)
        var[phase] = g
        for n in NAMES:
            times[n] += t[n]
        if phase == "init":
            miss, hit = plan_miss_cost(dmm, batch, elbos[OURS], miss_reps, args.seed)
    print(f"(variance and timing phases: {time.perf_counter() - t0:.0f} s)", flush=True)

    # step time
    med = {n: C.median(times[n]) for n in NAMES}
    print()
    print(f"### Step time, {size} DMM ({len(times[OURS])} interleaved steps per ELBO)")
    print()
    rows = []
    for n in NAMES:
        lo, hi = C.iqr(times[n])
        rows.append(
            (
                D.LABELS[n],
                C.fmt_ms(med[n]),
                f"{C.fmt_ms(lo)}-{C.fmt_ms(hi)}",
                f"{med[n] / med[TRACE]:.3f}",
                f"{med[n] / med[MF]:.3f}",
            )
        )
    C.table(("ELBO", "median ms", "IQR ms", "vs Trace_ELBO", "vs TraceMeanField_ELBO"), rows)
    limit = 0.85 if size == "small" else 1.0
    targets.check(f"{size}: step time vs Trace_ELBO", med[OURS] / med[TRACE], "<=", limit)
    targets.check(f"{size}: step time vs TraceMeanField_ELBO", med[OURS] / med[MF], "<=", limit)

    # gradient variance
    print(f"### Total gradient variance, {size} DMM ({draws} draws per ELBO, forward guide)")
    print()
    rows = []
    for phase in ("init", "trained"):
        g = var[phase]
        for n in NAMES:
            v, se = C.total_variance(g[n])
            r_tr = C.variance_ratio(g[n], g[TRACE])
            r_mf = C.variance_ratio(g[n], g[MF])
            rows.append(
                (
                    phase if n == OURS else "",
                    D.LABELS[n],
                    C.fmt_pm(v, se),
                    C.fmt_pm(*r_tr),
                    C.fmt_pm(*r_mf),
                )
            )
        r_mf = C.variance_ratio(g[OURS], g[MF])
        targets.check(
            f"{size} ({phase}): grad variance vs TraceMeanField_ELBO",
            r_mf[0],
            "<=",
            1.05,
            C.fmt_pm(*r_mf),
        )
        if phase == "init":
            r_tr = C.variance_ratio(g[OURS], g[TRACE])
            targets.check(
                f"{size} (init): grad variance vs Trace_ELBO", r_tr[0], "<", 0.2, C.fmt_pm(*r_tr)
            )
    C.table(("phase", "ELBO", "total variance", "vs Trace_ELBO", "vs TraceMeanField_ELBO"), rows)
    del var

    # plan analysis
    analysis = miss - hit
    pct = 100 * analysis / 100 / med[OURS]
    print(f"### Plan analysis, {size} DMM ({miss_reps} interleaved miss/hit pairs)")
    print()
    C.table(
        ("cache-miss step ms", "cached step ms", "one analysis ms", "amortised over 100 steps"),
        [(C.fmt_ms(miss), C.fmt_ms(hit), C.fmt_ms(analysis), f"{pct:.2f}% of a step")],
    )
    targets.check(f"{size}: plan analysis / 100 steps", pct, "<", 2.0, f"{pct:.2f}%")
    if size == "full":
        t_maxes, n_steps = jsb_structure_count(args.epochs, args.seed)
        # analysis cost is linear in T (see long_sequences.py): scale by T_max / T
        total = sum(analysis * t / T for t in t_maxes)
        print(
            f"JSB training with shuffled mini-batches of 20: {len(t_maxes)} distinct T_max (plan "
            f"structures) in {args.epochs} epochs = {n_steps} steps; estimated analysis time "
            f"{total:.1f} s = {100 * total / (n_steps * med[OURS]):.2f}% of {n_steps} steps "
            f"(plan cache size 256 holds them all)"
        )
        print()
    results[size] = {"step_ms": {n: med[n] * 1e3 for n in NAMES}, "analysis_s": analysis}

    # bias with the backward guide
    print(f"### Backward guide: loss minus Trace_ELBO's loss, {size} DMM ({bias_n} paired draws)")
    print()
    dmm_b = D.make_dmm(size, "backward", seed=args.seed)
    an_b, mc_b = D.estimator_counts(dmm_b, batch)
    rows = []
    states = ("init", "trained") if size == "small" else ("init",)
    for state in states:
        if state == "trained":
            steps = 2 if quick else train_steps
            D.train(dmm_b, batch, D.make_elbos((TRACE,))[TRACE], steps, lr)
        diffs = bias_draws(dmm_b, batch, elbos, bias_n, args.seed + 2000)
        for n in (MF, OURS):
            m, se = C.mean_se(diffs[n])
            z = m / se if se > 0 else float("inf") if m else 0.0
            rows.append(
                (
                    state if n == MF else "",
                    D.LABELS[n],
                    C.fmt_pm(m, se),
                    f"{m / D.num_slices(batch):.4f}",
                    f"{z:.1f}",
                )
            )
            if n == OURS:
                targets.check(
                    f"{size} ({state}): backward-guide bias of TraceMarkovKL_ELBO, abs(z) (check)",
                    abs(z),
                    "<",
                    3.0,
                    f"{m:.3g} ± {se:.2g} (z {z:.1f})",
                )
    C.table(("state", "ELBO", "mean loss diff ± SE", "per time slice", "z"), rows)
    print(
        f"(backward guide: TraceMarkovKL_ELBO plan has {an_b} analytic and {mc_b} Monte Carlo "
        "latent sites; loss = -ELBO, so a positive difference is an ELBO biased low)"
    )
    print(flush=True)

    # memory
    if args.skip_memory:
        return
    script = os.path.abspath(__file__)
    common = ["--threads", str(args.threads), "--seed", str(args.seed)]
    common += ["--batch-size", str(args.batch_size), "--length", str(args.length)]
    mem = C.run_memory_children(
        script, [["--memory-child", size, n] + common for n in NAMES], parallel=quick
    )
    mem = dict(zip(NAMES, mem))
    print(f"### Peak memory of a step, {size} DMM (one subprocess per ELBO)")
    print()
    C.table(C.MEMORY_HEADERS, C.memory_rows(mem, D.LABELS, TRACE))
    print(
        f"(RSS above the RSS before the step; ratios to Trace_ELBO; cached: median of 3 steps; "
        f"run peak: the larger; method: {mem[OURS]['method']}, MALLOC_MMAP_THRESHOLD_=65536)"
    )
    print()
    ratio = mem[OURS]["run_delta_mib"] / mem[TRACE]["run_delta_mib"]
    targets.check(f"{size}: peak memory (run) vs Trace_ELBO", ratio, "<=", 1.1)


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    C.set_threads(args.threads)
    if args.quick:
        args.batch_size, args.length, args.skip_full = 4, 8, True
    if args.memory_child:
        memory_child(args)
        return 0
    D.quiet_meanfield_warnings()
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.nn.modules.rnn")
    C.header("DMM: TraceMarkovKL_ELBO vs Trace_ELBO vs TraceMeanField_ELBO", args)
    start = time.perf_counter()
    targets = C.Targets()
    results: dict = {}
    for size in ("small",) if args.skip_full else ("small", "full"):
        run_config(size, args, targets, results)
    targets.print()
    print(f"total time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
