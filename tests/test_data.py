# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""Tests of the shipped JSB Chorales data and the mini-batch helpers."""

import hashlib
import importlib
import itertools
import math
import sys
import types
from importlib import resources
from pathlib import Path

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from pyro_markov_kl.data import (
    JSB_CHORALES_SHA256,
    bucket_length,
    bucket_lengths,
    get_mini_batch,
    get_mini_batch_mask,
    length_buckets,
    length_grouped_batches,
    load_jsb_chorales,
    pad_and_reverse,
    reverse_sequences,
)

SHAPES = {"train": (229, 129, 88), "valid": (76, 144, 88), "test": (77, 160, 88)}
TOTAL_STEPS = {"train": 13807, "valid": 4602, "test": 4725}
PITCH_RANGE = {"train": (43, 96), "valid": (48, 96), "test": (45, 96)}


def test_shipped_file_is_intact() -> None:
    data = resources.files("pyro_markov_kl.data").joinpath("jsb_chorales.json").read_bytes()
    assert len(data) == 407200
    assert hashlib.sha256(data).hexdigest() == JSB_CHORALES_SHA256


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_shapes_and_statistics(split: str) -> None:
    data = load_jsb_chorales(split)
    sequences, lengths = data["sequences"], data["sequence_lengths"]
    assert sequences.shape == SHAPES[split]
    assert sequences.dtype == torch.get_default_dtype()
    assert lengths.dtype == torch.long
    assert lengths.shape == SHAPES[split][:1]
    assert int(lengths.sum()) == TOTAL_STEPS[split]
    assert int(lengths.max()) == SHAPES[split][1]
    # 0/1 piano rolls with at most 4 notes at once
    assert set(sequences.unique().tolist()) == {0.0, 1.0}
    assert int(sequences.sum(-1).max()) == 4
    # MIDI pitch = column + 21
    columns = sequences.sum((0, 1)).nonzero().squeeze(-1)
    assert (int(columns.min()) + 21, int(columns.max()) + 21) == PITCH_RANGE[split]
    # padding is zero, first and last steps of every sequence sound
    mask = get_mini_batch_mask(sequences, lengths).bool()
    assert not sequences[~mask].any()
    rows = torch.arange(len(lengths))
    assert (sequences[rows, 0].sum(-1) > 0).all()
    assert (sequences[rows, lengths - 1].sum(-1) > 0).all()


def test_train_first_steps() -> None:
    sequences = load_jsb_chorales("train")["sequences"]
    # first chorale opens with MIDI pitches 60, 72, 79, 88
    assert sequences[0, 0].nonzero().squeeze(-1).tolist() == [60 - 21, 72 - 21, 79 - 21, 88 - 21]


def test_fresh_tensors() -> None:
    a = load_jsb_chorales("valid")
    a["sequences"].zero_()
    b = load_jsb_chorales("valid")
    assert int(b["sequences"].sum()) > 0


def test_unknown_split() -> None:
    with pytest.raises(ValueError):
        load_jsb_chorales("validation")


def test_mask_from_lengths() -> None:
    x = torch.zeros(3, 5, 2)  # all zero rows: the mask must not look at the data
    mask = get_mini_batch_mask(x, torch.tensor([5, 2, 1]))
    expected = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]).float()
    assert torch.equal(mask, expected)


