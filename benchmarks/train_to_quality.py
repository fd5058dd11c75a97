# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
Time to a given test NLL: the DMM example trained with each estimator, under equal settings.

Estimators (``--estimators``, comma-separated):

* ``markov-kl``: :class:`pyro_markov_kl.TraceMarkovKL_ELBO`, eager;
* ``markov-kl-jit``: :class:`pyro_markov_kl.JitTraceMarkovKL_ELBO` (``--jit``, bucketed);
* ``trace``: :class:`pyro.infer.Trace_ELBO`;
* ``meanfield``: :class:`pyro.infer.TraceMeanField_ELBO`.

Each (estimator, seed) run is ``python -m pyro_markov_kl.examples.dmm --elbo E --[no-]jit --seed S
-n EPOCHS --test-frequency K --no-checkpoint`` with the example's defaults for everything else (the
same for all estimators; arguments after ``--`` are passed on to every run), in this process, one
after the other. The test NLL bound per time slice (``-ELBO`` on the whole test set, one particle)
is evaluated every ``K`` epochs, with the training wall time so far (without the evaluations; with
the JIT's compilation). Each run writes ``RESULTS/<estimator>-seed<S>.json``; an existing file is
reused unless ``--force``, so that the runs can be split over several invocations (e.g. one
estimator per invocation, or per machine) and a last invocation with ``--combine-only`` reads them
all.

The report: the target is Trace_ELBO's final test NLL (the mean over its seeds of the bound
evaluated after its last epoch; ``--epochs`` should be a multiple of ``--eval-every``), over the
seeds where it learned more than a model without a latent state. Some seeds of every estimator
stay on the plateau of a DMM that ignores its latent state (about 11.1 nats per time slice on
JSB): a run whose final bound is no better than the best static model, independent Bernoulli
keys with the training set's frequencies (:func:`static_bernoulli_nll`, 11.06 on JSB's test
set), is reported as collapsed and left out of the target, whose mean it would otherwise set by
a plateau that every estimator reaches in a few epochs. For each
estimator and seed, the first evaluation at or below the target gives the epochs and the training
wall time to reach it; the table shows their mean and spread (min-max) over the seeds that reach
it, how many did, the final test NLL, the time per epoch, and the ratio of the mean wall time to
Trace_ELBO's own mean time to the target. With matplotlib, the curves of test NLL against training
time are saved as ``RESULTS/test_nll_vs_time.png`` (without it, a message says the PNG is skipped).

Target (PASS/MISS): time to Trace_ELBO's final test NLL <= 0.35x Trace_ELBO's, for
``markov-kl`` and ``markov-kl-jit``.

Wall times mean something only on an otherwise idle machine; the epochs to the target do not
depend on the load. A full run (4 estimators, 3 seeds, 120 epochs, the example's mini-batches by
length) takes about 45 minutes on one core (an eager epoch about 1.4 s, a compiled one about
0.75 s, plus the evaluations), or about 25 minutes in two invocations side by side on an idle
2-core machine, one process per core. Run for example::

    python benchmarks/train_to_quality.py --estimators trace --results R   # one piece
    python benchmarks/train_to_quality.py --estimators markov-kl,markov-kl-jit --results R
    python benchmarks/train_to_quality.py --estimators meanfield --results R
    python benchmarks/train_to_quality.py --combine-only --results R       # the report

``--quick`` is a smoke run (2 epochs on 20 sequences, 1 seed) whose numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402
import torch  # noqa: E402

