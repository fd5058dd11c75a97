# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
Sampled values that leave torch's dispatcher: through memory shared with numpy,
through dlpack, through a worker thread. Where the dispatcher can see the value
leave (a write into memory torch does not own, ``__dlpack__``), the dependency is
kept or the escape is handled conservatively; what it cannot see (a computation
in another thread) is documented here and in "How it works".
"""

import threading

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import fresh_params, loss_and_grad_stats, z_scores
from pyro.infer import Trace_ELBO

from pyro_markov_kl import TraceMarkovKL_ELBO

# backward guides are part of these tests: TraceMarkovKL_ELBO's GuideOrderWarning (issue 13) is
# expected there
pytestmark = pytest.mark.filterwarnings("ignore:Failed to verify mean field restriction")

N_SE = 5.0


def model():
    u = pyro.sample("u", dist.Normal(0.0, 1.0))
    z = pyro.sample("z", dist.Normal(0.8 * u, 1.0))
    pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.3))


def make_guide(channel):
    """z first, then u conditioned on z through ``channel``: u is a guide descendant of z,
    and a model parent of z, so the KL at z must not be used."""

    def guide():
        z = pyro.sample("z", dist.Normal(pyro.param("m"), 0.7))
        pyro.sample("u", dist.Normal(1.5 * channel(z) + pyro.param("b"), 0.8))

    guide.__name__ = channel.__name__
    return guide


PARTICLES = 2000
_ARRAY = np.zeros(PARTICLES, dtype=np.float32)
_SHARED = torch.from_numpy(_ARRAY)  # made before any analysis: shares memory with numpy


def numpy_buffer_read_by_torch(z):
    n = z.numel()
    _SHARED[:n].copy_(z.detach().reshape(-1))
    return torch.from_numpy(_ARRAY)[:n].clone().reshape(z.shape)


def numpy_buffer_read_by_numpy(z):
    n = z.numel()
    _SHARED[:n].copy_(z.detach().reshape(-1))
    return torch.tensor(_ARRAY[:n] * 1.0).reshape(z.shape)


def through_dlpack(z):
    return torch.from_dlpack(z.detach()).clone()


def through_to_dlpack(z):
    return torch.utils.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(z.detach())).clone()


def through_numpy_method(z):
    return torch.as_tensor(z.detach().numpy().copy())


def in_a_thread(z):
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("v", z.detach() * 1.0))
    worker.start()
    worker.join()
    return out["v"]


SEEN = [numpy_buffer_read_by_torch, numpy_buffer_read_by_numpy, through_dlpack, through_to_dlpack]


@pytest.mark.parametrize("channel", SEEN, ids=lambda c: c.__name__)
def test_escape_is_seen(channel):
    guide = make_guide(channel)
    params = list(fresh_params(m=1.0, b=0.5).values())
    plan = TraceMarkovKL_ELBO().explain(model, guide)
    assert plan.sites["z"].estimator == "mc", plan
    kwargs = dict(num_particles=PARTICLES, vectorize_particles=True, max_plate_nesting=0)
    pyro.set_rng_seed(0)
    ours = loss_and_grad_stats(TraceMarkovKL_ELBO(**kwargs), model, guide, params, 20)
    reference = loss_and_grad_stats(Trace_ELBO(**kwargs), model, guide, params, 20)
    z = z_scores(ours, reference)
    assert z["loss"] < N_SE, (ours, reference)
    assert float(z["grad"].max()) < N_SE, (ours, reference)


def test_numpy_method_is_an_escape():
    fresh_params(m=1.0, b=0.5)
    plan = TraceMarkovKL_ELBO().explain(model, make_guide(through_numpy_method))
    assert plan.sites["z"].estimator == "mc", plan
    assert "reached Python" in plan.sites["u"].reason or plan.guide.unknown


def test_worker_thread_is_not_seen():
    """
    A limitation, documented in "How it works": torch's dispatcher modes are
    per thread, so a computation on a sampled value in another thread is not
    tracked, and the dependency it carries is lost. If this test fails, the
    tracker has learnt to see threads: update the docs.
    """
    fresh_params(m=1.0, b=0.5)
    plan = TraceMarkovKL_ELBO().explain(model, make_guide(in_a_thread))
    assert "z" not in plan.sites["u"].guide_parents
    assert plan.sites["z"].estimator == "analytic"
