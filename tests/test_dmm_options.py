# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""Tests of the DMM example's options for parity with Pyro's (issue 14): data, IAF, checkpoints,
device and JIT, on tiny configurations."""

import math
import os
import pickle
from pathlib import Path
from typing import Any

import pyro
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
TINY_RUN = ["-b", "2", "--num-threads", "0", "--annealing-epochs", "3", "--no-checkpoint"]
TINY_RUN += ["--no-jit"] + TINY_SIZES  # the JIT (on by default) is tested with --jit below


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


# --- --num-iafs / --iaf-dim ---------------------------------------------------------------------


def _tiny_batch(tiny_data: Path, pack: bool = True) -> tuple:
    from pyro_markov_kl.data import get_mini_batch

    train = load_polyphonic_pickle(tiny_data)["train"]
    return get_mini_batch(torch.arange(3), train["sequences"], train["sequence_lengths"], pack=pack)


@pytest.mark.parametrize("guide", ["forward", "backward"])
def test_iaf_sites_fall_back_to_monte_carlo_and_explain_says_why(
    tiny_data: Path, guide: str
) -> None:
    from pyro_markov_kl import TraceMarkovKL_ELBO
    from pyro_markov_kl.examples.dmm import DMM

    pyro.set_rng_seed(0)
    dmm = DMM(z_dim=3, emission_dim=6, transition_dim=6, rnn_dim=6, guide=guide, num_iafs=2)
    batch = _tiny_batch(tiny_data)
    plan = TraceMarkovKL_ELBO(max_plate_nesting=1).explain(dmm.model, dmm.guide, *batch)
    assert plan.sites and all(r.estimator == "mc" for r in plan.sites.values())
    # z_1 has no other reason to be Monte Carlo than the flow: it has no guide parent in the
    # forward guide and no guide descendant in the backward guide (which samples it last)
    first = "z_1"
    assert "no kl_divergence registered for (TransformedDistribution" in plan.sites[first].reason
    assert "TransformedDistribution" in str(plan)
    # without flows the same guide is analytic at that site
    plain = DMM(z_dim=3, emission_dim=6, transition_dim=6, rnn_dim=6, guide=guide)
    plain_plan = TraceMarkovKL_ELBO(max_plate_nesting=1).explain(plain.model, plain.guide, *batch)
    assert plain_plan.sites[first].estimator == "analytic"


def test_iaf_parameters_are_registered_and_train(tiny_data: Path) -> None:
    from pyro.infer import SVI, Trace_ELBO
    from pyro.optim import Adam

    from pyro_markov_kl.examples.dmm import DMM

    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    dmm = DMM(z_dim=3, emission_dim=6, transition_dim=6, rnn_dim=6, num_iafs=2, iaf_dim=4)
    iaf_params = {n: p.detach().clone() for n, p in dmm.named_parameters() if "iafs_modules" in n}
    assert len(iaf_params) > 0 and any(n.startswith("iafs_modules.1.") for n in iaf_params)
    svi = SVI(dmm.model, dmm.guide, Adam({"lr": 0.1}), loss=Trace_ELBO(max_plate_nesting=1))
    svi.step(*_tiny_batch(tiny_data))
    store = pyro.get_param_store()
    assert all(f"dmm$$${n}" in store for n in iaf_params)
    after = dict(dmm.named_parameters())
    assert any(not torch.equal(after[n], v) for n, v in iaf_params.items())


def test_iaf_option_trains(tiny_data: Path) -> None:
    result = _run(tiny_data, "-n", "1", "--num-iafs", "1", "--iaf-dim", "4")
    assert math.isfinite(result["train_loss_per_slice"])
    assert math.isfinite(result["test_nll_per_slice"])


# --- checkpoints -------------------------------------------------------------------------------


@pytest.mark.parametrize("elbo", ["markov-kl", "trace", "markov-kl --jit"])
def test_resumed_run_continues_the_curve(tiny_data: Path, tmp_path: Path, elbo: str) -> None:
    # with --jit, the resumed run compiles its graphs again, on a forked random stream
    common = ["--elbo", *elbo.split(), "--test-frequency", "1", "--seed", "3"]
    straight = _run(tiny_data, "-n", "2", *common)
    first = _run(tiny_data, "-n", "1", "--checkpoint", str(tmp_path / "ck.pt"), *common)
    resumed = _run(tiny_data, "-n", "2", "--resume", str(tmp_path / "ck.pt"), *common)
    assert resumed["start_epoch"] == 1
    assert first["train_losses_per_slice"] == pytest.approx(
        straight["train_losses_per_slice"][:1], rel=1e-6
    )
    assert resumed["train_losses_per_slice"] == pytest.approx(
        straight["train_losses_per_slice"], rel=1e-6
    )
    assert [e["epoch"] for e in resumed["evaluations"]] == [1, 2]
    for a, b in zip(resumed["evaluations"], straight["evaluations"]):
        assert a["test"] == pytest.approx(b["test"], rel=1e-6)
    assert resumed["test_nll_per_slice"] == pytest.approx(straight["test_nll_per_slice"], rel=1e-6)
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert ck["epoch"] == 1 and len(ck["train_losses"]) == 1


def test_resume_finished_run_only_evaluates(tiny_data: Path, tmp_path: Path) -> None:
    path = str(tmp_path / "ck.pt")
    first = _run(tiny_data, "-n", "1", "--elbo", "trace", "--checkpoint", path)
    again = _run(tiny_data, "-n", "1", "--elbo", "trace", "--resume", path)
    assert again["train_losses_per_slice"] == first["train_losses_per_slice"]


def test_pyro_style_save_and_load(tiny_data: Path, tmp_path: Path) -> None:
    model, opt = str(tmp_path / "dmm.pt"), str(tmp_path / "opt.pt")
    _run(tiny_data, "-n", "1", "--elbo", "trace", "--save-model", model, "--save-opt", opt)
    state = torch.load(model, weights_only=True)
    assert all(torch.is_tensor(v) for v in state.values()) and "z_0" in state
    opt_state = torch.load(opt, weights_only=True)
    assert all(k.startswith("dmm$$$") for k in opt_state) and "dmm$$$z_0" in opt_state
    result = _run(tiny_data, "-n", "1", "--elbo", "trace", "-lmod", model, "-lopt", opt)
    assert math.isfinite(result["train_loss_per_slice"])
    # the model of a full checkpoint loads with --load-model too
    full = str(tmp_path / "ck.pt")
    _run(tiny_data, "-n", "1", "--elbo", "trace", "--checkpoint", full)
    _run(tiny_data, "-n", "1", "--elbo", "trace", "--load-model", full, "--load-opt", full)


@pytest.mark.parametrize("flag", ["--resume", "--load-model", "--load-opt"])
def test_hostile_checkpoint_never_runs(tiny_data: Path, tmp_path: Path, flag: str) -> None:
    from pyro_markov_kl.examples.dmm import CheckpointError

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"model": _Hostile(_write_marker, str(marker))}, path)
    with pytest.raises(CheckpointError, match="evil.pt.*weights_only"):
        _run(tiny_data, "-n", "1", "--elbo", "trace", flag, str(path))
    assert not marker.exists()


def test_malformed_checkpoints(tiny_data: Path, tmp_path: Path) -> None:
    from pyro_markov_kl.examples.dmm import CHECKPOINT_FORMAT, CheckpointError

    def resume(obj: Any, *extra: str) -> None:
        path = tmp_path / "ck.pt"
        torch.save(obj, path)
        _run(tiny_data, "-n", "1", "--elbo", "trace", "--resume", str(path), *extra)

    with pytest.raises(CheckpointError, match="not a full DMM checkpoint"):
        resume([1, 2, 3])
    with pytest.raises(CheckpointError, match="bare state_dict.*--load-model"):
        resume({"z_0": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="version"):
        resume({"format": CHECKPOINT_FORMAT, "version": 99})
    with pytest.raises(CheckpointError, match="'epoch' is missing or not"):
        resume({"format": CHECKPOINT_FORMAT, "version": 1, "epoch": "one"})
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        _run(tiny_data, "-n", "1", "--resume", str(tmp_path / "junk.pt"))
    with pytest.raises(CheckpointError, match="cannot read"):
        _run(tiny_data, "-n", "1", "--load-model", str(tmp_path / "absent.pt"))
    # a checkpoint of another model size
    path = str(tmp_path / "small.pt")
    _run(tiny_data, "-n", "1", "--elbo", "trace", "--checkpoint", path)
    with pytest.raises(CheckpointError, match="different model: --z-dim 3"):
        _run(tiny_data, "-n", "2", "--resume", path, "--z-dim", "4")
    with pytest.raises(CheckpointError, match="does not fit this model"):
        _run(tiny_data, "-n", "1", "--load-model", path, "--z-dim", "4")
    with pytest.raises(CheckpointError, match="optimiser state of other parameters"):
        _run(tiny_data, "-n", "1", "--load-opt", path, "--num-iafs", "1")


# --- --device / --cuda -------------------------------------------------------------------------


def test_device_cpu(tiny_data: Path) -> None:
    result = _run(tiny_data, "-n", "1", "--elbo", "trace", "--device", "cpu")
    assert result["device"] == "cpu" and math.isfinite(result["train_loss_per_slice"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
@pytest.mark.parametrize("flags", [["--cuda"], ["--device", "cuda"], ["--device", "cuda:0"]])
def test_cuda_unavailable_clear_error(
    tiny_data: Path, capsys: pytest.CaptureFixture, flags: list
) -> None:
    with pytest.raises(SystemExit):
        _run(tiny_data, "-n", "1", *flags)
    assert "CUDA is not available" in capsys.readouterr().err


def test_bad_device_clear_error(tiny_data: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        _run(tiny_data, "-n", "1", "--device", "gpu7")
    assert "--device gpu7" in capsys.readouterr().err


# --- --jit ---------------------------------------------------------------------------------------


def test_padded_reversed_batch_gives_the_packed_guide(tiny_data: Path) -> None:
    from pyro_markov_kl.examples.dmm import DMM

    dmm = DMM(z_dim=3, emission_dim=6, transition_dim=6, rnn_dim=6)
    traces = []
    for pack in (True, False):
        pyro.set_rng_seed(0)
        traces.append(pyro.poutine.trace(dmm.guide).get_trace(*_tiny_batch(tiny_data, pack)))
    for name, site in traces[0].nodes.items():
        if name.startswith("z_"):
            assert torch.allclose(site["value"], traces[1].nodes[name]["value"], atol=1e-6)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:Failed to verify mean field restriction")  # backward guide
@pytest.mark.parametrize(
    "elbo", ["markov-kl", "trace", "meanfield", "markov-kl --guide backward --num-iafs 1"]
)
def test_jit_trains_one_epoch(tiny_data: Path, elbo: str) -> None:
    result = _run(tiny_data, "-n", "1", "--jit", "--elbo", *elbo.split())
    assert math.isfinite(result["train_loss_per_slice"])
    assert math.isfinite(result["test_nll_per_slice"])


def _bucketed_batch(tiny_data: Path, pad_to: int) -> tuple:
    from pyro_markov_kl.data import get_mini_batch

    train = load_polyphonic_pickle(tiny_data)["train"]
    return get_mini_batch(
        torch.arange(3), train["sequences"], train["sequence_lengths"], pack=False, pad_to=pad_to
    )


@pytest.mark.parametrize("pad", [0, 3])
def test_jit_on_a_bucketed_batch_equals_eager(tiny_data: Path, pad: int) -> None:
    """
    The compiled estimator on the mini-batch padded to a bucket length (masked steps) gives the
    loss and the gradients of the eager estimator on the unpadded, packed mini-batch, at the
    same seed: the forward guide draws the valid steps first, and masked steps add nothing.
    """
    from pyro_markov_kl import JitTraceMarkovKL_ELBO, TraceMarkovKL_ELBO
    from pyro_markov_kl.examples.dmm import DMM

    pyro.clear_param_store()
    torch.manual_seed(0)
    dmm = DMM(z_dim=3, emission_dim=6, transition_dim=6, rnn_dim=6)
    eager_batch = _tiny_batch(tiny_data)
    T = eager_batch[0].size(1)
    jit_batch = _bucketed_batch(tiny_data, T + pad)
    assert jit_batch[0].shape[1] == T + pad
    factor = torch.tensor(0.7)
    params = list(dmm.parameters())
    jit_elbo = JitTraceMarkovKL_ELBO(max_plate_nesting=1, ignore_jit_warnings=True)
    eager = TraceMarkovKL_ELBO(max_plate_nesting=1)
    pyro.set_rng_seed(1)
    jit_elbo.differentiable_loss(dmm.model, dmm.guide, *jit_batch, factor)  # compile
    for seed in (2, 3):
        results = []
        for elbo, batch in ((jit_elbo, jit_batch), (eager, eager_batch)):
            pyro.set_rng_seed(seed)
            loss = elbo.differentiable_loss(dmm.model, dmm.guide, *batch, factor)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            results.append((loss.item(), grads))
        (jit_loss, jit_grads), (eager_loss, eager_grads) = results
        assert jit_loss == pytest.approx(eager_loss, rel=1e-5, abs=1e-4)
        for a, b in zip(jit_grads, eager_grads):
            a = torch.zeros_like(b) if a is None else a
            b = torch.zeros_like(a) if b is None else b
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.fixture
def traces(monkeypatch: pytest.MonkeyPatch) -> list:
    """The shapes of the mini-batches that torch.jit.trace compiles graphs for, in order."""
    shapes = []
    real_trace = torch.jit.trace

    def counting_trace(*args: Any, **kwargs: Any) -> Any:
        shapes.append(args[1][-5].shape)  # the mini-batch among the traced inputs
        return real_trace(*args, **kwargs)

    monkeypatch.setattr(torch.jit, "trace", counting_trace)
    return shapes


@pytest.mark.parametrize("batching", ["by-length", "random"])
@pytest.mark.parametrize("elbo", ["markov-kl", "trace"])
def test_jit_compiles_at_most_one_graph_per_bucket(
    tiny_data: Path, elbo: str, batching: str, traces: list, capsys: pytest.CaptureFixture
) -> None:
    from pyro_markov_kl.data import bucket_lengths, length_buckets

    # the tiny training sequences have 3, 4, 5, 3, 4 steps: mini-batches of 2 are 3 to 5 long
    if batching == "random":
        buckets = bucket_lengths(5, 2)
        assert buckets == [2, 5]
    else:
        buckets = length_buckets([3, 4, 5, 3, 4], 2, 2)
        assert buckets == [3, 5]
    flags = ["--jit", "--batching", batching, "--buckets", "2", "--elbo", elbo]
    result = _run(tiny_data, "-n", "3", *flags)
    assert 1 <= len(traces) == result["jit_graphs"] <= len(buckets)
    assert set(result["jit_graph_lengths"]) <= set(buckets)
    assert all(shape[1] in buckets and shape[0] == 2 for shape in traces)
    out = capsys.readouterr().out
    assert f"jit: {result['jit_graphs']} compiled graph(s)" in out
    assert f"{batching} mini-batches, bucket lengths {buckets} (the padded lengths" in out
    # the old option name still works
    traces.clear()
    again = _run(tiny_data, "-n", "3", *flags[:3], "--jit-buckets", "2", "--elbo", elbo)
    assert again["train_losses_per_slice"] == result["train_losses_per_slice"]
    if batching == "random":
        # without buckets, one graph per mini-batch shape (length, and size of the last batch)
        traces.clear()
        result = _run(tiny_data, "-n", "3", "--jit", "--batching", "random", "--buckets", "0")
        assert len(traces) == result["jit_graphs"] > len(buckets)
        assert set(result["jit_graph_lengths"]) <= {3, 4, 5}


def test_by_length_batching_eager(tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # every epoch uses each training sequence once, in mini-batches from one length bucket, each
    # padded (masked) to its bucket's length also without --jit, so that an uncompiled run has a
    # few trace structures (TraceMarkovKL_ELBO analyses each once), not one per length
    import pyro_markov_kl.examples.dmm as dmm_module
    from pyro_markov_kl.data import bucket_length, length_buckets

    seen = []
    real = dmm_module.get_mini_batch

    def recording(indices: torch.Tensor, sequences: torch.Tensor, lengths: Any, **kw: Any) -> Any:
        batch = real(indices, sequences, lengths, **kw)
        seen.append((indices.tolist(), lengths[indices].tolist(), batch[0].size(1)))
        assert batch[2].sum(-1).tolist() == sorted(lengths[indices].tolist(), reverse=True)
        return batch

    monkeypatch.setattr(dmm_module, "get_mini_batch", recording)
    result = _run(tiny_data, "-n", "2", "--elbo", "trace", "--buckets", "2")
    buckets = length_buckets([3, 4, 5, 3, 4], 2, 2)
    assert len(result["train_losses_per_slice"]) == 2
    # buckets [3, 5]: ceil(2 / 2) + ceil(3 / 2) mini-batches per epoch, then the test set's
    assert len(seen) == 2 * 3 + 1
    for epoch in (seen[:3], seen[3:6]):
        assert sorted(i for indices, _, _ in epoch for i in indices) == [0, 1, 2, 3, 4]
        for _, lengths, t in epoch:
            assert len({bucket_length(n, buckets) for n in lengths}) == 1
            assert t == bucket_length(max(lengths), buckets)
    # the training mini-batches have as many lengths as there are buckets
    assert {t for _, _, t in seen[:6]} == set(buckets)


@pytest.mark.parametrize("batching", ["by-length", "random"])
def test_jit_pads_no_mini_batch_beyond_its_sequences(
    tiny_data: Path, batching: str, traces: list
) -> None:
    # a batch size above the number of sequences: the compiled graph holds the 5 sequences
    # there are, not 50 (of which 45 empty)
    _run(tiny_data, "-n", "1", "--jit", "-b", "50", "--batching", batching, "--elbo", "trace")
    assert traces and all(shape[0] == 5 for shape in traces)


def test_resume_with_other_training_options_says_so(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ck = str(tmp_path / "ck.pt")
    _run(tiny_data, "-n", "1", "--checkpoint", ck)
    capsys.readouterr()
    _run(tiny_data, "-n", "2", "--resume", ck, "--checkpoint", str(tmp_path / "same.pt"))
    assert "other training options" not in capsys.readouterr().out
    _run(tiny_data, "-n", "2", "--resume", ck, "--no-checkpoint", "--batching", "random", "-b", "3")
    out = capsys.readouterr().out
    assert f"note: {ck} was written by a run with other training options: " in out
    assert "--batching 'by-length' (this run: 'random')" in out
    assert "--batch-size 2 (this run: 3)" in out


def test_by_length_batching_needs_a_bucket(tiny_data: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        _run(tiny_data, "-n", "1", "--buckets", "0")
    assert "--buckets must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["dmm_compare", "dmm_distributed"])
def test_scripts_on_the_dmm_parser_reject_its_new_options(
    script: str, capsys: pytest.CaptureFixture
) -> None:
    import importlib

    main = importlib.import_module(f"pyro_markov_kl.examples.{script}").main
    refused = (["--checkpoint", "x.pt"], ["--batching", "by-length"], ["--buckets", "4"])
    for flags in refused + (["--jit-buckets", "2"],):
        with pytest.raises(SystemExit):
            main(flags)
        option = "--buckets" if flags[0] == "--jit-buckets" else flags[0]
        assert f"{option} is an option of pyro_markov_kl.examples.dmm that {script}" in (
            capsys.readouterr().err
        )


def test_main_job_defaults_and_resume_help(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from pyro_markov_kl.examples.dmm import DEFAULT_CHECKPOINT, make_parser

    parser = make_parser()
    assert parser.get_default("jit") is True
    assert parser.get_default("checkpoint") == DEFAULT_CHECKPOINT
    assert parser.parse_args(["--no-checkpoint"]).checkpoint is None
    ck = str(tmp_path / "ck.pt")
    first = _run(tiny_data, "-n", "1", "--checkpoint", ck, "--seed", "5")
    out = capsys.readouterr().out
    assert f"checkpoint saved to {ck} (epoch 1)" in out
    evaluate, further = [line.strip() for line in out.splitlines() if "--resume" in line][-2:]
    assert evaluate.startswith("python -m pyro_markov_kl.examples.dmm ")
    assert "--no-jit" in evaluate and "--z-dim 3" in evaluate and "--seed 5" in evaluate
    # training further keeps writing the run's own checkpoint, not the default one
    assert f"--checkpoint {ck}" in further
    assert evaluate.endswith(f"--resume {ck} -n 1") and further.endswith(f"--resume {ck} -n 2")
    # the printed commands work: evaluation only, then one more epoch
    again = main_of(evaluate, tiny_data)
    assert (
        again["start_epoch"] == 1
        and again["train_losses_per_slice"] == first["train_losses_per_slice"]
    )
    more = main_of(further, tiny_data)
    assert len(more["train_losses_per_slice"]) == 2


def main_of(command: str, tiny_data: Path) -> dict:
    from pyro_markov_kl.examples.dmm import main

    argv = command.split()[3:]
    assert "--data" in argv  # the command names the data set of the run
    return main(argv)