ESTIMATORS = {
    "markov-kl": (["--elbo", "markov-kl", "--no-jit"], "TraceMarkovKL_ELBO"),
    "markov-kl-jit": (["--elbo", "markov-kl", "--jit"], "JitTraceMarkovKL_ELBO"),
    "trace": (["--elbo", "trace", "--no-jit"], "Trace_ELBO"),
    "meanfield": (["--elbo", "meanfield", "--no-jit"], "TraceMeanField_ELBO"),
}
REFERENCE = "trace"
OURS = ("markov-kl", "markov-kl-jit")
TARGET_RATIO = 0.35


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after -- go to every run of pyro_markov_kl.examples.dmm.",
    )
    C.add_common_args(p)
    p.add_argument(
        "--estimators",
        default=",".join(ESTIMATORS),
        help=f"comma-separated, of {', '.join(ESTIMATORS)}",
    )
    p.add_argument("--seeds", default="", help="comma-separated seeds (default: --num-seeds)")
    p.add_argument("--num-seeds", type=int, default=3, help="seeds --seed, --seed + 1, ...")
    p.add_argument("--epochs", type=int, default=120, help="training epochs of every run")
    p.add_argument("--eval-every", type=int, default=5, help="epochs between test evaluations")
    p.add_argument(
        "--results",
        default="train_to_quality_results",
        help="directory of the per-run JSON files and the PNG",
    )
    p.add_argument("--force", action="store_true", help="rerun runs whose JSON exists")
    p.add_argument(
        "--combine-only", action="store_true", help="run nothing: report the JSON files found"
    )
    return p


def static_bernoulli_nll(splits: Dict[str, Dict[str, Any]]) -> float:
    """
    The test NLL per time slice of the best model without a latent state: every key an
    independent Bernoulli with its frequency over the training time slices.
    """

    def slices(split: Dict[str, Any]) -> Any:
        x, lengths = split["sequences"], split["sequence_lengths"]
        return x[torch.arange(x.size(1)) < lengths[:, None]]

    p = slices(splits["train"]).mean(0).clamp(1e-6, 1 - 1e-6)
    x = slices(splits["test"])
    return float(-(x * p.log() + (1 - x) * (1 - p).log()).sum(-1).mean())


def collapsed(run: Dict[str, Any]) -> bool:
    """Whether the run ended no better than the best model without a latent state."""
    return final_nll(run) >= run["static_test_nll"]


def run_one(
    estimator: str, seed: int, args: argparse.Namespace, extra: List[str]
) -> Dict[str, Any]:
    """Train the DMM once with ``estimator`` and ``seed``; return what the report needs."""
    from pyro_markov_kl.examples.dmm import main as dmm_main

    argv = ESTIMATORS[estimator][0] + [
        "--seed",
        str(seed),
        "-n",
        str(args.epochs),
        "--test-frequency",
        str(args.eval_every),
        "--num-threads",
        str(args.threads),
        "--no-checkpoint",
    ]
    if args.quick:
        argv += ["--max-train-sequences", "20"]
    argv += extra
    print(f"--- {estimator}, seed {seed}: python -m pyro_markov_kl.examples.dmm {' '.join(argv)}")
    result = dmm_main(argv)
    curve = [
        {"epoch": e["epoch"], "seconds": e["seconds"], "test": e["test"]}
        for e in result["evaluations"]
    ]
    return {
        "estimator": estimator,
        "label": ESTIMATORS[estimator][1],
        "seed": seed,
        "argv": argv,
        "epochs": args.epochs,
        "curve": curve,
        "final_test_nll": result["test_nll_per_slice"],
        "seconds": result["seconds"],
        "jit_compile_seconds": result.get("jit_compile_seconds", 0.0),
        "jit_graphs": result.get("jit_graphs", 0),
        "load_average_at_start": os.getloadavg()[0],
        "static_test_nll": static_nll_of(argv),
    }


def static_nll_of(argv: List[str]) -> float:
    """:func:`static_bernoulli_nll` of the data set of a run's arguments."""
    from pyro_markov_kl.examples.dmm import load_splits

    return static_bernoulli_nll(
        load_splits(argv[argv.index("--data") + 1] if "--data" in argv else None)
    )


def _path(results: str, estimator: str, seed: int) -> str:
    return os.path.join(results, f"{estimator}-seed{seed}.json")


