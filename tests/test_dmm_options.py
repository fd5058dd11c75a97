# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""Tests of the DMM example's options for parity with Pyro's (issue 14): data, IAF, checkpoints,
device and JIT, on tiny configurations."""

import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from pyro_markov_kl.data import (
    MIN_NOTE,
    SPLITS,
    PolyphonicDataError,
    _raw_jsb_chorales,
    load_jsb_chorales,
    load_polyphonic_pickle,
    read_polyphonic_pickle,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
# the shared data directory sits beside the repository (CI: ../shared)
SHARED_PICKLE = REPO_ROOT.parent / "shared" / "data" / "polyphonic" / "jsb_chorales.pickle"


# --- --data: Pyro's pickle format, read safely ----------------------------------------------------


@pytest.mark.skipif(not SHARED_PICKLE.exists(), reason=f"{SHARED_PICKLE} is absent")
def test_shared_pickle_matches_bundled_json() -> None:
    raw = read_polyphonic_pickle(SHARED_PICKLE)
    assert raw == _raw_jsb_chorales()
    data = load_polyphonic_pickle(SHARED_PICKLE)
    for split in SPLITS:
        expected = load_jsb_chorales(split)
        assert torch.equal(data[split]["sequences"], expected["sequences"])
        assert torch.equal(data[split]["sequence_lengths"], expected["sequence_lengths"])


def _write(path: Path, obj: Any, protocol: int = 2) -> Path:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


def _write_marker(path: str) -> None:  # pragma: no cover - must never run
    Path(path).write_text("ran")


class _Hostile:
    def __init__(self, fn: Any, arg: str) -> None:
        self.fn, self.arg = fn, arg

    def __reduce__(self) -> Any:
        return (self.fn, (self.arg,))


@pytest.mark.parametrize("where", ["top", "nested"])
@pytest.mark.parametrize("fn", ["marker", "os.system"])
def test_hostile_pickle_never_runs(tmp_path: Path, where: str, fn: str) -> None:
    marker = tmp_path / "marker"
    payload = (
        _Hostile(_write_marker, str(marker))
        if fn == "marker"
        else _Hostile(os.system, f"touch {marker}")
    )
    obj: Any = payload
    if where == "nested":
        obj = {"train": [[(60, 64), payload]], "valid": [[(60,)]], "test": [[(60,)]]}
    path = _write(tmp_path / "hostile.pickle", obj)
    with pytest.raises(PolyphonicDataError, match="refused to load the global") as info:
        load_polyphonic_pickle(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "obj, what",
    [
        ([1, 2], "top level is a list"),
        ({"train": [], "valid": [], "tests": []}, "expected exactly"),
        ({"train": [], "valid": [[(60,)]], "test": [[(60,)]]}, "split 'train'.*non-empty"),
        ({"train": [[]], "valid": [[(60,)]], "test": [[(60,)]]}, "sequence 0 is not"),
        ({"train": [[60]], "valid": [[(60,)]], "test": [[(60,)]]}, "step 0 is a int"),
        ({"train": [[(60, 2.5)]], "valid": [[(60,)]], "test": [[(60,)]]}, "2.5"),
        ({"train": [[(60,)]], "valid": [[(60,)]], "test": [[(60,), (120,)]]}, "pitch 120"),
        ({"train": [[(60,)]], "valid": [[(60,)]], "test": [[(True,)]]}, "integer MIDI"),
    ],
)
def test_malformed_pickle_clear_error(tmp_path: Path, obj: Any, what: str) -> None:
    path = _write(tmp_path / "bad.pickle", obj)
    with pytest.raises(PolyphonicDataError, match=what) as info:
        load_polyphonic_pickle(path)
    assert str(path) in str(info.value)


def test_not_a_pickle_or_missing(tmp_path: Path) -> None:
    path = tmp_path / "junk.pickle"
    path.write_bytes(b"\x80\x02}q\x01(U")  # truncated
    with pytest.raises(PolyphonicDataError, match="junk.pickle"):
        load_polyphonic_pickle(path)
    with pytest.raises(PolyphonicDataError, match="cannot read"):
        load_polyphonic_pickle(tmp_path / "absent.pickle")


def test_numpy_int_pickle_and_plain_ints(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    seqs = {
        "train": [[(np.int64(60), np.int32(64)), ()], [(np.uint8(21), np.int16(108))]],
        "valid": [[(60,)]],
        "test": [[(np.int64(72),)]],
    }
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        raw = read_polyphonic_pickle(_write(tmp_path / f"p{protocol}.pickle", seqs, protocol))
        assert raw["train"] == [[[60, 64], []], [[21, 108]]]
        assert all(type(p) is int for p in raw["train"][0][0])


def test_numpy_float_scalar_refused(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    obj = {"train": [[(np.float64(60.0),)]], "valid": [[(60,)]], "test": [[(60,)]]}
    with pytest.raises(PolyphonicDataError, match="pitches must be integers"):
        load_polyphonic_pickle(_write(tmp_path / "f.pickle", obj))


# --- the example's options on a tiny data set -----------------------------------------------------

# every run below reads this tiny data set through --data: 5 short training sequences, 2 + 2 others
TINY_SIZES = ["--z-dim", "3", "--emission-dim", "6", "--transition-dim", "6", "--rnn-dim", "6"]
TINY_RUN = ["-b", "2", "--num-threads", "0", "--annealing-epochs", "3"] + TINY_SIZES


def _tiny_split(n: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 3 + i % 3
        seq = []
        for _ in range(length):
            pitches = torch.randint(
                MIN_NOTE, MIN_NOTE + 88, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g
            )
            seq.append(tuple(sorted(set(int(p) for p in pitches))))
        out.append(seq)
    return out


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    data = {"train": _tiny_split(5, 0), "valid": _tiny_split(2, 1), "test": _tiny_split(2, 2)}
    return _write(tmp_path / "tiny.pickle", data)


def _run(tiny_data: Path, *extra: str) -> dict:
    from pyro_markov_kl.examples.dmm import main

    return main(TINY_RUN + ["--data", str(tiny_data)] + list(extra))


def test_data_option(tiny_data: Path) -> None:
    result = _run(tiny_data, "-n", "1", "--elbo", "trace")
    raw = read_polyphonic_pickle(tiny_data)
    assert result["num_train_slices"] == sum(len(s) for s in raw["train"])
    assert result["num_test_slices"] == sum(len(s) for s in raw["test"])
    assert len(result["train_losses_per_slice"]) == 1


def test_data_option_hostile_file_never_runs(tmp_path: Path) -> None:
    from pyro_markov_kl.examples.dmm import main

    marker = tmp_path / "marker"
    path = _write(tmp_path / "evil.pickle", _Hostile(_write_marker, str(marker)))
    with pytest.raises(PolyphonicDataError, match="evil.pickle.*refused"):
        main(TINY_RUN + ["--data", str(path)])
    assert not marker.exists()
