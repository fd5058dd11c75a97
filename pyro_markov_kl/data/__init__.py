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

:func:`load_polyphonic_pickle` reads any polyphonic data set in the pickle format of Pyro's loader
(``jsb_chorales.pickle``, ``piano_midi.pickle``, ...) with a restricted unpickler that runs no code
of the file, validates its structure and returns the three splits in the same tensor format.

References:

* N. Boulanger-Lewandowski, Y. Bengio, P. Vincent (2012). Modeling Temporal Dependencies in
  High-Dimensional Sequences: Application to Polyphonic Music Generation and Transcription.
  ICML 2012.
* R. G. Krishnan, U. Shalit, D. Sontag (2017). Structured Inference Networks for Nonlinear State
  Space Models. AAAI 2017.
"""

import functools
import json
import os
import pickle
import sys
from importlib import resources
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

__all__ = [
    "JSB_CHORALES_SHA256",
    "MIN_NOTE",
    "MAX_NOTE",
    "NOTE_RANGE",
    "SPLITS",
    "PolyphonicDataError",
    "bucket_length",
    "bucket_lengths",
    "get_mini_batch",
    "get_mini_batch_mask",
    "length_buckets",
    "length_grouped_batches",
    "load_jsb_chorales",
    "load_polyphonic_pickle",
    "read_polyphonic_pickle",
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
    return _split_to_tensors(_raw_jsb_chorales()[split])


def _split_to_tensors(raw: Sequence[Sequence[Sequence[int]]]) -> Dict[str, torch.Tensor]:
    """Piano rolls and lengths of one split given as sequences of steps of MIDI pitches."""
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


def pad_and_reverse(
    rnn_output: PackedSequence, seq_lengths: torch.Tensor, total_length: Optional[int] = None
) -> torch.Tensor:
    """
    Unpack the output of an RNN run over a packed time-reversed mini-batch and reverse it back.

    :param torch.nn.utils.rnn.PackedSequence rnn_output: a packed ``(B, T, H)`` batch.
    :param torch.Tensor seq_lengths: the ``(B,)`` sequence lengths.
    :param int total_length: pad the output to this many steps (default: the longest sequence),
        e.g. for a mini-batch padded by ``get_mini_batch(..., pad_to=...)``.
    :return: a padded ``(B, T, H)`` tensor in forward temporal order.
    :rtype: torch.Tensor
    """
    padded, _ = pad_packed_sequence(rnn_output, batch_first=True, total_length=total_length)
    return reverse_sequences(padded, seq_lengths)


def get_mini_batch(
    mini_batch_indices: torch.Tensor,
    sequences: torch.Tensor,
    seq_lengths: torch.Tensor,
    pack: bool = True,
    pad_to: Optional[int] = None,
    pad_batch_to: Optional[int] = None,
) -> Tuple[torch.Tensor, Union[PackedSequence, torch.Tensor], torch.Tensor, torch.Tensor]:
    """
    Prepare a mini-batch for the DMM, as Pyro's ``polyphonic_data_loader.get_mini_batch``.

    The selected sequences are sorted by length (longest first, as packing needs), cut to the
    longest length among them, given a mask built from the lengths, and a time-reversed copy
    (each sequence reversed within its own length) is packed for a guide RNN run backward.

    :param torch.Tensor mini_batch_indices: ``(B,)`` indices into ``sequences``.
    :param torch.Tensor sequences: a ``(N, T_max, D)`` padded tensor.
    :param torch.Tensor seq_lengths: the ``(N,)`` sequence lengths.
    :param bool pack: pack the time-reversed copy (as Pyro's loader); with ``False`` it stays a
        zero-padded ``(B, T, D)`` tensor, so that all four values are tensors (as
        :func:`torch.jit.trace` needs).
    :param int pad_to: if given, pad the mini-batch (and its reversed copy and mask) with zeros
        after its longest sequence up to this many steps, e.g. to a bucket length of
        :func:`bucket_lengths` so that a compiled loss sees a few shapes only. The mask is zero
        on the padded steps, which the DMM masks out (``poutine.mask`` / ``.mask``).
    :param int pad_batch_to: if given, append empty sequences (length 0, all zeros, mask zero)
        up to this many, e.g. so that the last, smaller mini-batch of an epoch has the shape of
        the others (``pack=False`` only: a packed sequence cannot hold empty sequences).
    :return: ``(mini_batch, mini_batch_reversed, mini_batch_mask, mini_batch_seq_lengths)``: the
        sorted ``(B, T, D)`` mini-batch, its time-reversed copy as a
        :class:`~torch.nn.utils.rnn.PackedSequence` (or a padded tensor), the ``(B, T)`` 0/1 mask
        and the sorted ``(B,)`` lengths, on the device of ``sequences``.
    :rtype: tuple
    """
    mini_batch_indices = torch.as_tensor(
        mini_batch_indices, dtype=torch.long, device=seq_lengths.device
    )
    lengths = seq_lengths[mini_batch_indices]
    sorted_lengths, order = torch.sort(lengths, descending=True, stable=True)
    sorted_indices = mini_batch_indices[order]
    t_max = int(sorted_lengths[0])
    mini_batch = sequences[sorted_indices, :t_max]
    if pad_to is not None:
        if pad_to < t_max:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest sequence ({t_max})")
        if pad_to > t_max:
            mini_batch = torch.nn.functional.pad(mini_batch, (0, 0, 0, pad_to - t_max))
    if pad_batch_to is not None and pad_batch_to > len(sorted_lengths):
        if pack:
            raise ValueError("pad_batch_to needs pack=False: a packed batch has no empty sequences")
        extra = pad_batch_to - len(sorted_lengths)
        mini_batch = torch.nn.functional.pad(mini_batch, (0, 0, 0, 0, 0, extra))
        sorted_lengths = torch.nn.functional.pad(sorted_lengths, (0, extra))
    mini_batch_reversed = reverse_sequences(mini_batch, sorted_lengths)
    mini_batch_mask = get_mini_batch_mask(mini_batch, sorted_lengths)
    if not pack:
        return mini_batch, mini_batch_reversed, mini_batch_mask, sorted_lengths
    mini_batch_reversed = pack_padded_sequence(
        mini_batch_reversed, sorted_lengths.cpu(), batch_first=True
    )
    return mini_batch, mini_batch_reversed, mini_batch_mask, sorted_lengths


def bucket_lengths(max_length: int, num_buckets: int) -> List[int]:
    """
    A handful of padded lengths for mini-batches whose longest sequence has at most
    ``max_length`` steps: ``max_length``, ``max_length - w``, ``max_length - 2 w``, ... (positive
    ones, at most ``num_buckets``) with ``w = ceil(max_length / num_buckets)``.

    Padding every mini-batch to the next bucket length (:func:`bucket_length`) bounds the number
    of distinct mini-batch shapes, hence of graphs a compiled loss traces, by ``num_buckets``, at
    the cost of fewer than ``w`` padded (masked) steps per mini-batch.

    :param int max_length: the longest sequence length (the last bucket).
    :param int num_buckets: the largest number of buckets (at least 1).
    :return: the bucket lengths, ascending.
    :rtype: list
    """
    if max_length < 1 or num_buckets < 1:
        raise ValueError(
            f"need max_length >= 1 and num_buckets >= 1, got {max_length}, {num_buckets}"
        )
    width = -(-max_length // num_buckets)
    return sorted(max_length - k * width for k in range(num_buckets) if max_length - k * width > 0)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """
    The smallest of the ``buckets`` (ascending lengths, see :func:`bucket_lengths`) that is at
    least ``length``.

    :raises ValueError: if ``length`` exceeds every bucket.
    """
    for bucket in buckets:
        if bucket >= length:
            return bucket
    raise ValueError(
        f"a sequence of {length} steps is longer than the largest bucket {max(buckets)}"
    )


def length_buckets(
    lengths: Union[Sequence[int], torch.Tensor], batch_size: int, num_buckets: int
) -> List[int]:
    """
    Bucket lengths for mini-batches of sequences of similar length (:func:`length_grouped_batches`),
    chosen to minimise the padded steps of an epoch.

    The sequences sorted by length are cut into at most ``num_buckets`` contiguous groups; a group
    of ``n`` sequences whose longest has ``L`` steps makes ``ceil(n / batch_size)`` mini-batches
    padded to ``L`` steps (and to ``batch_size`` sequences), so an epoch costs

    .. math::

        \\sum_b \\lceil n_b / B \\rceil \\, L_b

    padded sequence-steps per sequence slot, which a dynamic programme over the sorted lengths
    minimises exactly. On JSB's training split (mini-batches of 20, 4 buckets: 52, 65, 88 and 129
    steps) an epoch has 825 padded steps per sequence slot, 43% fewer than the about 1450 of
    mini-batches drawn at random and padded to the evenly spaced :func:`bucket_lengths`.

    :param lengths: the sequence lengths (positive integers), a sequence or a tensor.
    :param int batch_size: the sequences per mini-batch.
    :param int num_buckets: the largest number of buckets (at least 1).
    :return: the bucket lengths, ascending; the last is the longest sequence length.
    :rtype: list
    """
    if batch_size < 1 or num_buckets < 1:
        raise ValueError(
            f"need batch_size >= 1 and num_buckets >= 1, got {batch_size}, {num_buckets}"
        )
    values = lengths.tolist() if torch.is_tensor(lengths) else list(lengths)
    if any(int(length) != length for length in values):
        raise ValueError(f"sequence lengths must be integers, got {values}")
    ordered = sorted(int(length) for length in values)
    if not ordered or ordered[0] < 1:
        raise ValueError("need at least one sequence, each of positive length")
    n = len(ordered)
    # more buckets than distinct lengths cannot help
    num_buckets = min(num_buckets, len(set(ordered)))
    inf = float("inf")
    # cost[k][j]: least cost of the first j sequences in k buckets; cut[k][j]: where the last starts
    cost = [[inf] * (n + 1) for _ in range(num_buckets + 1)]
    cut = [[0] * (n + 1) for _ in range(num_buckets + 1)]
    cost[0][0] = 0.0
    # a bucket holds every sequence of the lengths it spans: cuts fall between distinct lengths
    ends = [j for j in range(1, n + 1) if j == n or ordered[j - 1] < ordered[j]]
    starts = [0] + ends[:-1]
    for k in range(1, num_buckets + 1):
        for j in ends:
            for i in starts:
                if i >= j:
                    break
                if cost[k - 1][i] == inf:
                    continue
                c = cost[k - 1][i] + -(-(j - i) // batch_size) * ordered[j - 1]
                if c < cost[k][j]:
                    cost[k][j], cut[k][j] = c, i
    best = min(range(1, num_buckets + 1), key=lambda k: (cost[k][n], k))
    bounds, j = [], n
    for k in range(best, 0, -1):
        bounds.append(ordered[j - 1])
        j = cut[k][j]
    return sorted(set(bounds))


def length_grouped_batches(
    lengths: Union[Sequence[int], torch.Tensor], buckets: Sequence[int], batch_size: int
) -> List[torch.Tensor]:
    """
    One epoch of mini-batches, each drawn from one length bucket.

    Every sequence goes to the smallest bucket at least as long (:func:`bucket_length`); the
    sequences of each bucket are shuffled and cut into mini-batches of ``batch_size`` (the last
    of a bucket may be smaller), and the mini-batches are shuffled. Each sequence is in exactly
    one mini-batch per epoch, as with mini-batches drawn at random, but a mini-batch holds
    sequences of similar length, so that padding it to its longest sequence, or to its bucket's
    length, wastes few steps. The random numbers come from torch's global generator (CPU), so
    :func:`pyro.set_rng_seed` makes the epochs reproducible.

    :param lengths: the ``(N,)`` sequence lengths (a tensor or a sequence of integers).
    :param buckets: the bucket lengths, strictly ascending (e.g. of :func:`length_buckets`).
    :param int batch_size: the largest number of sequences per mini-batch.
    :return: the ``(B,)`` index tensors of the mini-batches, on the CPU.
    :rtype: list
    :raises ValueError: for a batch size below 1, buckets that are not strictly ascending
        positive lengths, a length below 1 or one longer than the largest bucket.
    """
    if batch_size < 1:
        raise ValueError(f"need batch_size >= 1, got {batch_size}")
    buckets = list(buckets)
    if not buckets or buckets[0] < 1 or any(a >= b for a, b in zip(buckets, buckets[1:])):
        raise ValueError(f"buckets must be strictly ascending positive lengths, got {buckets}")
    values = torch.as_tensor(lengths).tolist()
    if any(length < 1 for length in values):
        raise ValueError("every sequence length must be at least 1")
    members: Dict[int, List[int]] = {bucket: [] for bucket in buckets}
    for index, length in enumerate(values):
        members[bucket_length(int(length), buckets)].append(index)
    batches = []
    for bucket in buckets:
        indices = torch.tensor(members[bucket], dtype=torch.long)
        if len(indices):
            batches.extend(indices[torch.randperm(len(indices))].split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches)).tolist()]


# --- Pyro's pickle format -------------------------------------------------------------------------


class PolyphonicDataError(ValueError):
    """A polyphonic data file is not in the pickle format of Pyro's loader (or is hostile)."""


