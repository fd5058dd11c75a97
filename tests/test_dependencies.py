# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""The dependency analysis: every way a sampled value can flow into a distribution."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from pyro_markov_kl import TraceMarkovKL_ELBO
from pyro_markov_kl.provenance import DependencyTracker, reachable_tensors

# backward guides are part of these tests: TraceMarkovKL_ELBO's GuideOrderWarning (issue 13) is
# expected here, and Pyro's test configuration turns warnings into errors
pytestmark = pytest.mark.filterwarnings("ignore:Failed to verify mean field restriction")

# Each flow maps the sampled values (a, b) of shape (2, 3) to a tensor that
# depends on a only.
FLOWS = {
    "linear": lambda a, b: nn.Linear(3, 3)(a),
    "cat": lambda a, b: torch.cat([a, torch.ones(2, 1)], -1),
    "index": lambda a, b: a[:, 1],
    "gather": lambda a, b: torch.gather(a, 1, torch.tensor([[0], [2]])),
    "einsum": lambda a, b: torch.einsum("ij,kj->ik", a, torch.ones(4, 3)),
    "where": lambda a, b: torch.where(a > 0, 1.0, -1.0),
    "comparison": lambda a, b: (a > 0).float(),
    "detach": lambda a, b: a.detach() * 2,
    "data": lambda a, b: a.data + 1,
    "buffer_write": lambda a, b: _buffer_write(a),
    "copy_": lambda a, b: torch.zeros(2, 3).copy_(a) + 0,
    "gru": lambda a, b: nn.GRU(3, 4, batch_first=True)(a.unsqueeze(0))[1],
    "gru_packed": lambda a, b: nn.GRU(3, 4, batch_first=True)(
        pack_padded_sequence(a.unsqueeze(1), torch.tensor([1, 1]), batch_first=True)
    )[1],
    "no_grad": lambda a, b: _no_grad(lambda: a * 3),
    "out=": lambda a, b: torch.add(a.detach(), 1, out=torch.empty(2, 3)),
    "deepcopy": lambda a, b: __import__("copy").deepcopy(a.detach()),
}


def _buffer_write(a):
    buf = torch.zeros(4, 2, 3)
    buf[1] = a
    return buf[0]  # reading any part of the buffer: conservatively depends on a


def _no_grad(fn):
    with torch.no_grad():
        return fn()


@pytest.mark.parametrize("flow", sorted(FLOWS))
def test_flow_is_tracked(flow):
    fn = FLOWS[flow]
    tracker = DependencyTracker()
    with tracker:
        a = torch.randn(2, 3) * 1.0
        b = torch.randn(2, 3) * 1.0
        tracker.tag(a, "a")
        tracker.tag(b, "b")
        out = fn(a, b)
    assert tracker.names_of(tracker.provenance(out)) == {"a"}


def test_value_independent_factories_do_not_depend():
    tracker = DependencyTracker()
    with tracker:
        a = torch.randn(3) * 1.0
        tracker.tag(a, "a")
        out = torch.zeros_like(a) + a.new_ones(3) + torch.randn_like(a)
    assert tracker.provenance(out) == 0


def test_escape_is_recorded():
    tracker = DependencyTracker()
    with tracker:
        a = torch.randn(3) * 1.0
        tracker.tag(a, "a")
        b = torch.randn(3) * 1.0
        tracker.tag(b, "b")
        if a.sum() > 0:  # control flow on a sampled value
            pass
        b.tolist()
    assert tracker.names_of(tracker.escaped) == {"a", "b"}
    assert len(tracker.escapes) == 2
    assert __file__ in tracker.escapes[0][1]


def test_reachable_tensors_sees_closures_and_partials():
    import functools

    t1, t2, t3 = torch.ones(1), torch.ones(2), torch.ones(3)

    class Holder:
        def __init__(self):
            self.fn = functools.partial(lambda x, context: x + context, context=t1)
            self.g = lambda x: x * t2
            self.items = [{"k": t3}]

    found = reachable_tensors(Holder())
    assert any(x is t1 for x in found)
    assert any(x is t2 for x in found)
    assert any(x is t3 for x in found)


