# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
Data-parallel DMM training (:mod:`pyro_markov_kl.examples.dmm_distributed`) on two local
processes: the DDP gradient equals the single-process gradient of the whole mini-batch, and
training keeps the replicas identical (and equal to a single-process run).

Two workers (this file run as a script) are started once per module, on ``127.0.0.1`` with the
gloo backend, in float64 and with the guide noise fixed per sequence (``noise_seed``,
``--fixed-noise``), so that both runs see the same samples and agree to rounding. The parent
kills the workers if one fails or they have not finished within :data:`TIMEOUT` seconds.
"""

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pyro
import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pyro_markov_kl import TraceMarkovKL_ELBO
from pyro_markov_kl.data import load_jsb_chorales
from pyro_markov_kl.examples.dmm import DMM
from pyro_markov_kl.examples.dmm_distributed import (
    DMMLoss,
    find_free_port,
    loopback_interface,
    make_parser,
    shard_indices,
    shard_loss,
    train,
)

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available",
)

WORLD_SIZE = 2
#: seconds before the parent gives up on the workers and kills them
TIMEOUT = 90.0
SIZES = {"z_dim": 2, "emission_dim": 4, "transition_dim": 4, "rnn_dim": 4}
ANNEALING = 0.7
NOISE_SEED = 11
STEP = 5
#: (case name, guide direction, training-set indices of the global mini-batch): five sequences
#: of different lengths split 3/2 (unequal shards), and one sequence split 1/0 (an empty shard)
CASES = [
    ("forward", "forward", [9, 5, 2, 11, 7]),
    ("backward", "backward", [9, 5, 2, 11, 7]),
    ("empty-shard", "forward", [5]),
]
TRAIN_ARGV = [
    "-n",
    "2",
    "--max-train-sequences",
    "7",
    "-b",
    "4",
    "--z-dim",
    "2",
    "--emission-dim",
    "4",
    "--transition-dim",
    "4",
    "--rnn-dim",
    "4",
    "--seed",
    "3",
    "--fixed-noise",
]


def _tiny_dmm(guide: str) -> DMM:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    return DMM(guide=guide, **SIZES)


def _params(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = loopback_interface()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=TIMEOUT),
    )
    try:
        train_split = load_jsb_chorales("train")
        out: Dict[str, Any] = {}
        for name, guide, indices in CASES:
            dmm = _tiny_dmm(guide)
            module = DistributedDataParallel(DMMLoss(dmm, TraceMarkovKL_ELBO(max_plate_nesting=1)))
            scaled_loss, loss = shard_loss(
                module,
                torch.tensor(indices),
                train_split["sequences"],
                train_split["sequence_lengths"],
                ANNEALING,
                rank,
                world_size,
                noise_seed=NOISE_SEED,
                step=STEP,
            )
            scaled_loss.backward()
            out[name] = {
                "initial": _params(dmm),
                "grads": {n: p.grad.clone() for n, p in dmm.named_parameters()},
                "loss": loss,
            }
        result = train(make_parser().parse_args(TRAIN_ARGV), log=lambda _: None, evaluate=False)
        out["trained"] = _params(result["dmm"])
        out["train_losses"] = result["train_losses_per_slice"]
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _stop(processes: List[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            pass


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    # the workers run this file as a script, so they do not depend on pytest's import mode
    out_dir = tmp_path_factory.mktemp("dmm_distributed")
    port = find_free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    start = time.monotonic()
    processes: List[subprocess.Popen] = []
    logs = [out_dir / f"rank{rank}.log" for rank in range(WORLD_SIZE)]
    try:
        for rank in range(WORLD_SIZE):
            with open(logs[rank], "wb") as log:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, __file__, str(rank), str(WORLD_SIZE), str(port)]
                        + [str(out_dir)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                )
        while any(process.poll() is None for process in processes):
            failed = [r for r, p in enumerate(processes) if p.poll() not in (None, 0)]
            if failed:
                pytest.fail(f"worker {failed[0]} failed:\n{_log_tail(logs[failed[0]])}")
            if time.monotonic() - start > TIMEOUT:
                pytest.fail(f"the distributed workers did not finish within {TIMEOUT} s")
            time.sleep(0.2)
        for rank, process in enumerate(processes):
            if process.returncode != 0:
                pytest.fail(f"worker {rank} failed:\n{_log_tail(logs[rank])}")
    finally:
        _stop(processes)
    ranks = [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    return {"ranks": ranks, "seconds": time.monotonic() - start}


@pytest.fixture
def float64() -> Iterator[None]:
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)


def test_shards_cover_the_batch() -> None:
    indices = torch.tensor([9, 5, 2, 11, 7])
    shards = [shard_indices(indices, rank, 2) for rank in range(2)]
    assert [len(shard) for shard in shards] == [3, 2]
    assert torch.equal(torch.cat(shards), indices)
    assert [len(shard_indices(indices[:1], rank, 2)) for rank in range(2)] == [1, 0]


@pytest.mark.slow
@pytest.mark.parametrize("name,guide,indices", CASES, ids=[case[0] for case in CASES])
def test_ddp_gradient_equals_single_process_gradient(
    workers: Dict[str, Any], float64: None, name: str, guide: str, indices: List[int]
) -> None:
    ranks = [rank[name] for rank in workers["ranks"]]
    for other in ranks[1:]:
        for key, value in ranks[0]["initial"].items():
            assert torch.equal(other["initial"][key], value), key

    # the single-process gradient of the whole mini-batch, from the same initial parameters and
    # with the same per-sequence guide noise
    dmm = _tiny_dmm(guide)
    dmm.load_state_dict(ranks[0]["initial"])
    train_split = load_jsb_chorales("train")
    scaled_loss, loss = shard_loss(
        DMMLoss(dmm, TraceMarkovKL_ELBO(max_plate_nesting=1)),
        torch.tensor(indices),
        train_split["sequences"],
        train_split["sequence_lengths"],
        ANNEALING,
        noise_seed=NOISE_SEED,
        step=STEP,
    )
    scaled_loss.backward()

    assert sum(rank["loss"] for rank in ranks) == pytest.approx(loss, rel=1e-10)
    for param_name, param in dmm.named_parameters():
        expected = param.grad
        assert expected is not None and expected.abs().max() > 0, param_name
        for rank in ranks:
            actual = rank["grads"][param_name]
            assert (actual - expected).abs().max() <= 1e-5, param_name
        # DDP hands every rank the same averaged gradient
        assert torch.equal(ranks[0]["grads"][param_name], ranks[1]["grads"][param_name])


@pytest.mark.slow
def test_training_keeps_ranks_identical_and_matches_one_process(
    workers: Dict[str, Any], float64: None
) -> None:
    ranks = workers["ranks"]
    for key, value in ranks[0]["trained"].items():
        assert torch.equal(ranks[1]["trained"][key], value), key
    assert ranks[0]["train_losses"] == ranks[1]["train_losses"]

    reference = train(make_parser().parse_args(TRAIN_ARGV), log=lambda _: None, evaluate=False)
    assert reference["world_size"] == 1
    trained = dict(reference["dmm"].named_parameters())
    for key, value in ranks[0]["trained"].items():
        assert (value - trained[key].detach()).abs().max() <= 1e-8, key
    assert ranks[0]["train_losses"] == pytest.approx(reference["train_losses_per_slice"], rel=1e-10)
    # the replicas did move away from their initialisation (train() seeds with --seed 3)
    pyro.set_rng_seed(3)
    initial = DMM(**SIZES).state_dict()
    moved = any(
        not torch.allclose(value, initial[key]) for key, value in ranks[0]["trained"].items()
    )
    assert moved


if __name__ == "__main__":
    # a worker: RANK WORLD_SIZE PORT OUT_DIR
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