#: The highest MIDI pitch of the piano (C8), stored in column ``NOTE_RANGE - 1``.
MAX_NOTE = MIN_NOTE + NOTE_RANGE - 1

# numpy integer dtypes that a pitch may be stored as, by their pickled names
_INT_DTYPES = {
    "i1": (1, True),
    "i2": (2, True),
    "i4": (4, True),
    "i8": (8, True),
    "u1": (1, False),
    "u2": (2, False),
    "u4": (4, False),
    "u8": (8, False),
}


class _IntDType:
    """
    An inert stand-in for ``numpy.dtype`` of an integer type, as pickled inside numpy scalars:
    ``dtype(name, align, copy)`` then ``__setstate__((version, byteorder, ...))``. No numpy code
    runs; anything but a plain integer dtype is refused.
    """

    def __init__(self, name: Any = None, align: Any = 0, copy: Any = 1) -> None:
        if isinstance(name, bytes):
            name = name.decode("latin1")
        if not isinstance(name, str) or name not in _INT_DTYPES:
            raise pickle.UnpicklingError(
                f"a numpy scalar of dtype {name!r}; pitches must be integers "
                f"(one of {sorted(_INT_DTYPES)})"
            )
        self.itemsize, self.signed = _INT_DTYPES[name]
        self.byteorder = "little" if self.itemsize == 1 else "native"

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 2:
            raise pickle.UnpicklingError(f"an unexpected numpy dtype state {state!r}")
        order = state[1].decode("latin1") if isinstance(state[1], bytes) else state[1]
        orders = {"<": "little", ">": "big", "|": "little", "=": "native"}
        if order not in orders:
            raise pickle.UnpicklingError(f"an unexpected numpy byte order {order!r}")
        self.byteorder = orders[order]


