# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

r"""
The Deep Markov Model (DMM) of Krishnan et al. (2017) on the JSB Chorales.

The model and the forward guide follow Pyro's ``examples/dmm.py`` (the DKS variant of the paper).
The model is

.. math::

    z_t \mid z_{t-1} \sim \mathcal{N}(\mu_\theta(z_{t-1}), \sigma_\theta(z_{t-1})), \qquad
    x_t \mid z_t \sim \mathrm{Bernoulli}(\pi_\theta(z_t)),

with a gated transition and an MLP emitter, and two guides are available:

* ``forward`` (Pyro's): :math:`q(z_t \mid z_{t-1}, x_{t:T})`, sampling :math:`z_1, \dots, z_T` in
  order, with :math:`x_{t:T}` summarised by an RNN run backward in time over the packed
  time-reversed mini-batch;
* ``backward``: :math:`q(z_t \mid z_{t+1}, x_{1:t})`, sampling :math:`z_T` first and then
  :math:`z_{T-1}, \dots, z_1`, with :math:`x_{1:t}` summarised by an RNN run forward in time
  (the true posterior factorises this way: given :math:`z_{t+1}`, :math:`z_t` is independent of
  :math:`x_{t+1:T}`). Each sequence starts at its own last step, conditioned on a learned
  parameter in place of :math:`z_{t+1}`.

The loss is one of ``markov-kl`` (:class:`pyro_markov_kl.TraceMarkovKL_ELBO`: the analytic KL of
each time step wherever it is provably unbiased, Monte Carlo elsewhere), ``trace``
(:class:`pyro.infer.Trace_ELBO`: Monte Carlo everywhere, as Pyro's example) or ``meanfield``
(:class:`pyro.infer.TraceMeanField_ELBO`: the analytic KL at every site, which is biased when a
model parent of a site depends on that site in the guide, as with the backward guide).

Training uses KL annealing through :func:`pyro.poutine.scale`, ragged sequences are handled with
masks built from the sequence lengths. The script prints the training loss per time slice after
each epoch and, at the end, the test negative log-likelihood bound per time slice,
``-ELBO / (number of test time slices)`` on the whole test set.

The options of Pyro's example are available: an IAF guide (``--num-iafs``, ``--iaf-dim``: the
flows' sites are estimated by Monte Carlo, having no closed-form KL), checkpoints
(``--checkpoint``/``--resume`` for model, optimiser, epoch, losses and random number generators,
so that a resumed run continues the same curve; Pyro's ``--save-model``/``--save-opt``/
``--load-model``/``--load-opt`` for the model and optimiser alone; all read with
``torch.load(weights_only=True)``), ``--data`` (a data set in the pickle format of Pyro's
polyphonic loader, read by a restricted unpickler), ``--device``/``--cuda`` and ``--jit``.

The defaults are the main job: a small model, compiled (``--jit``, on by default), trained on
mini-batches of sequences of similar lengths (``--batching by-length``, padded to four bucket
lengths, so that four graphs are compiled) for 200 epochs at step size 0.02, with the KL annealed
over the first 20 epochs, to a test NLL bound of about 8.2 nats per time slice in under 3 minutes on
two idle CPU cores, with a full checkpoint saved after every
epoch (``dmm_checkpoint.pt``); the run ends by printing the commands that evaluate the
checkpoint and train it further. The guide's RNN is ``tanh``, which trains stably at a larger
step size; Pyro's full-size configuration is ``--z-dim 100 --emission-dim 100 --transition-dim
200 --rnn-dim 600 --rnn-nonlinearity relu -lr 0.0003 --annealing-epochs 1000 -n 5000
--batching random``.

Reference:

* R. G. Krishnan, U. Shalit, D. Sontag (2017). Structured Inference Networks for Nonlinear State
  Space Models. AAAI 2017. arXiv:1609.09869.
"""

import argparse
import math
import os
import random
import sys
import tempfile
import time
import warnings
from collections import Counter
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
import torch.nn as nn
from pyro.distributions import TransformedDistribution
from pyro.distributions.transforms import affine_autoregressive
from pyro.infer import (
    SVI,
    JitTrace_ELBO,
    JitTraceMeanField_ELBO,
    Trace_ELBO,
    TraceMeanField_ELBO,
)
from pyro.infer.elbo import ELBO
from pyro.optim import ClippedAdam
from torch.nn.utils.rnn import PackedSequence
from tqdm.auto import tqdm

from pyro_markov_kl import JitTraceMarkovKL_ELBO, TraceMarkovKL_ELBO
from pyro_markov_kl.data import (
    SPLITS,
    PolyphonicDataError,
    bucket_length,
    bucket_lengths,
    get_mini_batch,
    length_buckets,
    length_grouped_batches,
    load_jsb_chorales,
    load_polyphonic_pickle,
    pad_and_reverse,
    reverse_sequences,
)

__all__ = [
    "ARCHITECTURE_OPTIONS",
    "SCRIPT_ONLY_OPTIONS",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "DMM",
    "ELBO_NAMES",
    "GUIDE_NAMES",
    "Combiner",
    "Emitter",
    "GatedTransition",
    "build_elbo",
    "get_rng_state",
    "load_checkpoint",
    "load_splits",
    "main",
    "make_parser",
    "reject_options",
    "save_checkpoint",
    "set_rng_state",
]

#: The main job's training settings that differ from those of the example before issue 14
#: (40 epochs at step size 0.01, KL annealed over 5 epochs, uncompiled: about 10.0 nats per time
#: slice). With the compiled loss and mini-batches by length, 200 epochs at 0.02 with the KL
#: annealed over 20 epochs reach a test NLL bound of about 8.2 nats per time slice on JSB; with
#: 5 epochs of annealing, 2 seeds of 5 stayed at the 11.1 plateau of an unused latent state for
#: 60 epochs. See the README.
MAIN_JOB: Dict[str, Any] = {"num_epochs": 200, "learning_rate": 0.02, "annealing_epochs": 20}
#: The names accepted by :func:`build_elbo` and ``--elbo``.
ELBO_NAMES = ("markov-kl", "trace", "meanfield")
#: The guide directions accepted by :class:`DMM` and ``--guide``.
GUIDE_NAMES = ("forward", "backward")


class Emitter(nn.Module):
    """
    Parameterizes the Bernoulli observation likelihood :math:`p(x_t \\mid z_t)`.

    :param int input_dim: the observation dimension.
    :param int z_dim: the latent dimension.
    :param int emission_dim: the hidden dimension of the MLP.
    """

    def __init__(self, input_dim: int, z_dim: int, emission_dim: int) -> None:
        super().__init__()
        self.lin_z_to_hidden = nn.Linear(z_dim, emission_dim)
        self.lin_hidden_to_hidden = nn.Linear(emission_dim, emission_dim)
        self.lin_hidden_to_input = nn.Linear(emission_dim, input_dim)
        self.relu = nn.ReLU()

    def forward(self, z_t: torch.Tensor) -> torch.Tensor:
        """
        :param torch.Tensor z_t: a batch of latents, shape ``(..., z_dim)``.
        :return: the Bernoulli probabilities, shape ``(..., input_dim)``.
        :rtype: torch.Tensor
        """
        h1 = self.relu(self.lin_z_to_hidden(z_t))
        h2 = self.relu(self.lin_hidden_to_hidden(h1))
        return torch.sigmoid(self.lin_hidden_to_input(h2))