def _reverse_reference(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    for b in range(x.size(0)):
        T = int(lengths[b])
        out[b, :T] = x[b, :T].flip(0)
    return out


def test_reverse_sequences() -> None:
    torch.manual_seed(0)
    lengths = torch.tensor([6, 4, 4, 1])
    x = torch.randn(4, 6, 3) * get_mini_batch_mask(torch.zeros(4, 6), lengths).unsqueeze(-1)
    r = reverse_sequences(x, lengths)
    assert torch.equal(r, _reverse_reference(x, lengths))
    assert torch.equal(r[1, :4], x[1, :4].flip(0))
    assert torch.equal(reverse_sequences(r, lengths), x)


def test_get_mini_batch() -> None:
    data = load_jsb_chorales("train")
    sequences, lengths = data["sequences"], data["sequence_lengths"]
    indices = torch.tensor([5, 17, 0, 101, 228, 42, 3])
    mini_batch, reversed_packed, mask, mb_lengths = get_mini_batch(indices, sequences, lengths)
    # sorted longest first, cut to the longest
    assert torch.equal(mb_lengths, lengths[indices].sort(descending=True).values)
    T = int(mb_lengths[0])
    assert mini_batch.shape == (len(indices), T, 88)
    # every row is one of the selected sequences with the right length
    for b in range(len(indices)):
        assert any(
            int(lengths[i]) == int(mb_lengths[b]) and torch.equal(sequences[i, :T], mini_batch[b])
            for i in indices
        )
    # mask from the lengths
    assert torch.equal(mask, get_mini_batch_mask(mini_batch, mb_lengths))
    assert torch.equal(mask.sum(-1).long(), mb_lengths)
    # the packed reversed batch holds each sequence reversed within its own length
    assert isinstance(reversed_packed, PackedSequence)
    padded, unpacked_lengths = pad_packed_sequence(reversed_packed, batch_first=True)
    assert torch.equal(unpacked_lengths, mb_lengths)
    assert torch.equal(padded, _reverse_reference(mini_batch, mb_lengths))
    assert torch.equal(pad_and_reverse(reversed_packed, mb_lengths), mini_batch)


def test_pad_to_bucket_length() -> None:
    data = load_jsb_chorales("train")
    sequences, lengths = data["sequences"], data["sequence_lengths"]
    indices = torch.tensor([5, 17, 0])
    plain = get_mini_batch(indices, sequences, lengths, pack=False)
    T = plain[0].size(1)
    padded = get_mini_batch(indices, sequences, lengths, pack=False, pad_to=T + 7)
    assert padded[0].shape == (3, T + 7, 88)
    for a, b in zip(plain, padded):  # the same batch, followed by zeros
        assert torch.equal(b[:, :T] if b.dim() > 1 else b, a)
    for b in padded[:3]:
        assert not b[:, T:].any()
    # the packed copy unpacks to the padded length
    packed = get_mini_batch(indices, sequences, lengths, pad_to=T + 7)
    assert torch.equal(pad_and_reverse(packed[1], packed[3], T + 7), padded[0])
    with pytest.raises(ValueError, match="shorter than the longest"):
        get_mini_batch(indices, sequences, lengths, pad_to=T - 1)


@pytest.mark.parametrize("max_length, num_buckets", [(129, 8), (129, 1), (5, 3), (3, 10)])
def test_bucket_lengths(max_length: int, num_buckets: int) -> None:
    buckets = bucket_lengths(max_length, num_buckets)
    assert 1 <= len(buckets) <= num_buckets
    assert buckets == sorted(set(buckets)) and buckets[-1] == max_length and buckets[0] >= 1
    width = -(-max_length // num_buckets)
    for length in range(1, max_length + 1):
        b = bucket_length(length, buckets)
        assert b in buckets and length <= b < length + width
    with pytest.raises(ValueError, match="longer than the largest bucket"):
        bucket_length(max_length + 1, buckets)


def _padded_steps(lengths: list, buckets: list, batch_size: int) -> int:
    # an epoch's padded sequence-steps per slot: ceil(n_b / B) mini-batches of each bucket's length
    sizes = [sum(bucket_length(n, buckets) == b for n in lengths) for b in buckets]
    return sum(math.ceil(n / batch_size) * b for n, b in zip(sizes, buckets))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("batch_size, num_buckets", [(1, 2), (2, 3), (3, 2), (4, 4)])
def test_length_buckets_minimise_padded_steps(seed: int, batch_size: int, num_buckets: int) -> None:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g)
    lengths = lengths.tolist()
    buckets = length_buckets(lengths, batch_size, num_buckets)
    assert 1 <= len(buckets) <= num_buckets and buckets == sorted(set(buckets))
    assert buckets[-1] == max(lengths) and set(buckets) <= set(lengths)
    # against every choice of at most num_buckets bucket lengths among the lengths present
    distinct = sorted(set(lengths))
    best = min(
        _padded_steps(lengths, list(lower) + [distinct[-1]], batch_size)
        for k in range(num_buckets)
        for lower in itertools.combinations(distinct[:-1], k)
    )
    assert _padded_steps(lengths, buckets, batch_size) == best


def test_length_buckets_on_jsb() -> None:
    lengths = load_jsb_chorales("train")["sequence_lengths"].tolist()
    buckets = length_buckets(lengths, 20, 4)
    assert buckets == [52, 65, 88, 129]
    # mini-batches of 20 drawn at random are nearly all padded to the top even bucket (129)
    assert _padded_steps(lengths, buckets, 20) == 825 < 0.6 * 12 * 129


@pytest.mark.parametrize(
    "args, match",
    [
        (([3, 4], 0, 2), "batch_size >= 1"),
        (([3, 4], 2, 0), "num_buckets >= 1"),
        (([], 2, 2), "at least one sequence"),
        (([3, 0], 2, 2), "positive length"),
        (([2.7, 3.2], 2, 2), "must be integers"),
    ],
)
def test_length_buckets_bad_input(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        length_buckets(*args)


def test_length_grouped_batches() -> None:
    lengths = load_jsb_chorales("train")["sequence_lengths"]
    buckets = length_buckets(lengths.tolist(), 20, 4)
    torch.manual_seed(0)
    epochs = [length_grouped_batches(lengths, buckets, 20) for _ in range(2)]
    for batches in epochs:
        # every sequence once per epoch, in mini-batches of at most 20 from one bucket each
        assert sorted(torch.cat(batches).tolist()) == list(range(len(lengths)))
        assert all(1 <= len(b) <= 20 for b in batches)
        for b in batches:
            assert len({bucket_length(int(n), buckets) for n in lengths[b]}) == 1
        sizes = [sum(bucket_length(int(n), buckets) == k for n in lengths) for k in buckets]
        assert len(batches) == sum(math.ceil(n / 20) for n in sizes)
    # shuffled anew every epoch, reproducibly from torch's seed
    assert [b.tolist() for b in epochs[0]] != [b.tolist() for b in epochs[1]]
    torch.manual_seed(0)
    again = length_grouped_batches(lengths, buckets, 20)
    assert [b.tolist() for b in again] == [b.tolist() for b in epochs[0]]
    with pytest.raises(ValueError, match="batch_size >= 1"):
        length_grouped_batches(lengths, buckets, 0)
    with pytest.raises(ValueError, match="longer than the largest bucket"):
        length_grouped_batches(lengths, buckets[:-1], 20)
    # a list of lengths is taken as the tensor; bad buckets or lengths are refused
    torch.manual_seed(0)
    as_list = length_grouped_batches(lengths.tolist(), buckets, 20)
    assert [b.tolist() for b in as_list] == [b.tolist() for b in epochs[0]]
    for bad in ([52, 52, 129], [129, 52], []):
        with pytest.raises(ValueError, match="strictly ascending"):
            length_grouped_batches(lengths, bad, 20)
    with pytest.raises(ValueError, match="at least 1"):
        length_grouped_batches(torch.tensor([0, 4]), [4], 1)


def test_length_buckets_at_most_one_per_distinct_length() -> None:
    # a huge bucket count is cut to the number of distinct lengths before the search
    lengths = [3, 5, 5, 9] * 50
    assert length_buckets(lengths, 2, 10**9) == [3, 5, 9]


@pytest.fixture
def pyro_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """
    Pyro's ``polyphonic_data_loader``, imported without its import-time side effects: it imports
    ``pyro.contrib.examples.util`` (which needs torchvision) for ``get_data_directory`` and
    creates that directory; a stand-in module points it at a temporary directory.
    """
    util = types.ModuleType("pyro.contrib.examples.util")
    util.get_data_directory = lambda filepath=None: str(tmp_path / ".data")  # type: ignore
    monkeypatch.setitem(sys.modules, "pyro.contrib.examples.util", util)
    monkeypatch.delitem(sys.modules, "pyro.contrib.examples.polyphonic_data_loader", raising=False)
    module = importlib.import_module("pyro.contrib.examples.polyphonic_data_loader")
    monkeypatch.delitem(sys.modules, "pyro.contrib.examples.polyphonic_data_loader")
    return module


def test_helpers_agree_with_pyros_loader(pyro_loader: types.ModuleType) -> None:
    data = load_jsb_chorales("valid")
    sequences, lengths = data["sequences"], data["sequence_lengths"]
    # distinct lengths: Pyro's sort is not stable, ours is (ties keep the order of the indices)
    indices = torch.tensor([3, 1, 7, 8, 5, 60])
    assert len(set(lengths[indices].tolist())) == len(indices)
    ours = get_mini_batch(indices, sequences, lengths)
    theirs = pyro_loader.get_mini_batch(indices, sequences, lengths)
    for a, b in zip(ours[:1] + ours[2:], theirs[:1] + theirs[2:]):
        assert torch.equal(a, b)
    assert torch.equal(ours[1].data, theirs[1].data)
    assert torch.equal(ours[1].batch_sizes, theirs[1].batch_sizes)
    mini_batch, mb_lengths = ours[0], ours[3]
    assert torch.equal(
        reverse_sequences(mini_batch, mb_lengths),
        pyro_loader.reverse_sequences(mini_batch, mb_lengths),
    )
    assert torch.equal(
        get_mini_batch_mask(mini_batch, mb_lengths),
        pyro_loader.get_mini_batch_mask(mini_batch, mb_lengths),
    )
    assert torch.equal(
        pad_and_reverse(ours[1], mb_lengths), pyro_loader.pad_and_reverse(ours[1], mb_lengths)
    )