def load_results(results: str) -> Dict[str, List[Dict[str, Any]]]:
    """Every run JSON in ``results``, by estimator, sorted by seed."""
    out: Dict[str, List[Dict[str, Any]]] = {}
    if not os.path.isdir(results):
        return out
    for name in sorted(os.listdir(results)):
        if name.endswith(".json"):
            with open(os.path.join(results, name)) as f:
                run = json.load(f)
            if "static_test_nll" not in run:  # a file of an earlier version of this script
                run["static_test_nll"] = static_nll_of(run["argv"])
            out.setdefault(run["estimator"], []).append(run)
    for runs in out.values():
        runs.sort(key=lambda r: r["seed"])
    return out


def final_nll(run: Dict[str, Any]) -> float:
    """The test NLL of the last evaluation (after the last epoch), else of the final estimate."""
    if run["curve"] and run["curve"][-1]["epoch"] == run["epochs"]:
        return run["curve"][-1]["test"]
    return run["final_test_nll"]


def time_to(run: Dict[str, Any], target: float) -> Optional[Dict[str, float]]:
    """The first evaluation of ``run`` at or below ``target``: its epoch and wall time."""
    for point in run["curve"]:
        if point["test"] <= target:
            return {"epoch": point["epoch"], "seconds": point["seconds"]}
    return None