class GatedTransition(nn.Module):
    """
    Parameterizes the Gaussian transition :math:`p(z_t \\mid z_{t-1})` (section 5 of the paper).

    :param int z_dim: the latent dimension.
    :param int transition_dim: the hidden dimension of the gate and proposed-mean MLPs.
    """

    def __init__(self, z_dim: int, transition_dim: int) -> None:
        super().__init__()
        self.lin_gate_z_to_hidden = nn.Linear(z_dim, transition_dim)
        self.lin_gate_hidden_to_z = nn.Linear(transition_dim, z_dim)
        self.lin_proposed_mean_z_to_hidden = nn.Linear(z_dim, transition_dim)
        self.lin_proposed_mean_hidden_to_z = nn.Linear(transition_dim, z_dim)
        self.lin_sig = nn.Linear(z_dim, z_dim)
        self.lin_z_to_loc = nn.Linear(z_dim, z_dim)
        # start the linear part of the mean as the identity
        with torch.no_grad():
            self.lin_z_to_loc.weight.copy_(torch.eye(z_dim))
            self.lin_z_to_loc.bias.zero_()
        self.relu = nn.ReLU()
        self.softplus = nn.Softplus()

    def forward(self, z_t_1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        :param torch.Tensor z_t_1: the previous latents, shape ``(..., z_dim)``.
        :return: the loc and scale of :math:`p(z_t \\mid z_{t-1})`.
        :rtype: tuple
        """
        gate = torch.sigmoid(self.lin_gate_hidden_to_z(self.relu(self.lin_gate_z_to_hidden(z_t_1))))
        proposed_mean = self.lin_proposed_mean_hidden_to_z(
            self.relu(self.lin_proposed_mean_z_to_hidden(z_t_1))
        )
        loc = (1 - gate) * self.lin_z_to_loc(z_t_1) + gate * proposed_mean
        scale = self.softplus(self.lin_sig(self.relu(proposed_mean)))
        return loc, scale


class Combiner(nn.Module):
    """
    Parameterizes one guide step :math:`q(z_t \\mid z_{\\text{cond}}, h_t)`.

    ``z_cond`` is the neighbouring latent the guide conditions on (:math:`z_{t-1}` for the forward
    guide, :math:`z_{t+1}` for the backward guide) and ``h_t`` the RNN's summary of the data.

    :param int z_dim: the latent dimension.
    :param int rnn_dim: the hidden dimension of the RNN.
    """

    def __init__(self, z_dim: int, rnn_dim: int) -> None:
        super().__init__()
        self.lin_z_to_hidden = nn.Linear(z_dim, rnn_dim)
        self.lin_hidden_to_loc = nn.Linear(rnn_dim, z_dim)
        self.lin_hidden_to_scale = nn.Linear(rnn_dim, z_dim)
        self.tanh = nn.Tanh()
        self.softplus = nn.Softplus()

    def forward(
        self, z_cond: torch.Tensor, h_rnn: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        :param torch.Tensor z_cond: the conditioning latents, shape ``(..., z_dim)``.
        :param torch.Tensor h_rnn: the RNN hidden states, shape ``(..., rnn_dim)``.
        :return: the loc and scale of the guide's Gaussian.
        :rtype: tuple
        """
        h_combined = 0.5 * (self.tanh(self.lin_z_to_hidden(z_cond)) + h_rnn)
        loc = self.lin_hidden_to_loc(h_combined)
        scale = self.softplus(self.lin_hidden_to_scale(h_combined))
        return loc, scale


class DMM(nn.Module):
    """
    The Deep Markov Model and its guide, as an :class:`~torch.nn.Module`.

    :meth:`model` and :meth:`guide` take the four tensors returned by
    :func:`pyro_markov_kl.data.get_mini_batch` and an annealing factor that scales every latent
    site in both (KL annealing).

    :param int input_dim: the observation dimension (88 piano keys).
    :param int z_dim: the latent dimension (Pyro's example: 100).
    :param int emission_dim: the emitter's hidden dimension (Pyro's example: 100).
    :param int transition_dim: the transition's hidden dimension (Pyro's example: 200).
    :param int rnn_dim: the guide RNN's hidden dimension (Pyro's example: 600).
    :param str guide: ``"forward"`` for Pyro's guide :math:`q(z_t \\mid z_{t-1}, x_{t:T})`, or
        ``"backward"`` for :math:`q(z_t \\mid z_{t+1}, x_{1:t})` sampled from :math:`t = T` down.
    :param str rnn_nonlinearity: ``"tanh"`` or ``"relu"`` (Pyro's example). With ``"relu"`` the
        RNN's hidden state is unbounded over long sequences and training at step sizes above
        Pyro's ``3e-4`` can diverge; ``"tanh"`` trained stably at ``1e-2`` in our runs.
    :param int num_iafs: the number of inverse autoregressive flows
        (:func:`~pyro.distributions.transforms.affine_autoregressive`) applied to the guide's
        per-step Gaussian, as in Pyro's example (0: none). The flows are submodules
        (``iafs_modules``), so their parameters train with the rest. A flow has no closed-form
        KL: :class:`~pyro_markov_kl.TraceMarkovKL_ELBO` estimates those sites by Monte Carlo.
    :param int iaf_dim: the hidden dimension of each flow's autoregressive network.
    """

    def __init__(
        self,
        input_dim: int = 88,
        z_dim: int = 16,
        emission_dim: int = 32,
        transition_dim: int = 64,
        rnn_dim: int = 64,
        guide: str = "forward",
        rnn_nonlinearity: str = "tanh",
        num_iafs: int = 0,
        iaf_dim: int = 50,
    ) -> None:
        super().__init__()
        if guide not in GUIDE_NAMES:
            raise ValueError(f"unknown guide {guide!r}; expected one of {GUIDE_NAMES}")
        if num_iafs < 0 or iaf_dim < 1:
            raise ValueError(f"need num_iafs >= 0 and iaf_dim >= 1, got {num_iafs}, {iaf_dim}")
        self.guide_direction = guide
        self.emitter = Emitter(input_dim, z_dim, emission_dim)
        self.trans = GatedTransition(z_dim, transition_dim)
        self.combiner = Combiner(z_dim, rnn_dim)
        self.rnn = nn.RNN(
            input_size=input_dim,
            hidden_size=rnn_dim,
            nonlinearity=rnn_nonlinearity,
            batch_first=True,
            bidirectional=False,
            num_layers=1,
        )
        # z_0 defines p(z_1); z_q_0 stands in for the guide's missing neighbour at its first step
        # (z_0 of the forward guide, z_{T+1} of the backward guide); h_0 starts the RNN
        self.z_0 = nn.Parameter(torch.zeros(z_dim))
        self.z_q_0 = nn.Parameter(torch.zeros(z_dim))
        self.h_0 = nn.Parameter(torch.zeros(1, 1, rnn_dim))
        # the flows of the guide, registered as submodules so that pyro.module trains them
        self.iafs = [affine_autoregressive(z_dim, hidden_dims=[iaf_dim]) for _ in range(num_iafs)]
        self.iafs_modules = nn.ModuleList(self.iafs)

    def _guide_sample(
        self,
        name: str,
        z_loc: torch.Tensor,
        z_scale: torch.Tensor,
        mask_t: torch.Tensor,
        annealing_factor: Union[float, torch.Tensor],
    ) -> torch.Tensor:
        # one guide step: a diagonal Gaussian, pushed through the flows if there are any (their
        # output's coordinates are correlated: the event shape is (z_dim,) without to_event)
        if self.iafs:
            z_dist = TransformedDistribution(dist.Normal(z_loc, z_scale), self.iafs)
            fn = z_dist.mask(mask_t[:, 0])
        else:
            fn = dist.Normal(z_loc, z_scale).mask(mask_t).to_event(1)
        with poutine.scale(scale=annealing_factor):
            return pyro.sample(name, fn)

    def model(
        self,
        mini_batch: torch.Tensor,
        mini_batch_reversed: Union[PackedSequence, torch.Tensor],
        mini_batch_mask: torch.Tensor,
        mini_batch_seq_lengths: torch.Tensor,
        annealing_factor: Union[float, torch.Tensor] = 1.0,
    ) -> None:
        """
        The model :math:`p(x_{1:T} \\mid z_{1:T})\\, p(z_{1:T})`.

        :param torch.Tensor mini_batch: the ``(B, T, 88)`` observations.
        :param mini_batch_reversed: the packed time-reversed observations (unused by the model).
        :param torch.Tensor mini_batch_mask: the ``(B, T)`` 0/1 mask of valid steps.
        :param torch.Tensor mini_batch_seq_lengths: the ``(B,)`` lengths (unused by the model).
        :param float annealing_factor: the scale of the latent sites.
        """
        T_max = mini_batch.size(1)
        pyro.module("dmm", self)
        z_prev = self.z_0.expand(mini_batch.size(0), self.z_0.size(0))
        with pyro.plate("z_minibatch", len(mini_batch)):
            for t in pyro.markov(range(1, T_max + 1)):
                z_loc, z_scale = self.trans(z_prev)
                with poutine.scale(scale=annealing_factor):
                    z_t = pyro.sample(
                        f"z_{t}",
                        dist.Normal(z_loc, z_scale).mask(mini_batch_mask[:, t - 1 : t]).to_event(1),
                    )
                emission_probs_t = self.emitter(z_t)
                pyro.sample(
                    f"obs_x_{t}",
                    dist.Bernoulli(emission_probs_t)
                    .mask(mini_batch_mask[:, t - 1 : t])
                    .to_event(1),
                    obs=mini_batch[:, t - 1, :],
                )
                z_prev = z_t

    def guide(
        self,
        mini_batch: torch.Tensor,
        mini_batch_reversed: Union[PackedSequence, torch.Tensor],
        mini_batch_mask: torch.Tensor,
        mini_batch_seq_lengths: torch.Tensor,
        annealing_factor: Union[float, torch.Tensor] = 1.0,
    ) -> None:
        """
        The guide :math:`q(z_{1:T} \\mid x_{1:T})`, in the direction given at construction.

        :param torch.Tensor mini_batch: the ``(B, T, 88)`` observations.
        :param mini_batch_reversed: the time-reversed observations, packed (as Pyro's loader) or
            as a zero-padded tensor (``get_mini_batch(..., pack=False)``, traceable by the JIT);
            the forward guide's RNN gives the same outputs at the valid steps either way.
        :param torch.Tensor mini_batch_mask: the ``(B, T)`` 0/1 mask of valid steps.
        :param torch.Tensor mini_batch_seq_lengths: the ``(B,)`` lengths, longest first.
        :param annealing_factor: the scale of the latent sites (a float, or a scalar tensor for
            the JIT).
        """
        pyro.module("dmm", self)
        h_0 = self.h_0.expand(1, mini_batch.size(0), self.rnn.hidden_size).contiguous()
        if self.guide_direction == "forward":
            self._forward_guide(
                mini_batch,
                mini_batch_reversed,
                mini_batch_mask,
                mini_batch_seq_lengths,
                h_0,
                annealing_factor,
            )
        else:
            self._backward_guide(mini_batch, mini_batch_mask, h_0, annealing_factor)

    def _forward_guide(
        self,
        mini_batch: torch.Tensor,
        mini_batch_reversed: Union[PackedSequence, torch.Tensor],
        mini_batch_mask: torch.Tensor,
        mini_batch_seq_lengths: torch.Tensor,
        h_0: torch.Tensor,
        annealing_factor: Union[float, torch.Tensor],
    ) -> None:
        # the RNN runs backward in time, so that h_t summarises x_{t:T}
        T_max = mini_batch.size(1)
        rnn_output, _ = self.rnn(mini_batch_reversed, h_0)
        if isinstance(rnn_output, PackedSequence):
            rnn_output = pad_and_reverse(rnn_output, mini_batch_seq_lengths, T_max)
        else:
            # padded input: the padding follows each reversed sequence, so the outputs at the
            # valid steps are those of the packed run; reversing zeroes the rest
            rnn_output = reverse_sequences(rnn_output, mini_batch_seq_lengths)
        z_prev = self.z_q_0.expand(mini_batch.size(0), self.z_q_0.size(0))
        with pyro.plate("z_minibatch", len(mini_batch)):
            for t in pyro.markov(range(1, T_max + 1)):
                z_loc, z_scale = self.combiner(z_prev, rnn_output[:, t - 1, :])
                z_t = self._guide_sample(
                    f"z_{t}", z_loc, z_scale, mini_batch_mask[:, t - 1 : t], annealing_factor
                )
                z_prev = z_t

    def _backward_guide(
        self,
        mini_batch: torch.Tensor,
        mini_batch_mask: torch.Tensor,
        h_0: torch.Tensor,
        annealing_factor: Union[float, torch.Tensor],
    ) -> None:
        # the RNN runs forward in time, so that h_t summarises x_{1:t}; outputs at valid steps
        # never see the padding, which comes after
        T_max = mini_batch.size(1)
        rnn_output, _ = self.rnn(mini_batch, h_0)
        z_start = self.z_q_0.expand(mini_batch.size(0), self.z_q_0.size(0))
        z_next = z_start
        with pyro.plate("z_minibatch", len(mini_batch)):
            for t in pyro.markov(range(T_max, 0, -1)):
                if t < T_max:
                    # a sequence whose step t + 1 is padding starts here, at its own last step
                    next_is_valid = mini_batch_mask[:, t : t + 1].bool()
                    z_cond = torch.where(next_is_valid, z_next, z_start)
                else:
                    z_cond = z_start
                z_loc, z_scale = self.combiner(z_cond, rnn_output[:, t - 1, :])
                z_t = self._guide_sample(
                    f"z_{t}", z_loc, z_scale, mini_batch_mask[:, t - 1 : t], annealing_factor
                )
                z_next = z_t


def build_elbo(
    name: str,
    num_particles: int = 1,
    vectorize_particles: bool = False,
    max_plate_nesting: int = 1,
    jit: bool = False,
    **kwargs: Any,
) -> ELBO:
    """
    Build one of the ELBO estimators by name.

    :param str name: ``"markov-kl"`` (:class:`pyro_markov_kl.TraceMarkovKL_ELBO`), ``"trace"``
        (:class:`pyro.infer.Trace_ELBO`) or ``"meanfield"``
        (:class:`pyro.infer.TraceMeanField_ELBO`).
    :param int num_particles: the number of samples per estimate.
    :param bool vectorize_particles: draw the particles in one vectorized pass.
    :param int max_plate_nesting: the number of plates (the DMM has one).
    :param bool jit: the compiled twin (:class:`pyro_markov_kl.JitTraceMarkovKL_ELBO`,
        :class:`pyro.infer.JitTrace_ELBO`, :class:`pyro.infer.JitTraceMeanField_ELBO`).
    :param kwargs: further constructor arguments of the ELBO (with ``jit``,
        ``ignore_jit_warnings`` defaults to ``True``: the tracer warns at every traced shape
        check of the model, distributions and estimator, which the bucketed graphs do not need).
    :return: the ELBO instance.
    :rtype: pyro.infer.elbo.ELBO
    """
    cls: Any
    if name == "markov-kl":
        cls = JitTraceMarkovKL_ELBO if jit else TraceMarkovKL_ELBO
    elif name == "trace":
        cls = JitTrace_ELBO if jit else Trace_ELBO
    elif name == "meanfield":
        cls = JitTraceMeanField_ELBO if jit else TraceMeanField_ELBO
    else:
        raise ValueError(f"unknown ELBO {name!r}; expected one of {ELBO_NAMES}")
    if jit:
        kwargs.setdefault("ignore_jit_warnings", True)
    return cls(
        num_particles=num_particles,
        vectorize_particles=vectorize_particles,
        max_plate_nesting=max_plate_nesting,
        **kwargs,
    )


def make_parser() -> argparse.ArgumentParser:
    """
    The command-line interface of :func:`main`.

    :rtype: argparse.ArgumentParser
    """
    parser = argparse.ArgumentParser(
        prog="python -m pyro_markov_kl.examples.dmm",
        description=(
            "Train the Deep Markov Model (Krishnan et al., 2017) on the JSB Chorales and report "
            "the test NLL bound per time slice. The defaults are the main job: a small, compiled "
            "model trained on mini-batches of similar lengths for 200 epochs to about 8.2 nats per "
            "time slice in under 3 minutes on two CPU cores, saving a checkpoint; Pyro's full-size "
            "example is --z-dim 100 --emission-dim 100 --transition-dim 200 --rnn-dim 600 "
            "--rnn-nonlinearity relu -lr 0.0003 --annealing-epochs 1000 -n 5000 --batching random "
            "(and --num-threads 0 to use all cores)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--elbo",
        choices=ELBO_NAMES,
        default="markov-kl",
        help="markov-kl: pyro_markov_kl.TraceMarkovKL_ELBO (per-step analytic KL where provably "
        "unbiased, Monte Carlo elsewhere); trace: pyro.infer.Trace_ELBO (Monte Carlo); "
        "meanfield: pyro.infer.TraceMeanField_ELBO (analytic KL at every site, biased for the "
        "backward guide)",
    )
    parser.add_argument(
        "--guide",
        choices=GUIDE_NAMES,
        default="forward",
        help="forward: Pyro's q(z_t | z_{t-1}, x_{t:T}); "
        "backward: q(z_t | z_{t+1}, x_{1:t}), sampled from t = T down to 1",
    )
    parser.add_argument(
        "-n", "--num-epochs", type=int, default=MAIN_JOB["num_epochs"], help="training epochs"
    )
    parser.add_argument("-b", "--batch-size", type=int, default=20, help="sequences per mini-batch")
    parser.add_argument(
        "-lr",
        "--learning-rate",
        type=float,
        default=MAIN_JOB["learning_rate"],
        help="Adam step size",
    )
    parser.add_argument("--beta1", type=float, default=0.96, help="Adam beta1")
    parser.add_argument("--beta2", type=float, default=0.999, help="Adam beta2")
    parser.add_argument("--clip-norm", type=float, default=10.0, help="gradient clipping norm")
    parser.add_argument(
        "--lr-decay", type=float, default=0.99996, help="learning-rate decay per step"
    )
    parser.add_argument("--weight-decay", type=float, default=2.0, help="L2 penalty of Adam")
    parser.add_argument(
        "--annealing-epochs",
        type=int,
        default=MAIN_JOB["annealing_epochs"],
        help="epochs over which the KL annealing factor rises linearly to 1 (0: no annealing)",
    )
    parser.add_argument(
        "--minimum-annealing-factor",
        type=float,
        default=0.2,
        help="the KL annealing factor at the first step",
    )
    parser.add_argument("--z-dim", type=int, default=16, help="latent dimension (Pyro: 100)")
    parser.add_argument(
        "--emission-dim", type=int, default=32, help="emitter hidden dimension (Pyro: 100)"
    )
    parser.add_argument(
        "--transition-dim", type=int, default=64, help="transition hidden dimension (Pyro: 200)"
    )
    parser.add_argument(
        "--rnn-dim", type=int, default=64, help="guide RNN hidden dimension (Pyro: 600)"
    )
    parser.add_argument(
        "--rnn-nonlinearity",
        choices=("tanh", "relu"),
        default="tanh",
        help="nonlinearity of the guide RNN (Pyro: relu, which can diverge at -lr above 3e-4)",
    )
    parser.add_argument(
        "--num-particles", type=int, default=1, help="samples per ELBO estimate in training"
    )
    parser.add_argument(
        "--vectorize-particles",
        action="store_true",
        help="draw the particles in one vectorized pass (max_plate_nesting=1)",
    )
    parser.add_argument(
        "--test-particles",
        type=int,
        default=1,
        help="samples of the ELBO estimate used for the test (and validation) NLL bound",
    )
    parser.add_argument(
        "--test-frequency",
        type=int,
        default=0,
        help="also report the validation and test NLL bounds every this many epochs "
        "(0: only the test bound, at the end)",
    )
    parser.add_argument(
        "--max-train-sequences",
        type=int,
        default=None,
        help="train on the first N training sequences only (default: all 229)",
    )
    parser.add_argument(
        "--num-iafs",
        type=int,
        default=0,
        help="inverse autoregressive flows applied to the guide's per-step Gaussian, as Pyro's "
        "example (their sites are estimated by Monte Carlo: a flow has no closed-form KL)",
    )
    parser.add_argument(
        "--iaf-dim", type=int, default=50, help="hidden dimension of each flow (Pyro: 100)"
    )
    parser.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="a polyphonic data set in the pickle format of Pyro's loader (e.g. Pyro's "
        "jsb_chorales.pickle or piano_midi.pickle), read safely (no code in it runs) and "
        "validated; default: the JSB Chorales bundled with the package",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device of the model and data (cpu, cuda, cuda:1, ...)",
    )
    parser.add_argument(
        "--cuda", action="store_true", help="Pyro's flag: the same as --device cuda"
    )
    parser.add_argument(
        "--jit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compile the loss with torch.jit (JitTraceMarkovKL_ELBO, JitTrace_ELBO or "
        "JitTraceMeanField_ELBO), one graph per bucket length (--buckets); the guide then "
        "reads the time-reversed mini-batch as a padded tensor (same result as the packed one, "
        "which the tracer cannot take) and the evaluation uses the uncompiled ELBO. --no-jit "
        "runs the uncompiled ELBO, as Pyro's example does by default",
    )
    parser.add_argument(
        "--batching",
        choices=("by-length", "random"),
        default="by-length",
        help="by-length: every mini-batch holds sequences of one length bucket (--buckets; the "
        "sequences shuffled within their bucket and the mini-batches shuffled every epoch), so "
        "that little of it is padding; random: mini-batches drawn at random from all sequences, "
        "as Pyro's example",
    )
    parser.add_argument(
        "--buckets",
        "--jit-buckets",
        dest="buckets",
        type=int,
        default=4,
        help="the largest number of length buckets. --batching by-length: bucket lengths chosen "
        "to minimise the padded steps of an epoch; random: with --jit only, evenly spaced up to "
        "the longest training sequence (0: no padding, one graph per mini-batch length). With "
        "by-length mini-batches or --jit every mini-batch is padded (masked) to its bucket's "
        "length, so that a run has at most this many mini-batch lengths (plans of "
        "TraceMarkovKL_ELBO, graphs under --jit)",
    )
    checkpoints = parser.add_argument_group(
        "checkpoints",
        "--checkpoint/--resume save and restore everything a run needs to continue its curve "
        "(model, optimiser, completed epochs, losses so far, random number generators); "
        "Pyro's --save-model/--save-opt/--load-model/--load-opt save and load the model and "
        "the optimiser state alone, in Pyro's layout. Files are written after every epoch and "
        "read with torch.load(weights_only=True).",
    )
    checkpoints.add_argument(
        "--checkpoint",
        metavar="PATH",
        default=DEFAULT_CHECKPOINT,
        help="save a full checkpoint here after every epoch",
    )
    checkpoints.add_argument(
        "--no-checkpoint",
        dest="checkpoint",
        action="store_const",
        const=None,
        help="save no full checkpoint",
    )
    checkpoints.add_argument(
        "--resume",
        metavar="PATH",
        default=None,
        help="continue the run of this full checkpoint, up to --num-epochs epochs in total",
    )
    checkpoints.add_argument(
        "-smod", "--save-model", metavar="PATH", default=None, help="save the model's state_dict"
    )
    checkpoints.add_argument(
        "-sopt", "--save-opt", metavar="PATH", default=None, help="save the optimiser state"
    )
    checkpoints.add_argument(
        "-lmod",
        "--load-model",
        metavar="PATH",
        default=None,
        help="load a model state_dict (Pyro's layout, or the model of a full checkpoint)",
    )
    checkpoints.add_argument(
        "-lopt",
        "--load-opt",
        metavar="PATH",
        default=None,
        help="load an optimiser state (Pyro's layout, or the optimiser of a full checkpoint)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--num-threads",
        type=int,
        default=1,
        help="torch intra-op threads, set process-wide (0: leave torch's default); one thread is "
        "as fast as two for the small default sizes",
    )
    return parser


def annealing_factor(
    epoch: int, mini_batch: int, num_mini_batches: int, annealing_epochs: int, min_factor: float
) -> float:
    """
    KL annealing as in Pyro's DMM example: the scale of the latent sites rises
    linearly from ``min_factor`` to 1 over the first ``annealing_epochs``.
    """
    if annealing_epochs > 0 and epoch < annealing_epochs:
        step = mini_batch + epoch * num_mini_batches + 1
        return min_factor + (1.0 - min_factor) * step / (annealing_epochs * num_mini_batches)
    return 1.0


def compile_loss(
    svi: SVI, elbo: ELBO, batch: Sequence[torch.Tensor], factor: torch.Tensor
) -> float:
    """
    Trace and compile the loss of ``svi`` (whose loss is the compiled ``elbo``) for the shape
    of ``batch`` by evaluating it once, without a parameter update; return the time that took.
    The model and guide are those held by ``svi``: Pyro's compiled ELBOs key their graphs on the
    identity of the model and guide callables, and every ``dmm.model`` is a new bound method.

    Tracing runs the model and guide several times and so draws random numbers: they are drawn
    from a forked generator (:func:`torch.random.fork_rng`), so that the run's random stream is
    the one an uncompiled run draws, whenever graphs are compiled (a resumed run continues the
    same curve).
    """
    device = batch[0].device
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if isinstance(elbo, JitTraceMeanField_ELBO):  # it compiles its differentiable loss
            elbo.differentiable_loss(svi.model, svi.guide, *batch, factor)
        else:
            elbo.loss_and_surrogate_loss(svi.model, svi.guide, *batch, factor)
    return time.perf_counter() - start


def nll_per_slice(elbo: ELBO, dmm: DMM, sequences: torch.Tensor, lengths: torch.Tensor) -> float:
    """The bound :math:`-\\mathrm{ELBO}` per time slice of a whole split, estimated by ``elbo``."""
    batch = get_mini_batch(torch.arange(len(lengths)), sequences, lengths)
    dmm.eval()
    try:
        with torch.no_grad():
            loss = elbo.loss(dmm.model, dmm.guide, *batch)
    finally:
        dmm.train()
    return float(loss) / float(lengths.sum())


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, malformed or hostile, or does not fit the run."""


#: Where ``--checkpoint`` saves by default (in the working directory; ``--no-checkpoint``: nowhere).
DEFAULT_CHECKPOINT = "dmm_checkpoint.pt"
#: The ``"format"`` entry of the full checkpoints written by ``--checkpoint``.
CHECKPOINT_FORMAT = "pyro-markov-kl/dmm-checkpoint"
#: The layout version of the full checkpoints.
CHECKPOINT_VERSION = 1
#: The options that shape the model: a checkpoint resumes only a run with the same values.
ARCHITECTURE_OPTIONS = (
    "z_dim",
    "emission_dim",
    "transition_dim",
    "rnn_dim",
    "rnn_nonlinearity",
    "guide",
    "num_iafs",
    "iaf_dim",
)
#: The options of a run that shape its training curve without changing the model: a checkpoint
#: records them, and resuming with other values says so (the run continues, on another curve).
CURVE_OPTIONS = (
    "batching",
    "buckets",
    "batch_size",
    "max_train_sequences",
    "data",
    "annealing_epochs",
    "minimum_annealing_factor",
    "num_particles",
    "jit",
)


def build_dmm(args: argparse.Namespace) -> DMM:
    """The :class:`DMM` of the command-line sizes, on ``args.device``."""
    return DMM(
        z_dim=args.z_dim,
        emission_dim=args.emission_dim,
        transition_dim=args.transition_dim,
        rnn_dim=args.rnn_dim,
        guide=args.guide,
        rnn_nonlinearity=args.rnn_nonlinearity,
        num_iafs=args.num_iafs,
        iaf_dim=args.iaf_dim,
    ).to(args.device)


def build_optim(args: argparse.Namespace) -> ClippedAdam:
    """Pyro's DMM optimiser, ``ClippedAdam``, with the command-line settings."""
    return ClippedAdam(
        {
            "lr": args.learning_rate,
            "betas": (args.beta1, args.beta2),
            "clip_norm": args.clip_norm,
            "lrd": args.lr_decay,
            "weight_decay": args.weight_decay,
        }
    )


# --- random number generators, in a form torch.load(weights_only=True) reads ----------------------


def get_rng_state(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """
    The states of the random number generators a run draws from (torch's, the CUDA device's if
    ``device`` is a CUDA device, Python's and numpy's), as tensors and plain containers.
    """
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with pyro
        return state
    key, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state["numpy"] = {
        "key": str(key),
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore the states of :func:`get_rng_state`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    if "cuda" in state:
        torch.cuda.set_rng_state_all(list(state["cuda"]))
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        keys = s["keys"].numpy().astype(np.uint32)
        np.random.set_state((s["key"], keys, s["pos"], s["has_gauss"], s["cached_gaussian"]))


# --- checkpoints --------------------------------------------------------------------------------


def _atomic_save(obj: Any, path: str) -> None:
    # write beside the target and rename, so that an interrupted save leaves the old file whole
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _safe_load(path: str, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that say which file and why."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise CheckpointError(f"cannot read the {what} {path}: {e}") from e
    except Exception as e:  # UnpicklingError (a refused global), RuntimeError (not a zip), ...
        raise CheckpointError(
            f"{path} is not a {what} that torch.load(weights_only=True) accepts: it is corrupt, "
            "or holds code or objects other than tensors and plain containers, which are "
            f"refused ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()
    )


def _is_optim_state(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(
        isinstance(k, str) and isinstance(v, Mapping) and {"state", "param_groups"} <= set(v)
        for k, v in obj.items()
    )


def save_checkpoint(
    path: str,
    dmm: DMM,
    optim: ClippedAdam,
    epoch: int,
    train_losses: List[float],
    evaluations: List[Dict[str, float]],
    args: argparse.Namespace,
) -> None:
    """
    Write a full checkpoint: model, optimiser, number of completed epochs, losses so far, random
    number generator states and the model's options, as tensors and plain containers only.
    """
    _atomic_save(
        {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "epoch": epoch,
            "model": dmm.state_dict(),
            "optim": optim.get_state(),
            "rng": get_rng_state(torch.device(args.device)),
            "train_losses": list(train_losses),
            "evaluations": [dict(e) for e in evaluations],
            "config": {name: getattr(args, name) for name in ARCHITECTURE_OPTIONS + CURVE_OPTIONS},
        },
        path,
    )


def load_checkpoint(path: str, args: Optional[argparse.Namespace] = None) -> Dict[str, Any]:
    """
    Read and validate a full checkpoint of :func:`save_checkpoint`.

    :param str path: the file.
    :param args: if given, the run's options: the checkpoint's model options must equal them.
    :return: the checkpoint's dict.
    :rtype: dict
    :raises CheckpointError: naming the file and what is wrong.
    """
    ck = _safe_load(path, "DMM checkpoint")
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        hint = ""
        if _is_state_dict(ck):
            hint = " (it is a bare state_dict, as --save-model writes: load it with --load-model)"
        elif _is_optim_state(ck):
            hint = " (it is an optimiser state, as --save-opt writes: load it with --load-opt)"
        raise CheckpointError(f"{path} is not a full DMM checkpoint of --checkpoint{hint}")
    if ck.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {ck.get('version')!r}; this version reads "
            f"{CHECKPOINT_VERSION}"
        )
    rng = ck.get("rng")
    checks = [
        ("epoch", isinstance(ck.get("epoch"), int) and ck["epoch"] >= 0, "a count >= 0"),
        ("model", _is_state_dict(ck.get("model")), "a state_dict of tensors"),
        ("optim", _is_optim_state(ck.get("optim")), "an optimiser state"),
        (
            "rng",
            isinstance(rng, dict)
            and torch.is_tensor(rng.get("torch"))
            and isinstance(rng.get("python"), tuple)
            and len(rng["python"]) == 3,
            "random number generator states",
        ),
        (
            "train_losses",
            isinstance(ck.get("train_losses"), list)
            and all(isinstance(x, float) for x in ck["train_losses"]),
            "a list of floats",
        ),
        ("evaluations", isinstance(ck.get("evaluations"), list), "a list"),
        ("config", isinstance(ck.get("config"), dict), "a dict of options"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise CheckpointError(f"{path}: the entry {key!r} is missing or not {expected}")
    if len(ck["train_losses"]) != ck["epoch"]:
        raise CheckpointError(f"{path}: {ck['epoch']} epochs but {len(ck['train_losses'])} losses")
    if args is not None:
        differ = [
            f"--{name.replace('_', '-')} {ck['config'].get(name)!r} (this run: "
            f"{getattr(args, name)!r})"
            for name in ARCHITECTURE_OPTIONS
            if ck["config"].get(name) != getattr(args, name)
        ]
        if differ:
            raise CheckpointError(
                f"{path} was written by a run with a different model: " + ", ".join(differ)
            )
    return ck


def curve_differences(ck: Dict[str, Any], args: argparse.Namespace) -> List[str]:
    """
    The options of :data:`CURVE_OPTIONS` recorded in a full checkpoint with values other than
    this run's, as ``--name old (this run: new)`` (options a checkpoint does not record are
    skipped).
    """
    return [
        f"--{name.replace('_', '-')} {ck['config'][name]!r} (this run: {getattr(args, name)!r})"
        for name in CURVE_OPTIONS
        if name in ck["config"] and ck["config"][name] != getattr(args, name)
    ]


def _load_model_state(dmm: DMM, state: Any, path: str) -> None:
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        state = state.get("model")
    if not _is_state_dict(state):
        raise CheckpointError(f"{path} is not a model state_dict (a dict of named tensors)")
    try:
        dmm.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit this model (check the sizes): {e}") from e


def _load_optim_state(optim: ClippedAdam, dmm: DMM, state: Any, path: str) -> None:
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        state = state.get("optim")
    if not _is_optim_state(state):
        raise CheckpointError(f"{path} is not an optimiser state (a dict of optimiser states)")
    expected = {f"dmm$$${name}" for name, _ in dmm.named_parameters()}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise CheckpointError(
            f"{path} is the optimiser state of other parameters (missing: {missing[:3]}, "
            f"unexpected: {extra[:3]})"
        )
    # Pyro hands each parameter its state when the parameter is first optimised
    optim.set_state(state)


# --- command line -------------------------------------------------------------------------------

#: Options of this script that the scripts built on its parser (``dmm_compare``,
#: ``dmm_distributed``) do not implement; they reject them with :func:`reject_options`.
SCRIPT_ONLY_OPTIONS = (
    "data",
    "device",
    "cuda",
    "jit",
    "batching",
    "buckets",
    "checkpoint",
    "resume",
    "save_model",
    "save_opt",
    "load_model",
    "load_opt",
)


def reject_options(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    script: str,
    names: Sequence[str] = SCRIPT_ONLY_OPTIONS,
) -> None:
    """
    Exit with a parser error if any of the options ``names`` (inherited from :func:`make_parser`
    by another script that does not implement them) was given a non-default value.
    """
    for name in names:
        if name in vars(args) and getattr(args, name) != parser.get_default(name):
            parser.error(
                f"--{name.replace('_', '-')} is an option of pyro_markov_kl.examples.dmm that "
                f"{script} does not implement"
            )


def _resolve_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    if args.cuda:
        if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda"):
            parser.error(f"--cuda contradicts --device {args.device}")
        if not args.device.startswith("cuda"):
            args.device = "cuda"
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as e:
        parser.error(f"--device {args.device}: not a torch device ({e})")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(
                f"{'--cuda' if args.cuda else '--device ' + args.device}: CUDA is not available "
                "(torch.cuda.is_available() is False: no GPU, or a CPU-only torch build); "
                "run with --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
    else:
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as e:
            parser.error(f"--device {args.device}: not usable here ({e})")
    return device


def parser_defaults() -> Dict[str, Any]:
    """The default value of every option of :func:`make_parser`, by destination."""
    parser = make_parser()
    return {a.dest: parser.get_default(a.dest) for a in parser._actions if a.dest != "help"}


def _resume_help(defaults: Mapping[str, Any], args: argparse.Namespace) -> str:
    """How to evaluate the checkpoint of this run and how to train it further."""
    parser = make_parser()
    flags = {}
    for action in parser._actions:
        if action.option_strings and action.dest not in flags:
            names = [o for o in action.option_strings if not o.startswith("--no-")]
            flags[action.dest] = max(names or action.option_strings, key=len)
    # a --checkpoint other than the default stays, so that further training keeps writing there
    skip = {"resume", "num_epochs", "load_model", "load_opt", "test_frequency"}
    words = []
    for name, default in defaults.items():
        value = getattr(args, name, default)
        if name in skip or value == default:
            continue
        if isinstance(value, bool):
            words.append(flags[name] if value else f"--no-{flags[name][2:]}")
        else:
            words.append(f"{flags[name]} {value}")
    common = " ".join(["python -m pyro_markov_kl.examples.dmm"] + words)
    more = args.num_epochs + max(args.num_epochs // 2, 1)
    return (
        f"checkpoint saved to {args.checkpoint} (epoch {args.num_epochs}); to evaluate it "
        f"(a finished run only evaluates):\n    {common} --resume {args.checkpoint} "
        f"-n {args.num_epochs}\nto train it further, up to {more} epochs in all:\n    "
        f"{common} --resume {args.checkpoint} -n {more}"
    )


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """
    Train the DMM and report the test NLL bound per time slice.

    :param argv: command-line arguments (see ``--help``); ``None`` reads :data:`sys.argv`.
    :return: a dict with ``"elbo"``, ``"guide"``, ``"train_loss_per_slice"`` (last epoch),
        ``"train_losses_per_slice"`` (every epoch, including those of a resumed checkpoint),
        ``"test_nll_per_slice"``, ``"num_train_slices"``, ``"num_test_slices"``, ``"seconds"``
        (training in this run, without the evaluations and the saving of files, with the
        compilation), ``"evaluations"`` (validation/test bounds during training, if any, each
        with ``"epoch"`` and ``"seconds"``, the training time of this run so far),
        ``"start_epoch"`` (epochs already done by a resumed checkpoint), ``"device"`` and, with
        ``--jit``, ``"jit_graphs"``, ``"jit_graph_lengths"`` and ``"jit_compile_seconds"``.
    :rtype: dict
    :raises pyro_markov_kl.data.PolyphonicDataError: if the ``--data`` file is unreadable,
        hostile or malformed.
    :raises CheckpointError: if a checkpoint file to load is unreadable, hostile, malformed or
        does not fit the model.
    """
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.buckets < 0 or (args.buckets == 0 and args.batching == "by-length"):
        parser.error("--buckets must be at least 1 (at least 0 with --batching random)")
    for name in ("num_epochs", "batch_size", "num_particles", "test_particles", "iaf_dim"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.num_iafs < 0:
        parser.error("--num-iafs must be at least 0")
    if args.max_train_sequences is not None and args.max_train_sequences < 1:
        parser.error("--max-train-sequences must be at least 1")
    if args.resume and (args.load_model or args.load_opt):
        parser.error("--resume restores the model and the optimiser: drop --load-model/--load-opt")
    args.device = str(_resolve_device(parser, args))
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    with warnings.catch_warnings():
        if args.elbo == "meanfield" and args.guide == "backward":
            # Pyro warns at every step that the guide's site order differs from the model's
            print(
                "note: TraceMeanField_ELBO with the backward guide is a biased estimate of the "
                "ELBO (the guide's dependency structure is not the model's)",
                flush=True,
            )
            warnings.filterwarnings("ignore", message="Failed to verify mean field restriction")
        return _run(args)


def load_train_split(
    max_train_sequences: Optional[int] = None,
    train: Optional[Dict[str, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    The training sequences and their lengths (of the bundled JSB Chorales unless ``train`` is
    given), the first ``max_train_sequences`` of them if given (cut to the longest of those).
    """
    if train is None:
        train = load_jsb_chorales("train")
    sequences, lengths = train["sequences"], train["sequence_lengths"]
    if max_train_sequences is not None:
        lengths = lengths[:max_train_sequences]
        sequences = sequences[:max_train_sequences, : int(lengths.max())]
    return sequences, lengths


def load_splits(data: Optional[str] = None) -> Dict[str, Dict[str, torch.Tensor]]:
    """
    The three splits: of the pickle at ``data`` (see
    :func:`pyro_markov_kl.data.load_polyphonic_pickle`) or of the bundled JSB Chorales.
    """
    if data is not None:
        return load_polyphonic_pickle(data)
    return {split: load_jsb_chorales(split) for split in SPLITS}


def _run(args: argparse.Namespace) -> Dict[str, Any]:
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    device = torch.device(args.device)

    splits = {
        split: {key: value.to(device) for key, value in tensors.items()}
        for split, tensors in load_splits(args.data).items()
    }
    train_sequences, train_lengths = load_train_split(args.max_train_sequences, splits["train"])
    test = splits["test"]
    num_train = len(train_lengths)
    num_train_slices = int(train_lengths.sum())
    num_test_slices = int(test["sequence_lengths"].sum())
    # --batching by-length: buckets of similar lengths, whatever --jit; random: with --jit only,
    # to bound the number of compiled graphs
    buckets: Optional[List[int]] = None
    if args.batching == "by-length":
        buckets = length_buckets(train_lengths.tolist(), args.batch_size, args.buckets)
        bucket_sizes = Counter(bucket_length(int(n), buckets) for n in train_lengths.tolist())
        num_mini_batches = sum(math.ceil(n / args.batch_size) for n in bucket_sizes.values())
    else:
        bucket_sizes = Counter()
        if args.jit and args.buckets > 0:
            buckets = bucket_lengths(int(train_lengths.max()), args.buckets)
        num_mini_batches = math.ceil(num_train / args.batch_size)
    print(
        f"DMM on {args.data or 'JSB Chorales'}: elbo={args.elbo}{' (jit)' if args.jit else ''} "
        f"guide={args.guide} z_dim={args.z_dim} emission_dim={args.emission_dim} "
        f"transition_dim={args.transition_dim} rnn_dim={args.rnn_dim} "
        f"num_iafs={args.num_iafs}{f' (iaf_dim={args.iaf_dim})' if args.num_iafs else ''} "
        f"num_particles={args.num_particles}"
        f"{' (vectorized)' if args.vectorize_particles else ''} device={device}",
        flush=True,
    )
    print(
        f"train sequences: {num_train} ({num_train_slices} time slices, "
        f"{num_mini_batches} mini-batches of <= {args.batch_size}); "
        f"test sequences: {len(test['sequence_lengths'])} ({num_test_slices} time slices)",
        flush=True,
    )

    dmm = build_dmm(args)
    optim = build_optim(args)
    elbo = build_elbo(
        args.elbo,
        num_particles=args.num_particles,
        vectorize_particles=args.vectorize_particles,
        jit=args.jit,
    )
    test_elbo = build_elbo(
        args.elbo, num_particles=args.test_particles, vectorize_particles=args.vectorize_particles
    )
    svi = SVI(dmm.model, dmm.guide, optim, loss=elbo)
    # Pyro's compiled ELBOs compile once per number of arguments and reuse the graph for every
    # shape, but the DMM's graph depends on the mini-batch's shape (its number of time steps):
    # one compiled ELBO per shape (JitTraceMarkovKL_ELBO keys its graphs on shapes itself)
    svi_by_shape: Dict[Tuple[int, ...], Tuple[SVI, ELBO]] = {}

    def svi_for(batch: Sequence[torch.Tensor]) -> Tuple[SVI, ELBO]:
        if not args.jit or args.elbo == "markov-kl":
            return svi, elbo
        shape = tuple(batch[0].shape)
        if shape not in svi_by_shape:
            loss = build_elbo(
                args.elbo,
                num_particles=args.num_particles,
                vectorize_particles=args.vectorize_particles,
                jit=True,
            )
            svi_by_shape[shape] = SVI(dmm.model, dmm.guide, optim, loss=loss), loss
        return svi_by_shape[shape]

    # --jit: pad each mini-batch to its bucket's length, so that a handful of graphs is compiled;
    # the first step at each new shape traces and compiles, and is timed as the compile time
    def pad_batch_to(bucket: Optional[int]) -> int:
        # the number of sequences of a compiled graph: a full mini-batch, or all the sequences
        # there are (of the bucket, by length) when they are fewer
        if args.batching == "by-length":
            return min(args.batch_size, bucket_sizes[bucket])
        return min(args.batch_size, num_train)

    if buckets is not None:
        print(
            f"{args.batching} mini-batches, bucket lengths {buckets}"
            f"{' (the padded lengths of the compiled graphs)' if args.jit else ''}",
            flush=True,
        )
    compile_seconds: Dict[Tuple[int, ...], float] = {}

    train_losses: List[float] = []
    evaluations: List[Dict[str, float]] = []
    start_epoch = 0
    if args.resume:
        ck = load_checkpoint(args.resume, args)
        _load_model_state(dmm, ck["model"], args.resume)
        _load_optim_state(optim, dmm, ck["optim"], args.resume)
        start_epoch = ck["epoch"]
        train_losses = list(ck["train_losses"])
        evaluations = list(ck["evaluations"])
        try:
            set_rng_state(ck["rng"])
        except Exception as e:
            raise CheckpointError(f"{args.resume}: bad random number generator state: {e}") from e
        print(f"resumed from {args.resume} after epoch {start_epoch}", flush=True)
        changed = curve_differences(ck, args)
        if changed:
            print(
                f"note: {args.resume} was written by a run with other training options: "
                f"{', '.join(changed)}; training continues, but not on that run's curve",
                flush=True,
            )
    if args.load_model:
        _load_model_state(dmm, _safe_load(args.load_model, "model file"), args.load_model)
        print(f"loaded the model from {args.load_model}", flush=True)
    if args.load_opt:
        _load_optim_state(optim, dmm, _safe_load(args.load_opt, "optimiser file"), args.load_opt)
        print(f"loaded the optimiser state from {args.load_opt}", flush=True)

    # training time of this run: without the evaluations and the saving of files
    start, paused = time.perf_counter(), 0.0
    for epoch in range(start_epoch, args.num_epochs):
        epoch_start = time.perf_counter()
        epoch_loss = 0.0
        new_graphs = 0
        # shuffle on the CPU generator whatever the device, so that runs agree across devices
        if args.batching == "by-length":
            assert buckets is not None
            batches = length_grouped_batches(train_lengths.cpu(), buckets, args.batch_size)
        else:
            batches = list(torch.randperm(num_train).split(args.batch_size))
        progress = tqdm(
            range(num_mini_batches),
            desc=f"epoch {epoch + 1}/{args.num_epochs}",
            leave=False,
            disable=None,
        )
        for which in progress:
            factor: Union[float, torch.Tensor] = annealing_factor(
                epoch,
                which,
                num_mini_batches,
                args.annealing_epochs,
                args.minimum_annealing_factor,
            )
            indices = batches[which]
            pad_to = None
            if buckets is not None and (args.jit or args.batching == "by-length"):
                # uncompiled too: TraceMarkovKL_ELBO analyses every new trace structure (a new
                # length) once, and checks its plan at its 2nd and 16th use; padded to the
                # bucket lengths, a run has a few structures instead of one per length
                pad_to = bucket_length(int(train_lengths[indices].max()), buckets)
            if not args.jit:
                batch = get_mini_batch(indices, train_sequences, train_lengths, pad_to=pad_to)
                epoch_loss += svi.step(*batch, factor)
                continue
            # one shape per bucket: the last, smaller mini-batch gets empty sequences too
            batch = get_mini_batch(
                indices,
                train_sequences,
                train_lengths,
                pack=False,
                pad_to=pad_to,
                pad_batch_to=pad_batch_to(pad_to) if buckets is not None else None,
            )
            # the compiled loss takes tensors: a float would recompile every step
            factor = torch.tensor(factor, device=device)
            this_svi, this_elbo = svi_for(batch)
            with torch.jit.optimized_execution(False):
                shape = tuple(batch[0].shape)
                if shape not in compile_seconds:
                    compile_seconds[shape] = compile_loss(this_svi, this_elbo, batch, factor)
                    new_graphs += 1
                epoch_loss += this_svi.step(*batch, factor)
        progress.close()
        train_losses.append(epoch_loss / num_train_slices)
        jit_note = ""
        if args.jit:
            jit_note = f", {len(compile_seconds)} compiled graph(s)"
            if new_graphs:
                jit_note += f" ({new_graphs} new)"
        print(
            f"[epoch {epoch + 1:4d}] train loss per time slice {train_losses[-1]:.4f}  "
            f"(annealing factor {float(factor):.3f}, {time.perf_counter() - epoch_start:.1f} s"
            f"{jit_note})",
            flush=True,
        )
        pause_start = time.perf_counter()
        if args.test_frequency > 0 and (epoch + 1) % args.test_frequency == 0:
            valid = splits["valid"]
            val_nll = nll_per_slice(test_elbo, dmm, valid["sequences"], valid["sequence_lengths"])
            test_nll = nll_per_slice(test_elbo, dmm, test["sequences"], test["sequence_lengths"])
            evaluations.append(
                {
                    "epoch": epoch + 1,
                    "valid": val_nll,
                    "test": test_nll,
                    "seconds": pause_start - start - paused,
                }
            )
            print(
                f"[epoch {epoch + 1:4d}] NLL bound per time slice: valid {val_nll:.4f}  "
                f"test {test_nll:.4f}",
                flush=True,
            )
        # after the evaluation, which draws random numbers too: a resumed run continues here
        if args.checkpoint:
            save_checkpoint(args.checkpoint, dmm, optim, epoch + 1, train_losses, evaluations, args)
        if args.save_model:
            _atomic_save(dmm.state_dict(), args.save_model)
        if args.save_opt:
            _atomic_save(optim.get_state(), args.save_opt)
        paused += time.perf_counter() - pause_start
    seconds = time.perf_counter() - start - paused
    if args.jit:
        print(
            f"jit: {len(compile_seconds)} compiled graph(s) for the mini-batch lengths "
            f"{sorted(shape[1] for shape in compile_seconds)}; compiling them (tracing, analysis, "
            f"compilation, one evaluation each) took {sum(compile_seconds.values()):.1f} s",
            flush=True,
        )

    test_nll = nll_per_slice(test_elbo, dmm, test["sequences"], test["sequence_lengths"])
    print(
        f"test NLL bound per time slice: {test_nll:.4f} "
        f"(-ELBO / {num_test_slices} test time slices, estimated by {type(test_elbo).__name__} "
        f"with {args.test_particles} particle(s); training took {seconds:.1f} s)",
        flush=True,
    )
    if args.checkpoint and args.num_epochs > start_epoch:
        print(_resume_help(parser_defaults(), args), flush=True)
    return {
        "elbo": args.elbo,
        "guide": args.guide,
        "train_loss_per_slice": train_losses[-1] if train_losses else math.nan,
        "train_losses_per_slice": train_losses,
        "test_nll_per_slice": test_nll,
        "num_train_slices": num_train_slices,
        "num_test_slices": num_test_slices,
        "seconds": seconds,
        "evaluations": evaluations,
        "start_epoch": start_epoch,
        "device": str(device),
        "jit_graphs": len(compile_seconds),
        "jit_graph_lengths": sorted(shape[1] for shape in compile_seconds),
        "jit_compile_seconds": sum(compile_seconds.values()),
    }


if __name__ == "__main__":
    try:
        main()
    except (PolyphonicDataError, CheckpointError) as e:
        sys.exit(f"error: {e}")
