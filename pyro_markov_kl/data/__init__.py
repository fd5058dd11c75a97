# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
The JSB Chorales polyphonic music data set, shipped with the package, and mini-batch helpers.

The data set of Boulanger-Lewandowski et al. (2012) with its standard train/valid/test split
(229/76/77 chorales) is the data set of the Deep Markov Model (Krishnan et al., 2017) and of
Pyro's DMM example. It is stored in ``jsb_chorales.json`` beside this module (407200 bytes, sha256
``2db9329f1881a1d3f49703ec556bf1d6f84b4f6c1d702c156536e93cf31e1c91``; the JSON version of
``polyphonic/jsb_chorales.pickle`` that Pyro's own loader downloads, same content). It is read
with the standard library alone, so nothing is downloaded.

:func:`load_jsb_chorales` returns a split in the tensor format of
``pyro.contrib.examples.polyphonic_data_loader.load_data``: a ``(N, T_max, 88)`` float tensor of
piano rolls (``x[n, t, pitch - 21] = 1`` for each MIDI pitch sounding at quarter-note step ``t``),
padded with zeros per split, and a ``long`` tensor of the ``N`` sequence lengths. The helpers
:func:`get_mini_batch`, :func:`get_mini_batch_mask`, :func:`reverse_sequences` and
:func:`pad_and_reverse` mirror those of Pyro's loader (vectorized, same results).

Masks are built from the sequence lengths, never from non-zero rows: rests (all-zero steps) occur
inside sequences.

References:

* N. Boulanger-Lewandowski, Y. Bengio, P. Vincent (2012). Modeling Temporal Dependencies in
  High-Dimensional Sequences: Application to Polyphonic Music Generation and Transcription.
  ICML 2012.
* R. G. Krishnan, U. Shalit, D. Sontag (2017). Structured Inference Networks for Nonlinear State
  Space Models. AAAI 2017.
"""

import functools
import json
from importlib import resources
from typing import Dict, List, Tuple

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

__all__ = [
    "JSB_CHORALES_SHA256",
    "MIN_NOTE",
    "NOTE_RANGE",
    "SPLITS",
    "get_mini_batch",
    "get_mini_batch_mask",
    "load_jsb_chorales",
    "pad_and_reverse",
    "reverse_sequences",
]

#: sha256 of the shipped ``jsb_chorales.json``.
JSB_CHORALES_SHA256 = "2db9329f1881a1d3f49703ec556bf1d6f84b4f6c1d702c156536e93cf31e1c91"
#: MIDI pitch of the lowest piano key (A0), stored in column 0.
MIN_NOTE = 21
#: Number of piano keys, i.e. the observation dimension.
NOTE_RANGE = 88
#: The names of the splits.
SPLITS = ("train", "valid", "test")

_FILENAME = "jsb_chorales.json"


@functools.lru_cache(maxsize=1)
def _raw_jsb_chorales() -> Dict[str, List[List[List[int]]]]:
    text = resources.files(__name__).joinpath(_FILENAME).read_text(encoding="utf-8")
    return json.loads(text)


def load_jsb_chorales(split: str) -> Dict[str, torch.Tensor]:
    """
    Load one split of the JSB Chorales data set in Pyro's tensor format.

    :param str split: one of ``"train"``, ``"valid"``, ``"test"``.
    :return: a dict with ``"sequences"``, a ``(N, T_max, 88)`` tensor of the default float dtype
        holding 0/1 piano rolls padded with zeros after each sequence's end, and
        ``"sequence_lengths"``, a ``(N,)`` ``torch.long`` tensor. Fresh tensors on every call.
    :rtype: dict
    :raises ValueError: if ``split`` is not a known split.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    raw = _raw_jsb_chorales()[split]
    lengths = torch.tensor([len(seq) for seq in raw], dtype=torch.long)
    t_max = int(lengths.max())
    n_idx: List[int] = []
    t_idx: List[int] = []
    p_idx: List[int] = []
    for n, seq in enumerate(raw):
        for t, step in enumerate(seq):
            for pitch in step:
                n_idx.append(n)
                t_idx.append(t)
                p_idx.append(int(pitch) - MIN_NOTE)
    sequences = torch.zeros(len(raw), t_max, NOTE_RANGE)
    sequences[n_idx, t_idx, p_idx] = 1.0
    return {"sequences": sequences, "sequence_lengths": lengths}


