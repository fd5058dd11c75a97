# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

r"""
Data-parallel training of the Deep Markov Model on :mod:`torch.distributed` (CPU, gloo).

Every process (*rank*) holds a replica of :class:`~pyro_markov_kl.examples.dmm.DMM` and takes a
shard of every mini-batch. All ranks draw the same global mini-batch order from a shared seed,
split each global mini-batch ``B`` into ``W`` contiguous shards ``S_0, ..., S_{W-1}`` (sizes
differing by at most one, :func:`shard_indices`), and evaluate the ELBO of their own shard
through Pyro's :class:`~pyro.infer.elbo.ELBOModule`, ``TraceMarkovKL_ELBO()(dmm.model,
dmm.guide)``, inside :class:`torch.nn.parallel.DistributedDataParallel` (DDP). DDP all-reduces
the gradients during ``backward``, so each rank then takes the same optimiser step and the
replicas stay identical. Run it with either launcher::

    torchrun --nproc_per_node 2 -m pyro_markov_kl.examples.dmm_distributed [dmm flags]
    python -m pyro_markov_kl.examples.dmm_distributed --nproc 2 [dmm flags]

The second form spawns the workers itself (:func:`torch.multiprocessing.spawn`) on
``127.0.0.1`` with a free port. Without ``--nproc`` and outside ``torchrun`` the script trains in
one process, without DDP. Every flag of :mod:`pyro_markov_kl.examples.dmm` is accepted, with the
same meaning; ``-b`` is the *global* mini-batch size.

**Loss scaling.** Without subsampling, the DMM's plate ``z_minibatch`` has scale 1, so the
single-process loss of a mini-batch is a *sum* over its sequences,

.. math::

    L(B) = \sum_{n \in B} \ell_n, \qquad
    \nabla L(B) = \sum_{r=0}^{W-1} \sum_{n \in S_r} \nabla \ell_n
                = \sum_{r=0}^{W-1} \nabla L(S_r),

where :math:`\ell_n` is the negative ELBO estimate of sequence :math:`n` (with the KL annealing
factor applied inside it, and averaged over ``num_particles`` inside each rank). If rank
:math:`r` back-propagates :math:`c_r L(S_r)`, DDP hands every rank the *average*

.. math::

    \bar g = \frac{1}{W} \sum_{r=0}^{W-1} c_r \nabla L(S_r).

For :math:`\bar g = \nabla L(B)` whatever the per-shard gradients, :math:`c_r = W` on every
rank, *independently of the shard sizes* :math:`|S_r|`. The familiar factor
:math:`W |S_r| / |B|` is the one for a loss that is a *mean* over the shard,
:math:`L(S_r) / |S_r|`, and would give the gradient of the mean :math:`L(B) / |B|`, not of the
sum that the single-process example optimises (and that its step size and weight decay are
tuned for). A rank whose shard is empty (a global mini-batch smaller than ``W``) still has to
join the all-reduce: it evaluates the first sequence of the global mini-batch with
:math:`c_r = 0` and contributes a zero gradient. The reported training loss is the sum of the
unscaled shard losses over the ranks, which is :math:`L(B)`.

The equality is exact for every draw of the guide's noise when each sequence sees the same
noise in both runs (``--fixed-noise``, below): this is what ``tests/test_distributed.py``
checks, to ``1e-5``. In normal training each rank samples from its own random stream (seeded by
``--seed`` and the rank), so the per-sequence noises are independent, as in one process, and
the distributed gradient estimate has the same distribution as the single-process one.

**Fixed noise.** ``--fixed-noise`` reparameterises every guide site ``z_t`` of sequence ``n`` at
training step ``s`` as ``loc + scale * eps[n, s, t]``, where ``eps[n, s]`` is a ``(T_data,
z_dim)`` standard normal block drawn from a generator seeded by ``(seed, s, n)`` alone
(:func:`sequence_noise`). A sequence therefore gets the same noise whichever shard, rank,
mini-batch composition or padded length it is evaluated with, which makes distributed and
single-process runs comparable sample for sample. It is implemented as a Pyro handler
(:class:`FixedNoiseMessenger`) around the guide only, setting each site's value before it is
sampled; the value is exactly what ``Normal.rsample`` computes, so gradients flow through
``loc`` and ``scale`` as usual, and
:class:`~pyro_markov_kl.trace_markov_kl_elbo.TraceMarkovKL_ELBO`'s dependency analysis (which
replays the guide's recorded values) is unaffected. It is meant for checks, not for training
quality, and needs ``--num-particles 1``.

**What the other pieces do.** The DMM's parameters reach DDP through :class:`DMMLoss`, a small
:class:`~torch.nn.Module` that holds the DMM and the ``ELBOModule`` (whose ``model`` and
``guide`` are bound methods, so the ``ELBOModule`` alone has no parameters). ``pyro.module``
inside the model and guide still registers the same tensors in each process's param store;
nothing reads them from there. The optimiser is :class:`torch.optim.Adam` on the DDP module's
parameters with ``--weight-decay`` as its L2 penalty, element-wise gradient clipping at
``--clip-norm`` (:func:`torch.nn.utils.clip_grad_value_`) and an exponential step-size decay of
``--lr-decay`` per step: Pyro's ``ClippedAdam`` of :mod:`pyro_markov_kl.examples.dmm` up to
where Adam's ``eps`` enters and whether the first step is already decayed. Clipping acts on the
all-reduced, identical gradients, so the ranks stay in step. Each rank's
:class:`~pyro_markov_kl.trace_markov_kl_elbo.TraceMarkovKL_ELBO` caches its own plans
(``elbo.plan_cache``), one per trace structure; shards of one mini-batch have different lengths, so
ranks may build different plans, which involves no communication. The per-epoch training loss is
all-reduced and printed by rank 0 only; the validation/test NLL bounds are computed on shards of
those sets and all-reduced likewise.
"""