def _int_scalar(dtype: Any, data: Any) -> int:
    """An inert stand-in for ``numpy.core.multiarray.scalar``: decode an integer, nothing else."""
    if not isinstance(dtype, _IntDType):
        raise pickle.UnpicklingError("a numpy scalar without an integer dtype")
    if isinstance(data, str):  # protocol-2 bytes read by Python 3 with encoding="latin1"
        data = data.encode("latin1")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError("a numpy scalar whose data does not match its dtype")
    order = dtype.byteorder
    if order == "native":
        order = sys.byteorder
    return int.from_bytes(data, order, signed=dtype.signed)


def _latin1_encode(text: Any, encoding: Any = "latin1") -> bytes:
    """An inert stand-in for ``_codecs.encode``, which Python 3 pickles bytes with (protocol 2)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("an unexpected call of _codecs.encode")
    return text.encode("latin1")


class _RestrictedUnpickler(pickle.Unpickler):
    """
    Unpickles only what Pyro's polyphonic format holds: dicts, lists, tuples, strings and
    integers (pickle opcodes, no code) and numpy integer scalars (and the byte strings inside
    them), which map to the inert stand-ins above. Every other global (``os.system``,
    ``builtins.eval``, any class) is refused before it is looked up, so nothing the file names
    is ever imported or called.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "scalar"): _int_scalar,
        ("numpy._core.multiarray", "scalar"): _int_scalar,
        ("numpy", "dtype"): _IntDType,
        ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load the global {module}.{name} (only numpy integer scalars are "
                "allowed in a polyphonic data pickle)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a persistent id (not part of the format)")


