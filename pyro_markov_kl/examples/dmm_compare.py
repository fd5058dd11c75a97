# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

r"""
Train the Deep Markov Model with several ELBO estimators and compare their training curves.

Each estimator named in ``--elbos`` (``markov-kl``, ``trace``, ``meanfield``, as in
:mod:`pyro_markov_kl.examples.dmm`) trains the same DMM from the same initialisation (same seed)
on the same mini-batches in the same order, for the same number of epochs, with the optimiser
and KL annealing of :mod:`pyro_markov_kl.examples.dmm`. After every epoch (and at
initialisation, epoch 0) the script records

* ``train_loss_per_slice``: the training loss of the epoch, :math:`-\mathrm{ELBO}` per time
  slice summed over its mini-batches, as estimated by the training estimator (during the KL
  annealing epochs it is the annealed objective, see ``annealing_factor``);
* ``valid_nll_per_slice`` and ``test_nll_per_slice``: the NLL bound :math:`-\mathrm{ELBO}` per
  time slice on the whole validation and test sets, estimated by one common estimator
  (``--eval-elbo``, :class:`~pyro.infer.Trace_ELBO` by default, unbiased for any guide), so
  that the curves are comparable even when a training estimator is biased
  (:class:`~pyro.infer.TraceMeanField_ELBO` with the backward guide);
* with ``--compare``, the gradient variance of every estimator at the current parameters of
  each trained model, on one fixed training mini-batch
  (:func:`pyro_markov_kl.compare.compare_elbos`), which shows why one estimator trains better.

The curves go to ``DIR/dmm_compare_<guide>.csv`` (one row per estimator and epoch) and, with
matplotlib installed, ``DIR/dmm_compare_<guide>.png`` (``--out DIR``, default ``outputs/``).
All the options of :mod:`pyro_markov_kl.examples.dmm` are accepted, except ``--elbo``; the
defaults are small (5 epochs) so that the three estimators train in a few minutes on two CPU
cores.

Usage::

    python -m pyro_markov_kl.examples.dmm_compare
    python -m pyro_markov_kl.examples.dmm_compare --guide backward --compare --out outputs/
"""

import argparse
import csv
import math
import os
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence

import pyro
import torch
from pyro.infer import SVI

from pyro_markov_kl.compare import compare_elbos
from pyro_markov_kl.data import get_mini_batch, load_jsb_chorales
from pyro_markov_kl.examples.dmm import (
    DMM,
    ELBO_NAMES,
    annealing_factor,
    build_dmm,
    build_elbo,
    build_optim,
    nll_per_slice,
    reject_options,
)
from pyro_markov_kl.examples.dmm import make_parser as dmm_parser

__all__ = ["CSV_COLUMNS", "main", "make_parser", "plot_curves", "train_with_elbo"]

#: The columns of the CSV, before the ``grad_var[<estimator>]`` columns of ``--compare``.
CSV_COLUMNS = (
    "elbo",
    "guide",
    "epoch",
    "annealing_factor",
    "train_loss_per_slice",
    "valid_nll_per_slice",
    "test_nll_per_slice",
    "seconds",
)


def make_parser() -> argparse.ArgumentParser:
    """
    The command-line interface of :func:`main`: the options of
    :func:`pyro_markov_kl.examples.dmm.make_parser` (but ``--elbo``) and this script's own.

    :rtype: argparse.ArgumentParser
    """
    parser = argparse.ArgumentParser(
        prog="python -m pyro_markov_kl.examples.dmm_compare",
        description=(
            "Train the Deep Markov Model on the JSB Chorales with several ELBO estimators (same "
            "seed, data and epochs) and write the training curves (train loss, validation and "
            "test NLL bounds per time slice, and with --compare the gradient variance of each "
            "estimator) to a CSV and a PNG."
        ),
        parents=[dmm_parser()],
        conflict_handler="resolve",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--elbo", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--elbos",
        default=",".join(ELBO_NAMES),
        help=f"comma-separated training estimators among {', '.join(ELBO_NAMES)}",
    )
    parser.add_argument(
        "--eval-elbo",
        choices=ELBO_NAMES + ("same",),
        default="trace",
        help="estimator of the validation and test NLL bounds (same: each training estimator)",
    )
    parser.add_argument(
        "--test-frequency",
        type=int,
        default=1,
        help="evaluate (validation and test bounds, --compare) every this many epochs, and at "
        "epochs 0 and the last (0: only at epochs 0 and the last)",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="at each evaluation, also compute every estimator's gradient variance at the "
        "current parameters on one fixed training mini-batch (pyro_markov_kl.compare)",
    )
    parser.add_argument(
        "--compare-draws", type=int, default=10, help="draws per estimator of --compare"
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=0,
        help="cut every sequence (train, validation, test) to its first N time steps, for quick "
        "runs (0: whole sequences)",
    )
    parser.add_argument(
        "--out", default="outputs", metavar="DIR", help="directory of the CSV and the PNG"
    )
    # the settings the tutorial's committed curves were produced with
    parser.set_defaults(num_epochs=5, annealing_epochs=1, learning_rate=0.003)
    # options of the DMM script that this one does not implement (it refuses other values)
    # buckets: None, so that any --buckets is refused (they do not pad mini-batches)
    parser.set_defaults(jit=False, checkpoint=None, batching="random", buckets=None)
    return parser


