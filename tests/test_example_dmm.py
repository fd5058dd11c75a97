# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""Smoke tests of the Deep Markov Model example (the main job) on a tiny configuration."""

import math
from typing import List

import pyro
import pytest
import torch

from pyro_markov_kl.data import get_mini_batch, load_jsb_chorales
from pyro_markov_kl.examples.dmm import DMM, build_elbo, main

try:
    from pyro_markov_kl import TraceMarkovKL_ELBO  # noqa: F401

    HAVE_MARKOV_KL = True
except ImportError:
    HAVE_MARKOV_KL = False

needs_markov_kl = pytest.mark.skipif(
    not HAVE_MARKOV_KL, reason="pyro_markov_kl.TraceMarkovKL_ELBO is not importable"
)

TINY = [
    "-n",
    "1",
    "--max-train-sequences",
    "10",
    "-b",
    "5",
    "--z-dim",
    "3",
    "--emission-dim",
    "8",
    "--transition-dim",
    "8",
    "--rnn-dim",
    "8",
    "--num-threads",
    "0",
    "--no-jit",
    "--no-checkpoint",
]


def _tiny_batch(n: int = 4) -> tuple:
    data = load_jsb_chorales("valid")
    # short sequences of different lengths keep the traces small and the batch ragged
    order = data["sequence_lengths"].argsort()[:n]
    return get_mini_batch(order, data["sequences"], data["sequence_lengths"])


@pytest.mark.parametrize("guide", ["forward", "backward"])
@pytest.mark.parametrize(
    "elbo",
    [pytest.param("markov-kl", marks=[needs_markov_kl, pytest.mark.slow]), "trace", "meanfield"],
)
def test_main_tiny(elbo: str, guide: str, capsys: pytest.CaptureFixture) -> None:
    result = main(TINY + ["--elbo", elbo, "--guide", guide])
    assert result["elbo"] == elbo and result["guide"] == guide
    assert len(result["train_losses_per_slice"]) == 1
    assert math.isfinite(result["train_loss_per_slice"]) and result["train_loss_per_slice"] > 0
    assert math.isfinite(result["test_nll_per_slice"]) and result["test_nll_per_slice"] > 0
    assert result["num_test_slices"] == 4725
    assert result["num_train_slices"] == int(
        load_jsb_chorales("train")["sequence_lengths"][:10].sum()
    )
    out = capsys.readouterr().out
    assert "test NLL bound per time slice" in out
    assert type(build_elbo(elbo)).__name__ in out


@pytest.mark.slow
def test_main_vectorized_particles_and_evaluation() -> None:
    result = main(
        TINY
        + ["--elbo", "trace", "--num-particles", "2", "--vectorize-particles"]
        + ["--test-particles", "2", "--test-frequency", "1"]
    )
    assert math.isfinite(result["test_nll_per_slice"])
    assert [e["epoch"] for e in result["evaluations"]] == [1]
    assert all(math.isfinite(v) for v in result["evaluations"][0].values())


def _latent_order(guide: str) -> List[int]:
    pyro.set_rng_seed(0)
    dmm = DMM(z_dim=3, emission_dim=8, transition_dim=8, rnn_dim=8, guide=guide)
    batch = _tiny_batch()
    trace = pyro.poutine.trace(dmm.guide).get_trace(*batch)
    names = [name for name, site in trace.nodes.items() if site["type"] == "sample"]
    return [int(name[2:]) for name in names if name.startswith("z_") and name[2:].isdigit()]


def test_guide_directions() -> None:
    T = int(_tiny_batch()[0].size(1))
    assert _latent_order("forward") == list(range(1, T + 1))
    assert _latent_order("backward") == list(range(T, 0, -1))


def test_backward_guide_starts_each_sequence_at_its_end() -> None:
    # the guide's distribution of a sequence's last latent must not depend on the padding after it
    pyro.set_rng_seed(0)
    dmm = DMM(z_dim=3, emission_dim=8, transition_dim=8, rnn_dim=8, guide="backward")
    batch = _tiny_batch()
    lengths = batch[3]
    short = int(lengths.argmin())
    T_short = int(lengths[short])
    assert T_short < int(lengths[0])
    locs = []
    for seed in (0, 1):
        pyro.set_rng_seed(seed)
        trace = pyro.poutine.trace(dmm.guide).get_trace(*batch)
        locs.append(trace.nodes[f"z_{T_short}"]["fn"].base_dist.base_dist.loc[short])
    assert torch.equal(locs[0], locs[1])


@pytest.mark.parametrize("guide", ["forward", "backward"])
def test_elbos_agree_in_expectation_on_small_batch(guide: str) -> None:
    # Trace_ELBO is unbiased for both guides: averages over many particles must be close to
    # each other for two seeds (a sanity check of the masking, not of any KL)
    pyro.set_rng_seed(0)
    dmm = DMM(z_dim=3, emission_dim=8, transition_dim=8, rnn_dim=8, guide=guide)
    batch = _tiny_batch(2)
    elbo = build_elbo("trace", num_particles=200, vectorize_particles=True)
    with torch.no_grad():
        losses = []
        for seed in (0, 1):
            pyro.set_rng_seed(seed)
            losses.append(elbo.loss(dmm.model, dmm.guide, *batch))
    assert abs(losses[0] - losses[1]) < 0.02 * abs(losses[0])


def test_unknown_names() -> None:
    with pytest.raises(ValueError):
        build_elbo("tracegraph")
    with pytest.raises(ValueError):
        DMM(guide="sideways")