def _check_polyphonic(data: Any) -> Dict[str, List[List[List[int]]]]:
    """Validate the unpickled structure; return it as plain lists of lists of ints."""
    if not isinstance(data, dict):
        raise PolyphonicDataError(
            f"the top level is a {type(data).__name__}, expected a dict with keys {SPLITS}"
        )
    if set(data) != set(SPLITS):
        raise PolyphonicDataError(
            f"the keys are {sorted(map(repr, data))}, expected exactly {list(SPLITS)}"
        )
    checked: Dict[str, List[List[List[int]]]] = {}
    for split in SPLITS:
        sequences = data[split]
        if not isinstance(sequences, (list, tuple)) or not sequences:
            raise PolyphonicDataError(
                f"split {split!r} is a {type(sequences).__name__}"
                f"{' (empty)' if isinstance(sequences, (list, tuple)) else ''}, "
                "expected a non-empty list of sequences"
            )
        out_split = []
        for n, seq in enumerate(sequences):
            where = f"split {split!r}, sequence {n}"
            if not isinstance(seq, (list, tuple)) or not seq:
                raise PolyphonicDataError(
                    f"{where} is not a non-empty list of time steps (got {type(seq).__name__})"
                )
            out_seq = []
            for t, step in enumerate(seq):
                if not isinstance(step, (list, tuple)):
                    raise PolyphonicDataError(
                        f"{where}, step {t} is a {type(step).__name__}, expected a tuple of "
                        "MIDI pitches"
                    )
                for pitch in step:
                    if type(pitch) is not int:
                        raise PolyphonicDataError(
                            f"{where}, step {t} holds {pitch!r} ({type(pitch).__name__}), "
                            "expected integer MIDI pitches"
                        )
                    if not MIN_NOTE <= pitch <= MAX_NOTE:
                        raise PolyphonicDataError(
                            f"{where}, step {t} holds the pitch {pitch}, outside the piano's "
                            f"range {MIN_NOTE}..{MAX_NOTE}"
                        )
                out_seq.append(list(step))
            out_split.append(out_seq)
        checked[split] = out_split
    return checked