def _mean(xs: List[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _spread(xs: List[float], fmt: str) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(_mean(xs), fmt)} ({format(min(xs), fmt)}-{format(max(xs), fmt)})"


def report(results: str) -> int:
    runs = load_results(results)
    if REFERENCE not in runs:
        print(f"no {REFERENCE} runs in {results}: nothing to compare against")
        return 1
    static = runs[REFERENCE][0]["static_test_nll"]
    for rs in runs.values():
        for r in rs:
            if collapsed(r):
                print(
                    f"collapsed: {r['label']} seed {r['seed']} ended at {final_nll(r):.4f}, no "
                    f"better than the best model without a latent state ({static:.4f})"
                )
    learned = [r for r in runs[REFERENCE] if not collapsed(r)]
    if not learned:
        print("every Trace_ELBO run collapsed: no target")
        return 1
    ref_finals = [final_nll(r) for r in learned]
    target = _mean(ref_finals)
    epochs = sorted({r["epochs"] for rs in runs.values() for r in rs})
    print(
        f"target: Trace_ELBO's final test NLL per time slice {target:.4f} (mean over seeds "
        f"{[r['seed'] for r in learned]} after {epochs} epochs: "
        f"{', '.join(f'{x:.4f}' for x in ref_finals)})"
    )
    print()
    reached: Dict[str, List[Dict[str, float]]] = {}
    for est, rs in runs.items():
        reached[est] = [t for t in (time_to(r, target) for r in rs) if t is not None]
    ref_reached = [t for t in (time_to(r, target) for r in learned) if t is not None]
    ref_time = _mean([t["seconds"] for t in ref_reached])
    # the machine-independent part of the ratio: epochs, whatever an epoch costs
    ref_epochs = _mean([float(t["epoch"]) for t in ref_reached])
    rows = []
    order = [e for e in ESTIMATORS if e in runs] + [e for e in runs if e not in ESTIMATORS]
    for est in order:
        rs, ts = runs[est], reached[est]
        secs = [t["seconds"] for t in ts]
        epochs_to = [float(t["epoch"]) for t in ts]
        per_epoch = [r["seconds"] / r["epochs"] for r in rs if r["epochs"]]
        compile_s = [r["jit_compile_seconds"] for r in rs]
        rows.append(
            (
                rs[0]["label"],
                len(rs),
                f"{len(ts)}/{len(rs)}",
                str(sum(collapsed(r) for r in rs)),
                _spread(epochs_to, ".0f"),
                f"{_mean(epochs_to) / ref_epochs:.3f}" if epochs_to and ref_epochs > 0 else "-",
                _spread(secs, ".0f"),
                f"{_mean(secs) / ref_time:.3f}" if secs and ref_time > 0 else "-",
                _spread([final_nll(r) for r in rs], ".3f"),
                _spread(per_epoch, ".2f"),
                _spread(compile_s, ".0f") if any(compile_s) else "-",
            )
        )
    print("## Time to Trace_ELBO's final test NLL (mean (min-max) over the seeds that reach it)")
    print()
    C.table(
        (
            "estimator",
            "seeds",
            "reached",
            "collapsed",
            "epochs to target",
            "epochs vs Trace_ELBO",
            "wall s to target",
            "vs Trace_ELBO",
            "final test NLL",
            "s per epoch",
            "JIT compile s",
        ),
        rows,
    )
    loads = [r["load_average_at_start"] for rs in runs.values() for r in rs]
    print(
        f"(training wall time without evaluations, with compilation; load average at the start "
        f"of the runs {min(loads):.1f}-{max(loads):.1f}: times mean something only when idle)"
    )
    print()
    plot(runs, target, os.path.join(results, "test_nll_vs_time.png"))
    targets = C.Targets()
    for est in OURS:
        if est in runs:
            # over the runs that did not collapse; each of them must reach the target
            times = [time_to(r, target) for r in runs[est] if not collapsed(r)]
            secs = [t["seconds"] for t in times if t is not None]
            ratio = _mean(secs) / ref_time if times and len(secs) == len(times) else math.nan
            targets.check(
                f"{runs[est][0]['label']}: wall time to target / Trace_ELBO's",
                ratio,
                "<=",
                TARGET_RATIO,
                f"{ratio:.3f}x" if not math.isnan(ratio) else "not reached by every seed",
            )
    targets.print()
    return 0


def plot(runs: Dict[str, List[Dict[str, Any]]], target: float, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG of the curves (pip install matplotlib)")
        print()
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, rs in enumerate(runs.values()):
        for j, r in enumerate(rs):
            ax.plot(
                [p["seconds"] for p in r["curve"]],
                [p["test"] for p in r["curve"]],
                color=colours[i % len(colours)],
                alpha=0.8,
                label=r["label"] if j == 0 else None,
            )
    ax.axhline(target, color="grey", linestyle="--", label="Trace_ELBO's final test NLL")
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("test NLL bound per time slice (nats)")
    ax.set_title("DMM on JSB Chorales: test NLL against training time")
    finite = [p["test"] for rs in runs.values() for r in rs for p in r["curve"]]
    if finite:
        ax.set_ylim(min(finite) - 0.2, min(max(finite), target + 4))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"curves saved to {path}")
    print()


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        k = argv.index("--")
        argv, extra = argv[:k], argv[k + 1 :]
    args = make_parser().parse_args(argv)
    C.set_threads(args.threads)
    if args.quick:
        args.epochs, args.eval_every, args.num_seeds = 2, 1, 1
    estimators = [e for e in args.estimators.split(",") if e]
    unknown = [e for e in estimators if e not in ESTIMATORS]
    if unknown:
        print(f"unknown estimators {unknown}; expected some of {list(ESTIMATORS)}")
        return 2
    seeds = (
        [int(s) for s in args.seeds.split(",") if s]
        if args.seeds
        else [args.seed + k for k in range(args.num_seeds)]
    )
    C.header("DMM on JSB Chorales: time to Trace_ELBO's final test NLL", args)
    if not args.combine_only:
        os.makedirs(args.results, exist_ok=True)
        warnings.filterwarnings("ignore", message="Failed to verify mean field restriction")
        for seed in seeds:  # seed by seed, so that a partial run compares like with like
            for est in estimators:
                path = _path(args.results, est, seed)
                if os.path.exists(path) and not args.force:
                    print(f"--- {est}, seed {seed}: {path} exists, reused (--force to rerun)")
                    continue
                run = run_one(est, seed, args, extra)
                tmp = path + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(run, f, indent=1)
                os.replace(tmp, path)
        print()
    return report(args.results)


if __name__ == "__main__":
    sys.exit(main())
