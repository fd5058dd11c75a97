# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
Compare ELBO estimators on the Deep Markov Model at fixed parameters.

Runs :func:`pyro_markov_kl.compare.compare_elbos` on the DMM of
:mod:`pyro_markov_kl.examples.dmm` on one JSB Chorales mini-batch, at initialisation or after
``--train-steps`` steps of training with :class:`~pyro_markov_kl.TraceMarkovKL_ELBO`, prints the
table (ELBO mean and standard error, gradient variance in total and per module, step time, and
whether each estimator is valid for the guide: ``TraceMeanField_ELBO`` is marked biased, with
its sites, for the backward guide) and optionally saves a figure. Where
:mod:`pyro_markov_kl.examples.dmm_compare` trains with each estimator and compares the training
curves, this script compares the estimators at the same parameters.

Usage::

    python -m pyro_markov_kl.examples.dmm_gradient_variance
    python -m pyro_markov_kl.examples.dmm_gradient_variance --guide backward --plot compare.png
"""

import argparse
import math
import time
import warnings
from collections import OrderedDict
from typing import Optional, Sequence

import pyro
import torch
from pyro.infer import SVI, TraceGraph_ELBO
from pyro.infer.elbo import ELBO
from pyro.optim import ClippedAdam

from pyro_markov_kl import TraceMarkovKL_ELBO
from pyro_markov_kl.compare import ELBOComparison, compare_elbos
from pyro_markov_kl.data import get_mini_batch, load_jsb_chorales
from pyro_markov_kl.examples.dmm import DMM, build_elbo

__all__ = ["main", "make_parser"]

_ELBO_CHOICES = ("markov-kl", "trace", "meanfield", "tracegraph")
_FULL_SIZE = {
    "z_dim": 100,
    "emission_dim": 100,
    "transition_dim": 200,
    "rnn_dim": 600,
    "rnn_nonlinearity": "relu",
    "batch_size": 20,
    "max_steps": 0,
}


def make_parser() -> argparse.ArgumentParser:
    """
    The command-line interface of :func:`main`.

    :rtype: argparse.ArgumentParser
    """
    parser = argparse.ArgumentParser(
        prog="python -m pyro_markov_kl.examples.dmm_gradient_variance",
        description=(
            "Compare ELBO estimators (ELBO mean and standard error, gradient variance in total "
            "and per module, step time) on the Deep Markov Model of "
            "pyro_markov_kl.examples.dmm, on one JSB Chorales mini-batch, at fixed parameters. "
            "The defaults are small (under a minute on one CPU core); --full-size uses Pyro's "
            "full DMM on whole sequences."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--elbos",
        default="markov-kl,trace,meanfield",
        help=f"comma-separated estimators among {', '.join(_ELBO_CHOICES)}",
    )
    parser.add_argument("--guide", choices=("forward", "backward"), default="forward")
    parser.add_argument("--num-draws", type=int, default=20, help="independent draws per ELBO")
    parser.add_argument(
        "--num-particles", type=int, default=1, help="samples per ELBO estimate (per draw)"
    )
    parser.add_argument(
        "--plot", metavar="PATH", default=None, help="save a figure of the comparison there"
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=0,
        help="first train this many SVI steps with TraceMarkovKL_ELBO (ClippedAdam, the DMM "
        "example's settings) on random mini-batches of the same size and length",
    )
    parser.add_argument(
        "--learning-rate", type=float, default=0.003, help="step size of --train-steps"
    )
    parser.add_argument("--split", choices=("train", "valid", "test"), default="train")
    parser.add_argument("-b", "--batch-size", type=int, default=10, help="sequences per batch")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=40,
        help="cut the sequences to their first N time steps (0: whole sequences)",
    )
    parser.add_argument(
        "--annealing-factor", type=float, default=1.0, help="KL annealing factor of the latents"
    )
    parser.add_argument("--z-dim", type=int, default=16, help="latent dimension (full: 100)")
    parser.add_argument("--emission-dim", type=int, default=32, help="emitter hidden (full: 100)")
    parser.add_argument(
        "--transition-dim", type=int, default=64, help="transition hidden (full: 200)"
    )
    parser.add_argument("--rnn-dim", type=int, default=64, help="guide RNN hidden (full: 600)")
    parser.add_argument(
        "--rnn-nonlinearity", choices=("tanh", "relu"), default="tanh", help="(full: relu)"
    )
    parser.add_argument(
        "--full-size",
        action="store_true",
        help="Pyro's full-size DMM (z 100, emission 100, transition 200, RNN 600 relu) on "
        "mini-batches of 20 whole sequences; overrides the size flags",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--num-threads", type=int, default=1, help="torch threads (0: leave torch's default)"
    )
    return parser


def _build_named_elbo(name: str, num_particles: int) -> ELBO:
    if name == "tracegraph":
        return TraceGraph_ELBO(num_particles=num_particles, max_plate_nesting=1)
    return build_elbo(name, num_particles=num_particles)


def _jsb_batch(
    sequences: torch.Tensor, lengths: torch.Tensor, indices: torch.Tensor, max_steps: int
) -> tuple:
    if max_steps > 0:
        lengths = lengths.clamp(max=max_steps)
        sequences = sequences[:, :max_steps]
    return get_mini_batch(indices, sequences, lengths)


def main(argv: Optional[Sequence[str]] = None) -> ELBOComparison:
    """
    Compare ELBO estimators on the DMM of :mod:`pyro_markov_kl.examples.dmm` on a JSB Chorales
    mini-batch, print the table and optionally save a figure.

    :param argv: command-line arguments (see ``--help``); ``None`` reads :data:`sys.argv`.
    :return: the comparison.
    :rtype: pyro_markov_kl.compare.ELBOComparison
    """
    args = make_parser().parse_args(argv)
    if args.full_size:
        for key, value in _FULL_SIZE.items():
            setattr(args, key, value)
    names = [n.strip() for n in args.elbos.split(",") if n.strip()]
    unknown = [n for n in names if n not in _ELBO_CHOICES]
    if unknown or not names:
        raise SystemExit(f"unknown --elbos {unknown or args.elbos!r}; choose among {_ELBO_CHOICES}")
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)

    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    data = load_jsb_chorales(args.split)
    sequences, lengths = data["sequences"], data["sequence_lengths"]
    num_sequences = len(lengths)
    generator = torch.Generator().manual_seed(args.seed)
    batch_size = min(args.batch_size, num_sequences)
    indices = torch.randperm(num_sequences, generator=generator)[:batch_size]
    batch = _jsb_batch(sequences, lengths, indices, args.max_steps)

    dmm = DMM(
        z_dim=args.z_dim,
        emission_dim=args.emission_dim,
        transition_dim=args.transition_dim,
        rnn_dim=args.rnn_dim,
        guide=args.guide,
        rnn_nonlinearity=args.rnn_nonlinearity,
    )
    print(
        f"DMM guide={args.guide} z_dim={args.z_dim} emission_dim={args.emission_dim} "
        f"transition_dim={args.transition_dim} rnn_dim={args.rnn_dim}; {args.split} mini-batch "
        f"of {batch_size} sequences, {int(batch[3].sum())} time slices (T={batch[0].size(1)})",
        flush=True,
    )
    with warnings.catch_warnings():
        if args.guide == "backward":
            # TraceMeanField_ELBO warns that the guide's site order is not the model's
            warnings.filterwarnings("ignore", message="Failed to verify mean field restriction")
        if args.train_steps > 0:
            optim = ClippedAdam(
                {
                    "lr": args.learning_rate,
                    "betas": (0.96, 0.999),
                    "clip_norm": 10.0,
                    "lrd": 0.99996,
                    "weight_decay": 2.0,
                }
            )
            svi = SVI(dmm.model, dmm.guide, optim, TraceMarkovKL_ELBO(max_plate_nesting=1))
            start = time.perf_counter()
            loss = math.nan
            for _ in range(args.train_steps):
                train_indices = torch.randperm(num_sequences, generator=generator)[:batch_size]
                train_batch = _jsb_batch(sequences, lengths, train_indices, args.max_steps)
                loss = svi.step(*train_batch, args.annealing_factor)
            print(
                f"trained {args.train_steps} steps with TraceMarkovKL_ELBO in "
                f"{time.perf_counter() - start:.1f} s (last loss per time slice "
                f"{loss / float(train_batch[3].sum()):.4f})",
                flush=True,
            )
        elbos = OrderedDict()
        for name in names:
            elbo = _build_named_elbo(name, args.num_particles)
            elbos[type(elbo).__name__] = elbo
        table = compare_elbos(
            dmm.model,
            dmm.guide,
            *batch,
            args.annealing_factor,
            elbos=elbos,
            num_draws=args.num_draws,
        )
    print(table, flush=True)
    if args.plot:
        table.plot(args.plot)
        print(f"figure saved to {args.plot}", flush=True)
    return table


if __name__ == "__main__":
    main()