def _nll_per_slice(elbo: Any, dmm: DMM, split: Dict[str, torch.Tensor]) -> float:
    return nll_per_slice(elbo, dmm, split["sequences"], split["sequence_lengths"])


def train_with_elbo(
    args: argparse.Namespace, elbo_name: str, data: Optional[Dict[str, Any]] = None
) -> List[Dict[str, Any]]:
    """
    Train the DMM with one estimator and return its training curve.

    The initialisation (``pyro.set_rng_seed(args.seed)``) and the order of the mini-batches (a
    :class:`torch.Generator` seeded with ``args.seed``, independent of the estimator's own random
    draws) are the same for every estimator.

    :param argparse.Namespace args: the parsed options of :func:`make_parser`.
    :param str elbo_name: the training estimator, one of
        :data:`pyro_markov_kl.examples.dmm.ELBO_NAMES`.
    :param dict data: ``{"train": ..., "valid": ..., "test": ...}`` splits of
        :func:`pyro_markov_kl.data.load_jsb_chorales` (loaded if ``None``: the training split
        cut to ``args.max_train_sequences`` sequences, every split to ``args.max_steps`` steps).
    :return: one dict per evaluated epoch, with the keys :data:`CSV_COLUMNS` (and
        ``grad_var[<estimator>]`` with ``args.compare``); missing values are NaN.
    :rtype: list
    """
    data = _load_data(args) if data is None else data
    train = data["train"]
    sequences, lengths = train["sequences"], train["sequence_lengths"]
    num_train = len(lengths)
    num_train_slices = float(lengths.sum())
    num_mini_batches = math.ceil(num_train / args.batch_size)

    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    dmm = build_dmm(args)
    optim = build_optim(args)
    vectorize = args.vectorize_particles
    elbo = build_elbo(elbo_name, num_particles=args.num_particles, vectorize_particles=vectorize)
    eval_name = elbo_name if args.eval_elbo == "same" else args.eval_elbo
    eval_elbo = build_elbo(
        eval_name, num_particles=args.test_particles, vectorize_particles=vectorize
    )
    svi = SVI(dmm.model, dmm.guide, optim, loss=elbo)
    order = torch.Generator().manual_seed(args.seed)
    compare_names = _elbo_names(args.elbos)
    compare_batch = None
    estimators: Dict[str, Any] = {}
    if args.compare:
        pick = torch.Generator().manual_seed(args.seed + 1)
        indices = torch.randperm(num_train, generator=pick)[: args.batch_size]
        compare_batch = get_mini_batch(indices, sequences, lengths)
        # one instance per estimator, so that TraceMarkovKL_ELBO analyses the batch only once
        estimators = {
            name: build_elbo(name, vectorize_particles=vectorize) for name in compare_names
        }

    def record(epoch: int, factor: float, train_loss: float, seconds: float) -> Dict[str, Any]:
        row: Dict[str, Any] = {
            "elbo": elbo_name,
            "guide": args.guide,
            "epoch": epoch,
            "annealing_factor": factor,
            "train_loss_per_slice": train_loss,
            "valid_nll_per_slice": math.nan,
            "test_nll_per_slice": math.nan,
            "seconds": seconds,
        }
        last = epoch == args.num_epochs
        due = args.test_frequency > 0 and epoch % args.test_frequency == 0
        if epoch == 0 or last or due:
            row["valid_nll_per_slice"] = _nll_per_slice(eval_elbo, dmm, data["valid"])
            row["test_nll_per_slice"] = _nll_per_slice(eval_elbo, dmm, data["test"])
            if compare_batch is not None:
                table = compare_elbos(
                    dmm.model,
                    dmm.guide,
                    *compare_batch,
                    1.0,
                    elbos=estimators,
                    num_draws=args.compare_draws,
                )
                for r in table.to_dicts():
                    row[f"grad_var[{r['name']}]"] = r["grad_var"]
        elif compare_batch is not None:
            for name in compare_names:
                row[f"grad_var[{name}]"] = math.nan
        return row

    rows = [record(0, math.nan, math.nan, 0.0)]
    for epoch in range(args.num_epochs):
        start = time.perf_counter()
        epoch_loss = 0.0
        factor = 1.0
        shuffled = torch.randperm(num_train, generator=order)
        for which in range(num_mini_batches):
            factor = annealing_factor(
                epoch,
                which,
                num_mini_batches,
                args.annealing_epochs,
                args.minimum_annealing_factor,
            )
            indices = shuffled[which * args.batch_size : (which + 1) * args.batch_size]
            batch = get_mini_batch(indices, sequences, lengths)
            epoch_loss += svi.step(*batch, factor)
        seconds = time.perf_counter() - start
        row = record(epoch + 1, factor, epoch_loss / num_train_slices, seconds)
        rows.append(row)
        print(
            f"[{elbo_name:>9s} epoch {epoch + 1:3d}] train loss per time slice "
            f"{row['train_loss_per_slice']:.4f}  valid {row['valid_nll_per_slice']:.4f}  "
            f"test {row['test_nll_per_slice']:.4f}  ({seconds:.1f} s)",
            flush=True,
        )
    return rows