import argparse
import json
import math
import os
import re
import socket
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyro
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.infer.elbo import ELBO
from pyro.poutine.messenger import Messenger
from torch.nn.parallel import DistributedDataParallel

from pyro_markov_kl.data import get_mini_batch, load_jsb_chorales
from pyro_markov_kl.examples.dmm import (
    DMM,
    annealing_factor,
    build_dmm,
    build_elbo,
    load_train_split,
    reject_options,
)
from pyro_markov_kl.examples.dmm import make_parser as make_dmm_parser

__all__ = [
    "DMMLoss",
    "FixedNoiseMessenger",
    "find_free_port",
    "loopback_interface",
    "loss_scale",
    "main",
    "make_parser",
    "sequence_noise",
    "shard_indices",
    "shard_loss",
    "sorted_batch_indices",
    "train",
]

_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


# --- sharding and scaling -------------------------------------------------------------------------
def shard_indices(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """
    The shard of a global mini-batch that ``rank`` evaluates.

    :param torch.Tensor indices: the ``(B,)`` sequence indices of the global mini-batch, in the
        same order on every rank.
    :param int rank: this process's rank.
    :param int world_size: the number of processes.
    :return: the ``rank``-th of ``world_size`` contiguous pieces of ``indices`` (their sizes
        differ by at most one; some are empty if ``B < world_size``).
    :rtype: torch.Tensor
    """
    return torch.tensor_split(indices, world_size)[rank]


def loss_scale(world_size: int) -> float:
    """
    The factor each rank multiplies its (summed) shard loss by, so that DDP's gradient average
    is the gradient of the summed loss of the whole mini-batch: ``world_size``, whatever the
    shard sizes (see the module docstring for the derivation).

    :param int world_size: the number of processes.
    :rtype: float
    """
    return float(world_size)


def sorted_batch_indices(indices: torch.Tensor, seq_lengths: torch.Tensor) -> torch.Tensor:
    """
    The sequence indices in the row order of :func:`pyro_markov_kl.data.get_mini_batch`, which
    sorts a mini-batch by length, longest first (stable).

    :param torch.Tensor indices: ``(B,)`` indices into the data set.
    :param torch.Tensor seq_lengths: the ``(N,)`` lengths of the data set.
    :return: the ``(B,)`` indices of the rows of the prepared mini-batch.
    :rtype: torch.Tensor
    """
    indices = torch.as_tensor(indices, dtype=torch.long)
    _, order = torch.sort(seq_lengths[indices], descending=True, stable=True)
    return indices[order]


# --- fixed per-sequence noise ---------------------------------------------------------------------
def _noise_generator(seed: int, step: int, index: int) -> torch.Generator:
    entropy = np.random.SeedSequence([seed, step, index]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(entropy[0]) & 0x7FFF_FFFF_FFFF_FFFF)


def sequence_noise(
    sorted_indices: torch.Tensor,
    num_steps: int,
    t_max: int,
    z_dim: int,
    seed: int,
    step: int,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """
    Standard normal noise for the guide, a function of ``(seed, step, sequence index)`` only.

    Each sequence's ``(num_steps, z_dim)`` block is drawn in full from its own generator and then
    cut to ``t_max`` steps, so its first steps do not depend on the padded length of the
    mini-batch it is in.

    :param torch.Tensor sorted_indices: the ``(B,)`` sequence indices, in mini-batch row order
        (:func:`sorted_batch_indices`).
    :param int num_steps: the padded length of the whole data set (the same in every run).
    :param int t_max: the padded length of this mini-batch, at most ``num_steps``.
    :param int z_dim: the latent dimension.
    :param int seed: a non-negative seed.
    :param int step: the training step (non-negative), so that the noise changes between steps.
    :param dtype: the floating dtype (default: torch's default dtype).
    :return: a ``(B, t_max, z_dim)`` tensor.
    :rtype: torch.Tensor
    """
    if t_max > num_steps:
        raise ValueError(f"t_max={t_max} exceeds num_steps={num_steps}")
    dtype = dtype or torch.get_default_dtype()
    rows = [
        torch.randn(num_steps, z_dim, generator=_noise_generator(seed, step, index), dtype=dtype)
        for index in sorted_indices.tolist()
    ]
    if not rows:
        return torch.zeros(0, t_max, z_dim, dtype=dtype)
    return torch.stack(rows)[:, :t_max]


def _base_normal(fn: Any) -> torch.distributions.Normal:
    base = fn
    while isinstance(base, (torch.distributions.Independent, MaskedDistribution)):
        base = base.base_dist
    if not isinstance(base, torch.distributions.Normal):
        raise TypeError(f"FixedNoiseMessenger needs a Normal site, got {type(fn).__name__}")
    return base


class FixedNoiseMessenger(Messenger):
    """
    Sets the value of every latent site named like ``z_<t>`` to ``loc + scale * noise[:, t - 1]``
    before it is sampled, for a (possibly masked, ``to_event``) Normal site with batch shape
    ``(B,)``, which is what ``Normal.rsample`` computes with ``noise[:, t - 1]`` as its standard
    normal draw. Sites already given a value (observed or replayed) are left alone.

    Use it around a guide only (the model's latent sites are replayed from the guide's trace).

    :param torch.Tensor noise: ``(B, T, z_dim)`` standard normal noise, one row per sequence in
        mini-batch row order (:func:`sequence_noise`).
    :param str pattern: a regular expression matching the site names, whose first group is the
        1-based time step.
    """

    def __init__(self, noise: torch.Tensor, pattern: str = r"z_(\d+)") -> None:
        super().__init__()
        self.noise = noise
        self.pattern = re.compile(pattern)

    def _pyro_sample(self, msg: Dict[str, Any]) -> None:
        if msg["is_observed"] or msg["value"] is not None or msg["done"]:
            return
        match = self.pattern.fullmatch(msg["name"])
        if match is None:
            return
        normal = _base_normal(msg["fn"])
        value = normal.loc + normal.scale * self.noise[:, int(match.group(1)) - 1]
        shape = msg["fn"].shape()
        if value.shape != shape:
            raise ValueError(
                f"site {msg['name']!r}: fixed noise gives shape {tuple(value.shape)}, the "
                f"distribution has shape {tuple(shape)} (fixed noise needs num_particles=1)"
            )
        msg["value"] = value


# --- the module DDP wraps -------------------------------------------------------------------------
class DMMLoss(nn.Module):
    """
    The negative ELBO of a DMM as a module whose parameters are the DMM's, for
    :class:`~torch.nn.parallel.DistributedDataParallel`.

    It holds ``elbo(dmm.model, dmm.guide)``, Pyro's :class:`~pyro.infer.elbo.ELBOModule`, and a
    second ``ELBOModule`` whose guide runs under :class:`FixedNoiseMessenger`; both share the
    ELBO instance, and so its plan cache. Neither ``ELBOModule`` holds parameters (its model and
    guide are bound methods, not modules); they come from ``dmm``.

    :param DMM dmm: the Deep Markov Model.
    :param elbo: the ELBO, e.g. :class:`pyro_markov_kl.trace_markov_kl_elbo.TraceMarkovKL_ELBO`.
    """

    def __init__(self, dmm: DMM, elbo: ELBO) -> None:
        super().__init__()
        self.dmm = dmm
        self.elbo_module = elbo(dmm.model, dmm.guide)
        self.fixed_noise_elbo_module = elbo(dmm.model, self.fixed_noise_guide)
        self._noise: Optional[torch.Tensor] = None

    def fixed_noise_guide(self, *args: Any, **kwargs: Any) -> None:
        """The DMM's guide with its latent noise set by the ``noise`` of :meth:`forward`."""
        if self._noise is None:
            raise RuntimeError("fixed_noise_guide runs only inside DMMLoss.forward(..., noise)")
        with FixedNoiseMessenger(self._noise):
            self.dmm.guide(*args, **kwargs)

    def forward(
        self,
        mini_batch: torch.Tensor,
        mini_batch_reversed: torch.nn.utils.rnn.PackedSequence,
        mini_batch_mask: torch.Tensor,
        mini_batch_seq_lengths: torch.Tensor,
        annealing_factor: float = 1.0,
        noise: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        The first four arguments are those of :func:`pyro_markov_kl.data.get_mini_batch`.

        :param torch.Tensor mini_batch: the ``(B, T, 88)`` observations.
        :param mini_batch_reversed: the packed time-reversed observations.
        :param torch.Tensor mini_batch_mask: the ``(B, T)`` 0/1 mask of valid steps.
        :param torch.Tensor mini_batch_seq_lengths: the ``(B,)`` lengths, longest first.
        :param float annealing_factor: the KL annealing factor.
        :param noise: ``None`` to sample the guide, or ``(B, T, z_dim)`` standard normal noise
            (:func:`sequence_noise`) to fix it.
        :return: the differentiable loss, the negative ELBO summed over the sequences.
        :rtype: torch.Tensor
        """
        args = (mini_batch, mini_batch_reversed, mini_batch_mask, mini_batch_seq_lengths)
        if noise is None:
            return self.elbo_module(*args, annealing_factor)
        self._noise = noise
        try:
            return self.fixed_noise_elbo_module(*args, annealing_factor)
        finally:
            self._noise = None


def _dmm_of(module: nn.Module) -> DMM:
    if isinstance(module, DistributedDataParallel):
        module = module.module
    return module.dmm


def shard_loss(
    module: nn.Module,
    indices: torch.Tensor,
    sequences: torch.Tensor,
    seq_lengths: torch.Tensor,
    annealing_factor: float = 1.0,
    rank: int = 0,
    world_size: int = 1,
    noise_seed: Optional[int] = None,
    step: int = 0,
) -> Tuple[torch.Tensor, float]:
    """
    This rank's part of one global mini-batch: the loss to back-propagate and the loss to report.

    :param module: a :class:`DMMLoss`, wrapped in DDP or not.
    :param torch.Tensor indices: the global mini-batch, the same on every rank.
    :param torch.Tensor sequences: the ``(N, T_data, 88)`` data set.
    :param torch.Tensor seq_lengths: its ``(N,)`` lengths.
    :param float annealing_factor: the KL annealing factor.
    :param int rank: this process's rank.
    :param int world_size: the number of processes.
    :param noise_seed: ``None`` to sample the guide, or the seed of :func:`sequence_noise`.
    :param int step: the training step (for :func:`sequence_noise`).
    :return: ``(scaled_loss, loss)``: ``loss_scale(world_size) * L(shard)`` (times 0 for an
        empty shard, which evaluates the first sequence of ``indices`` instead) and the unscaled
        ``L(shard)`` as a float (0 for an empty shard).
    :rtype: tuple
    """
    shard = shard_indices(indices, rank, world_size)
    weight = 1.0
    if len(shard) == 0:
        # join the all-reduce with a zero gradient
        shard, weight = indices[:1], 0.0
    batch = get_mini_batch(shard, sequences, seq_lengths)
    noise = None
    if noise_seed is not None:
        z_dim = _dmm_of(module).z_0.size(0)
        noise = sequence_noise(
            sorted_batch_indices(shard, seq_lengths),
            sequences.size(1),
            batch[0].size(1),
            z_dim,
            noise_seed,
            step,
            dtype=batch[0].dtype,
        )
    loss = module(*batch, annealing_factor, noise)
    return loss * (loss_scale(world_size) * weight), weight * float(loss.detach())


# --- training -------------------------------------------------------------------------------------
#: Training settings of this script that differ from the main job's defaults of
#: :mod:`pyro_markov_kl.examples.dmm` (they were that script's defaults before issue 14).
DISTRIBUTED_DEFAULTS: dict = {"num_epochs": 40, "learning_rate": 0.01, "annealing_epochs": 5}


def make_parser() -> argparse.ArgumentParser:
    """
    The options of :mod:`pyro_markov_kl.examples.dmm` plus ``--nproc`` and ``--fixed-noise``.

    :rtype: argparse.ArgumentParser
    """
    parser = make_dmm_parser()
    parser.prog = "python -m pyro_markov_kl.examples.dmm_distributed"
    parser.description = (
        "Data-parallel training of the Deep Markov Model on torch.distributed (CPU, gloo). "
        "Launch with torchrun --nproc_per_node N -m pyro_markov_kl.examples.dmm_distributed, or "
        "with --nproc N to spawn N local workers. -b is the global mini-batch size, split over "
        "the workers; the other options are those of pyro_markov_kl.examples.dmm."
    )
    # options of the DMM script that this one does not implement (it refuses other values), and
    # the training settings this script was written with (the DMM script's main job differs)
    # buckets: None, so that any --buckets is refused (it does not pad mini-batches)
    parser.set_defaults(
        jit=False, checkpoint=None, batching="random", buckets=None, **DISTRIBUTED_DEFAULTS
    )
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="spawn this many local worker processes on 127.0.0.1 (not with torchrun; "
        "default: torchrun's world, or a single process without DDP)",
    )
    parser.add_argument(
        "--fixed-noise",
        action="store_true",
        help="draw each sequence's guide noise from a generator seeded by (seed, step, sequence "
        "index), so that runs with any number of workers see the same samples (for checks)",
    )
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("num_epochs", "batch_size", "num_particles", "test_particles"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_train_sequences is not None and args.max_train_sequences < 1:
        parser.error("--max-train-sequences must be at least 1")
    if args.nproc is not None and args.nproc < 1:
        parser.error("--nproc must be at least 1")
    if args.fixed_noise and args.num_particles != 1:
        parser.error("--fixed-noise needs --num-particles 1")
    if args.fixed_noise and args.seed < 0:
        parser.error("--fixed-noise needs a non-negative --seed")


def _all_reduce_sum(values: List[float], distributed: bool) -> List[float]:
    if not distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def _nll_per_slice(
    elbo: ELBO, dmm: DMM, split: Dict[str, torch.Tensor], rank: int, world_size: int
) -> float:
    sequences, lengths = split["sequences"], split["sequence_lengths"]
    shard = shard_indices(torch.arange(len(lengths)), rank, world_size)
    loss = 0.0
    if len(shard) > 0:
        batch = get_mini_batch(shard, sequences, lengths)
        dmm.eval()
        try:
            with torch.no_grad():
                loss = float(elbo.loss(dmm.model, dmm.guide, *batch))
        finally:
            dmm.train()
    (total,) = _all_reduce_sum([loss], dist.is_available() and dist.is_initialized())
    return total / float(lengths.sum())


def train(
    args: argparse.Namespace, log: Optional[Callable[[str], None]] = None, evaluate: bool = True
) -> Dict[str, Any]:
    """
    Train the DMM on this process's shards; collective with every rank of the default process
    group if :mod:`torch.distributed` is initialised, a plain single-process run otherwise.

    :param argparse.Namespace args: parsed by :func:`make_parser`.
    :param log: where rank 0 prints (default: :func:`print`); other ranks print nothing.
    :param bool evaluate: compute the test NLL bound at the end.
    :return: a dict with ``"rank"``, ``"world_size"``, ``"train_losses_per_slice"`` (every
        epoch, over the whole training set), ``"train_loss_per_slice"`` (last epoch),
        ``"test_nll_per_slice"`` (``nan`` without ``evaluate``), ``"evaluations"``,
        ``"num_train_slices"``, ``"seconds"`` and ``"dmm"`` (the trained module).
    :rtype: dict
    """
    with warnings.catch_warnings():
        if args.elbo == "meanfield" and args.guide == "backward":
            # Pyro warns at every step that the guide's site order differs from the model's
            warnings.filterwarnings("ignore", message="Failed to verify mean field restriction")
        return _train(args, log, evaluate)


def _train(
    args: argparse.Namespace, log: Optional[Callable[[str], None]], evaluate: bool
) -> Dict[str, Any]:
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world_size = dist.get_world_size() if distributed else 1

    def say(message: str) -> None:
        if rank == 0:
            (log or (lambda text: print(text, flush=True)))(message)

    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    sequences, lengths = load_train_split(args.max_train_sequences)
    num_train = len(lengths)
    num_train_slices = int(lengths.sum())
    num_mini_batches = math.ceil(num_train / args.batch_size)

    dmm = build_dmm(args)
    elbo = build_elbo(
        args.elbo, num_particles=args.num_particles, vectorize_particles=args.vectorize_particles
    )
    module: nn.Module = DMMLoss(dmm, elbo)
    if distributed:
        module = DistributedDataParallel(module)  # broadcasts rank 0's parameters
    optimizer = torch.optim.Adam(
        module.parameters(),
        lr=args.learning_rate,
        betas=(args.beta1, args.beta2),
        weight_decay=args.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=args.lr_decay)
    # the same mini-batch order everywhere, independent guide noise on each rank
    order_generator = torch.Generator().manual_seed(args.seed)
    pyro.set_rng_seed(args.seed + 7919 * rank)

    say(
        f"DMM on JSB Chorales, data-parallel over {world_size} process(es): elbo={args.elbo} "
        f"guide={args.guide} z_dim={args.z_dim} emission_dim={args.emission_dim} "
        f"transition_dim={args.transition_dim} rnn_dim={args.rnn_dim} "
        f"num_particles={args.num_particles}{' fixed-noise' if args.fixed_noise else ''}"
    )
    say(
        f"train sequences: {num_train} ({num_train_slices} time slices, {num_mini_batches} "
        f"global mini-batches of <= {args.batch_size}, <= "
        f"{math.ceil(args.batch_size / world_size)} per process)"
    )

    test_elbo = build_elbo(
        args.elbo, num_particles=args.test_particles, vectorize_particles=args.vectorize_particles
    )
    train_losses: List[float] = []
    evaluations: List[Dict[str, float]] = []
    step = 0
    factor = 1.0
    start = time.perf_counter()
    for epoch in range(args.num_epochs):
        epoch_start = time.perf_counter()
        epoch_loss = 0.0
        shuffled = torch.randperm(num_train, generator=order_generator)
        for which in range(num_mini_batches):
            factor = annealing_factor(
                epoch, which, num_mini_batches, args.annealing_epochs, args.minimum_annealing_factor
            )
            indices = shuffled[which * args.batch_size : (which + 1) * args.batch_size]
            scaled_loss, loss = shard_loss(
                module,
                indices,
                sequences,
                lengths,
                factor,
                rank,
                world_size,
                noise_seed=args.seed if args.fixed_noise else None,
                step=step,
            )
            optimizer.zero_grad(set_to_none=True)
            scaled_loss.backward()  # DDP averages the gradients over the ranks here
            nn.utils.clip_grad_value_(module.parameters(), args.clip_norm)
            optimizer.step()
            scheduler.step()
            epoch_loss += loss
            step += 1
        (epoch_loss,) = _all_reduce_sum([epoch_loss], distributed)
        train_losses.append(epoch_loss / num_train_slices)
        say(
            f"[epoch {epoch + 1:4d}] train loss per time slice {train_losses[-1]:.4f}  "
            f"(annealing factor {factor:.3f}, {time.perf_counter() - epoch_start:.1f} s)"
        )
        if evaluate and args.test_frequency > 0 and (epoch + 1) % args.test_frequency == 0:
            valid_nll = _nll_per_slice(test_elbo, dmm, load_jsb_chorales("valid"), rank, world_size)
            test_nll = _nll_per_slice(test_elbo, dmm, load_jsb_chorales("test"), rank, world_size)
            evaluations.append({"epoch": epoch + 1, "valid": valid_nll, "test": test_nll})
            say(
                f"[epoch {epoch + 1:4d}] NLL bound per time slice: valid {valid_nll:.4f}  "
                f"test {test_nll:.4f}"
            )
    seconds = time.perf_counter() - start

    test_nll = math.nan
    if evaluate:
        test_split = load_jsb_chorales("test")
        test_nll = _nll_per_slice(test_elbo, dmm, test_split, rank, world_size)
        say(
            f"test NLL bound per time slice: {test_nll:.4f} (-ELBO / "
            f"{int(test_split['sequence_lengths'].sum())} test time slices, estimated by "
            f"{type(test_elbo).__name__} with {args.test_particles} particle(s) over "
            f"{world_size} process(es); training took {seconds:.1f} s)"
        )
    return {
        "rank": rank,
        "world_size": world_size,
        "elbo": args.elbo,
        "guide": args.guide,
        "train_loss_per_slice": train_losses[-1] if train_losses else math.nan,
        "train_losses_per_slice": train_losses,
        "test_nll_per_slice": test_nll,
        "evaluations": evaluations,
        "num_train_slices": num_train_slices,
        "seconds": seconds,
        "dmm": dmm,
    }


# --- launching ------------------------------------------------------------------------------------
def find_free_port(host: str = "127.0.0.1") -> int:
    """
    A TCP port that was free on ``host`` a moment ago (bound to port 0, then released).

    :param str host: the address to bind.
    :rtype: int
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def loopback_interface() -> str:
    """The name of the loopback network interface (``lo``, ``lo0`` on macOS)."""
    return "lo0" if sys.platform == "darwin" else "lo"


def _set_threads(num_threads: int, local_world_size: int) -> None:
    if num_threads <= 0:
        num_threads = max(1, (os.cpu_count() or 1) // max(1, local_world_size))
    torch.set_num_threads(num_threads)


def _result_for_json(result: Dict[str, Any]) -> Dict[str, Any]:
    return {key: value for key, value in result.items() if key != "dmm"}


def _spawned_worker(
    rank: int, world_size: int, port: int, argv: List[str], result_path: str
) -> None:
    """The body of each process started by ``--nproc``: join the group on loopback, train."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())
    args = make_parser().parse_args(argv)
    _set_threads(args.num_threads, world_size)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        result = train(args)
        if rank == 0:
            with open(result_path, "w", encoding="utf-8") as handle:
                json.dump(_result_for_json(result), handle)
    finally:
        dist.destroy_process_group()


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """
    Train the DMM data-parallel; see the module docstring.

    :param argv: command-line arguments (see ``--help``); ``None`` reads :data:`sys.argv`.
    :return: rank 0's results (as :func:`train`, without ``"dmm"`` when ``--nproc`` spawned the
        workers); on other ``torchrun`` ranks, that rank's.
    :rtype: dict
    """
    parser = make_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    reject_options(parser, args, "dmm_distributed")
    _check_args(parser, args)
    under_torchrun = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    if under_torchrun and args.nproc is not None:
        parser.error("--nproc spawns its own workers: do not combine it with torchrun")

    if under_torchrun:
        if os.environ.get("MASTER_ADDR") in _LOOPBACK_HOSTS:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())
        _set_threads(args.num_threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        dist.init_process_group("gloo")
        try:
            return train(args)
        finally:
            dist.destroy_process_group()

    if args.nproc is None:
        _set_threads(args.num_threads, 1)
        return train(args)

    port = find_free_port()
    with tempfile.TemporaryDirectory(prefix="dmm_distributed_") as tmp:
        result_path = os.path.join(tmp, "result.json")
        mp.spawn(
            _spawned_worker,
            args=(args.nproc, port, argv, result_path),
            nprocs=args.nproc,
            join=True,
        )
        with open(result_path, encoding="utf-8") as handle:
            return json.load(handle)


if __name__ == "__main__":
    main()