class BufferedMarkov(nn.Module):
    """A Markov model and guide that pass states through preallocated buffers, RNNs,
    ``where`` and ``detach``; the guide is forward (analytic everywhere) or backward."""

    def __init__(self, backward=False, T=5):
        super().__init__()
        self.backward_guide = backward
        self.T = T
        self.rnn = nn.GRU(2, 3, batch_first=True)
        self.lin = nn.Linear(3 + 2, 4)

    def model(self):
        buf = torch.zeros(self.T + 1, 2)
        for t in range(self.T):
            prev = buf[t].detach() if t % 2 else torch.where(buf[t] > 10, buf[t], buf[t])
            z = pyro.sample(f"z_{t}", dist.Normal(0.8 * prev, 1.0).to_event(1))
            buf[t + 1] = z
            pyro.sample(f"x_{t}", dist.Normal(z.sum(), 1.0), obs=torch.tensor(0.5))

    def guide(self):
        h, _ = self.rnn(torch.ones(1, self.T, 2))
        buf = torch.zeros(self.T + 2, 2)
        steps = range(self.T) if not self.backward_guide else reversed(range(self.T))
        for t in steps:
            src = t if not self.backward_guide else t + 2
            loc = self.lin(torch.cat([h[0, t], buf[src]], -1))[:2]
            z = pyro.sample(f"z_{t}", dist.Normal(loc, 1.0).to_event(1))
            buf[t + 1].copy_(z)


@pytest.mark.parametrize("backward", [False, True])
def test_plan_identical_with_and_without_grad(backward):
    m = BufferedMarkov(backward=backward)
    with torch.no_grad():
        plan_nograd = TraceMarkovKL_ELBO().explain(m.model, m.guide)
    plan_grad = TraceMarkovKL_ELBO().explain(m.model, m.guide)
    assert plan_nograd.sites == plan_grad.sites
    analytic = set(plan_grad.analytic_sites())
    if backward:
        assert analytic == {"z_0"}
    else:
        assert analytic == {f"z_{t}" for t in range(m.T)}
        # buffers are tracked per storage: each model site depends on all earlier ones
        assert plan_grad.sites["z_3"].model_parents == {"z_0", "z_1", "z_2"}


def test_python_control_flow_on_a_sample_is_conservative():
    def model():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        loc = 1.0 if b.item() > 0 else 0.0  # b escapes into Python
        pyro.sample("c", dist.Normal(loc + 0 * a, 1.0))

    def guide():
        c = pyro.sample("c", dist.Normal(0.0, 1.0))
        pyro.sample("a", dist.Normal(c, 1.0))
        pyro.sample("b", dist.Normal(0.0, 1.0))

    plan = TraceMarkovKL_ELBO().explain(model, guide)
    # c's model parents are unknown -> all earlier sites {a, b}; a depends on c in the guide
    assert plan.sites["c"].model_parents == {"a", "b"}
    assert plan.sites["c"].estimator == "mc"
    assert "reached Python" in plan.sites["c"].reason or "depends on it" in plan.sites["c"].reason
    assert plan.model.unknown["c"].startswith("the value of b reached Python")


_DYNAMO_PROGRAM = """
import sys
{pre}
import torch
from pyro_markov_kl.provenance import DependencyTracker

tracker = DependencyTracker()
with tracker:
    a = torch.randn(2, 3) * 1.0
    b = torch.randn(2, 3) * 1.0
    tracker.tag(a, "a")
    tracker.tag(b, "b")
    out = (a.exp() @ b.T).sum(-1)
print(sorted(tracker.names_of(tracker.provenance(out))))
print("torch._dynamo" in sys.modules)
"""


@pytest.mark.parametrize("pre", ["", "import torch._dynamo"])
def test_tracker_does_not_import_dynamo(pre: str) -> None:
    # torch wraps a dispatch mode's handler for torch.compile, importing torch._dynamo (about
    # 1.2 s) on first use; the tracker skips the wrapper unless torch._dynamo is already loaded,
    # and tracks alike either way
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _DYNAMO_PROGRAM.format(pre=pre)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out[-2:] == ["['a', 'b']", str(bool(pre))]