def read_polyphonic_pickle(
    path: Union[str, "os.PathLike[str]"],
) -> Dict[str, List[List[List[int]]]]:
    """
    Read a polyphonic data set in the pickle format of Pyro's loader, safely.

    The file is read by a restricted unpickler that runs none of its code: only dicts, lists,
    tuples, strings, integers and numpy integer scalars (decoded without numpy) are accepted;
    any other global, such as the callable of a hostile ``__reduce__``, is refused before it is
    imported. The structure is then validated: a dict with exactly the splits ``train``,
    ``valid``, ``test``, each a non-empty list of non-empty sequences of time steps, each step a
    tuple of integer MIDI pitches in ``21..108``.

    :param path: the ``.pickle`` file.
    :return: ``{split: [[[pitch, ...], ...], ...]}`` as plain Python lists and ints.
    :rtype: dict
    :raises PolyphonicDataError: naming the file and what is wrong with it.
    """
    try:
        with open(path, "rb") as f:
            data = _RestrictedUnpickler(f, encoding="latin1").load()
    except OSError as e:
        raise PolyphonicDataError(f"cannot read the polyphonic data file {path}: {e}") from e
    except PolyphonicDataError:
        raise
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ... from a bad file
        raise PolyphonicDataError(
            f"{path} is not a polyphonic data pickle in the format of Pyro's loader: "
            f"{type(e).__name__}: {e}"
        ) from e
    try:
        return _check_polyphonic(data)
    except PolyphonicDataError as e:
        raise PolyphonicDataError(
            f"{path} is not a polyphonic data set in the format of Pyro's loader: {e}"
        ) from None


def load_polyphonic_pickle(
    path: Union[str, "os.PathLike[str]"],
) -> Dict[str, Dict[str, torch.Tensor]]:
    """
    Load all three splits of a polyphonic data pickle (see :func:`read_polyphonic_pickle`) in the
    tensor format of :func:`load_jsb_chorales`.

    :param path: the ``.pickle`` file, e.g. Pyro's ``jsb_chorales.pickle``.
    :return: ``{split: {"sequences": ..., "sequence_lengths": ...}}`` for ``train``, ``valid``,
        ``test``.
    :rtype: dict
    :raises PolyphonicDataError: if the file is unreadable, hostile or malformed.
    """
    raw = read_polyphonic_pickle(path)
    return {split: _split_to_tensors(raw[split]) for split in SPLITS}