def _elbo_names(spec: str) -> List[str]:
    names = []
    for name in spec.split(","):
        name = name.strip()
        if name and name not in names:
            names.append(name)
    return names


def _cut(split: Dict[str, torch.Tensor], num_sequences: Optional[int], max_steps: int) -> dict:
    sequences, lengths = split["sequences"], split["sequence_lengths"]
    if num_sequences is not None:
        sequences, lengths = sequences[:num_sequences], lengths[:num_sequences]
    if max_steps > 0:
        lengths = lengths.clamp(max=max_steps)
    return {"sequences": sequences[:, : int(lengths.max())], "sequence_lengths": lengths}


def _load_data(args: argparse.Namespace) -> Dict[str, Any]:
    steps = args.max_steps
    return {
        "train": _cut(load_jsb_chorales("train"), args.max_train_sequences, steps),
        "valid": _cut(load_jsb_chorales("valid"), None, steps),
        "test": _cut(load_jsb_chorales("test"), None, steps),
    }


def _write_csv(path: str, rows: Sequence[Dict[str, Any]]) -> None:
    columns = list(CSV_COLUMNS)
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="nan")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})


def plot_curves(rows: Sequence[Dict[str, Any]], path: str) -> None:
    """
    Plot training curves: the training loss and the validation and test NLL bounds per time
    slice against the epoch, one line per training estimator, and, if the rows hold
    ``grad_var[...]`` columns, the gradient variance of each estimator (line style) at each
    trained model's parameters (colour), on a log scale.

    :param rows: the rows of :func:`train_with_elbo` for one or more estimators.
    :param str path: where to save the figure.
    :raises ImportError: if matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plotting needs matplotlib; install it with pip install 'pyro-markov-kl[plot]'"
        ) from e
    trained = _elbo_names(",".join(row["elbo"] for row in rows))
    grad_keys = sorted({k for row in rows for k in row if k.startswith("grad_var[")})
    panels = [
        ("train_loss_per_slice", "train loss per time slice (-ELBO)"),
        ("valid_nll_per_slice", "validation NLL bound per time slice"),
        ("test_nll_per_slice", "test NLL bound per time slice"),
    ]
    num = len(panels) + (1 if grad_keys else 0)
    fig = Figure(figsize=(4.2 * num, 4.0))
    axes = fig.subplots(1, num, squeeze=False)[0]
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "v", "D"]
    for i, name in enumerate(trained):
        mine = [row for row in rows if row["elbo"] == name]
        epochs = [row["epoch"] for row in mine]
        for ax, (key, title) in zip(axes, panels):
            points = [(e, r[key]) for e, r in zip(epochs, mine) if math.isfinite(r[key])]
            if points:
                # decreasing marker sizes and dashes keep identical curves visible
                ax.plot(
                    *zip(*points),
                    marker=markers[i % len(markers)],
                    markersize=max(8 - 2 * i, 3),
                    linestyle=styles[i % len(styles)],
                    color=f"C{i % 10}",
                    label=name,
                )
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("epoch")
        if grad_keys:
            ax = axes[-1]
            for j, key in enumerate(grad_keys):
                points = [(e, r.get(key, math.nan)) for e, r in zip(epochs, mine)]
                points = [(e, v) for e, v in points if math.isfinite(v) and v > 0]
                if points:
                    ax.plot(
                        *zip(*points),
                        marker=".",
                        color=f"C{i % 10}",
                        linestyle=styles[j % len(styles)],
                        label=f"{key[len('grad_var[') : -1]} @ {name}",
                    )
            ax.set_yscale("log")
            ax.set_title("gradient variance (estimator @ trained by)", fontsize=10)
            ax.set_xlabel("epoch")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6 if ax is axes[-1] and grad_keys else 7)
    guides = sorted({row["guide"] for row in rows})
    fig.suptitle(f"DMM on JSB Chorales, {'/'.join(guides)} guide", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """
    Train the DMM with each estimator of ``--elbos`` and write the curves.

    :param argv: command-line arguments (see ``--help``); ``None`` reads :data:`sys.argv`.
    :return: a dict with ``"rows"`` (the rows of every estimator, see :func:`train_with_elbo`),
        ``"csv"`` and ``"png"`` (the paths written; ``"png"`` is ``None`` without matplotlib).
    :rtype: dict
    """
    parser = make_parser()
    args = parser.parse_args(argv)
    reject_options(parser, args, "dmm_compare")
    if args.elbo is not None:
        parser.error("use --elbos (comma-separated) to choose the estimators")
    names = _elbo_names(args.elbos)
    unknown = [n for n in names if n not in ELBO_NAMES]
    if unknown or not names:
        parser.error(f"unknown --elbos {unknown or args.elbos!r}; choose among {ELBO_NAMES}")
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    data = _load_data(args)
    train_lengths = data["train"]["sequence_lengths"]
    print(
        f"DMM on JSB Chorales, guide={args.guide}: training with {', '.join(names)} for "
        f"{args.num_epochs} epochs each on {len(train_lengths)} sequences "
        f"({int(train_lengths.sum())} time slices); evaluation by "
        f"{args.eval_elbo if args.eval_elbo != 'same' else 'each training estimator'}",
        flush=True,
    )
    rows: List[Dict[str, Any]] = []
    with warnings.catch_warnings():
        if args.guide == "backward":
            # TraceMeanField_ELBO warns at every step that the guide's order is not the model's
            warnings.filterwarnings("ignore", message="Failed to verify mean field restriction")
        for name in names:
            rows.extend(train_with_elbo(args, name, data))

    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, f"dmm_compare_{args.guide}.csv")
    _write_csv(csv_path, rows)
    png_path: Optional[str] = os.path.join(args.out, f"dmm_compare_{args.guide}.png")
    try:
        plot_curves(rows, png_path)
    except ImportError as e:
        print(f"no figure: {e}", flush=True)
        png_path = None

    print("\nfinal epoch (NLL bounds per time slice):", flush=True)
    print(f"{'elbo':<10} {'train loss':>10} {'valid':>8} {'test':>8} {'s/epoch':>8}", flush=True)
    for name in names:
        mine = [row for row in rows if row["elbo"] == name]
        last = mine[-1]
        per_epoch = sum(r["seconds"] for r in mine) / max(len(mine) - 1, 1)
        print(
            f"{name:<10} {last['train_loss_per_slice']:>10.4f} "
            f"{last['valid_nll_per_slice']:>8.4f} {last['test_nll_per_slice']:>8.4f} "
            f"{per_epoch:>8.1f}",
            flush=True,
        )
    print(f"curves written to {csv_path}" + (f" and {png_path}" if png_path else ""), flush=True)
    return {"rows": rows, "csv": csv_path, "png": png_path}


if __name__ == "__main__":
    main()