def get_mini_batch_mask(mini_batch: torch.Tensor, seq_lengths: torch.Tensor) -> torch.Tensor:
    """
    A 0/1 mask marking the valid time steps of a padded mini-batch.

    :param torch.Tensor mini_batch: a ``(B, T, ...)`` tensor.
    :param torch.Tensor seq_lengths: the ``(B,)`` sequence lengths.
    :return: a ``(B, T)`` float tensor with ``mask[b, t] = 1`` iff ``t < seq_lengths[b]``.
    :rtype: torch.Tensor
    """
    steps = torch.arange(mini_batch.size(1), device=mini_batch.device)
    mask = steps < seq_lengths.to(mini_batch.device).unsqueeze(-1)
    return mask.to(torch.get_default_dtype())


def reverse_sequences(mini_batch: torch.Tensor, seq_lengths: torch.Tensor) -> torch.Tensor:
    """
    Reverse each sequence of a padded mini-batch in time, within its own length.

    ``out[b, t] = mini_batch[b, seq_lengths[b] - 1 - t]`` for ``t < seq_lengths[b]``; the padding
    after each sequence stays zero.

    :param torch.Tensor mini_batch: a ``(B, T, D)`` tensor.
    :param torch.Tensor seq_lengths: the ``(B,)`` sequence lengths, each at most ``T``.
    :return: a new ``(B, T, D)`` tensor.
    :rtype: torch.Tensor
    """
    batch_size, t_max = mini_batch.shape[:2]
    lengths = seq_lengths.to(mini_batch.device).unsqueeze(-1)
    steps = torch.arange(t_max, device=mini_batch.device).expand(batch_size, t_max)
    valid = steps < lengths
    source = torch.where(valid, lengths - 1 - steps, steps)
    index = source.unsqueeze(-1).expand_as(mini_batch)
    reversed_mini_batch = mini_batch.gather(1, index)
    return reversed_mini_batch * valid.unsqueeze(-1).to(mini_batch.dtype)


def pad_and_reverse(rnn_output: PackedSequence, seq_lengths: torch.Tensor) -> torch.Tensor:
    """
    Unpack the output of an RNN run over a packed time-reversed mini-batch and reverse it back.

    :param torch.nn.utils.rnn.PackedSequence rnn_output: a packed ``(B, T, H)`` batch.
    :param torch.Tensor seq_lengths: the ``(B,)`` sequence lengths.
    :return: a padded ``(B, T, H)`` tensor in forward temporal order.
    :rtype: torch.Tensor
    """
    padded, _ = pad_packed_sequence(rnn_output, batch_first=True)
    return reverse_sequences(padded, seq_lengths)


def get_mini_batch(
    mini_batch_indices: torch.Tensor,
    sequences: torch.Tensor,
    seq_lengths: torch.Tensor,
) -> Tuple[torch.Tensor, PackedSequence, torch.Tensor, torch.Tensor]:
    """
    Prepare a mini-batch for the DMM, as Pyro's ``polyphonic_data_loader.get_mini_batch``.

    The selected sequences are sorted by length (longest first, as packing needs), cut to the
    longest length among them, given a mask built from the lengths, and a time-reversed copy
    (each sequence reversed within its own length) is packed for a guide RNN run backward.

    :param torch.Tensor mini_batch_indices: ``(B,)`` indices into ``sequences``.
    :param torch.Tensor sequences: a ``(N, T_max, D)`` padded tensor.
    :param torch.Tensor seq_lengths: the ``(N,)`` sequence lengths.
    :return: ``(mini_batch, mini_batch_reversed, mini_batch_mask, mini_batch_seq_lengths)``: the
        sorted ``(B, T, D)`` mini-batch, its time-reversed copy as a
        :class:`~torch.nn.utils.rnn.PackedSequence`, the ``(B, T)`` 0/1 mask and the sorted
        ``(B,)`` lengths.
    :rtype: tuple
    """
    mini_batch_indices = torch.as_tensor(mini_batch_indices, dtype=torch.long)
    lengths = seq_lengths[mini_batch_indices]
    sorted_lengths, order = torch.sort(lengths, descending=True, stable=True)
    sorted_indices = mini_batch_indices[order]
    t_max = int(sorted_lengths[0])
    mini_batch = sequences[sorted_indices, :t_max]
    mini_batch_reversed = reverse_sequences(mini_batch, sorted_lengths)
    mini_batch_mask = get_mini_batch_mask(mini_batch, sorted_lengths)
    mini_batch_reversed = pack_padded_sequence(
        mini_batch_reversed, sorted_lengths.cpu(), batch_first=True
    )
    return mini_batch, mini_batch_reversed, mini_batch_mask, sorted_lengths
