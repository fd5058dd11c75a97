# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
Which sample sites the distribution of each site depends on, in the guide and
in the model run on the guide's replayed samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Tuple

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace

from .provenance import DependencyTracker


def is_subsample_site(msg: Mapping) -> bool:
    """Whether ``msg`` is the auxiliary site a subsampling plate records."""
    return type(msg["fn"]).__name__ == "_Subsample"


@dataclass(frozen=True)
class ProgramDependencies:
    """
    The dependency graph of one program (model or guide).

    :ivar order: sample site names in the order they were sampled
    :ivar parents: for each site, the sites whose sampled values flow into the
        parameters of its distribution
    :ivar unknown: for each site whose dependencies could not be determined,
        why; such a site is given every site sampled before it as parents
    :ivar escapes: each time sampled values reached Python, which sites' and
        where (``"file:line"``)
    """

    order: Tuple[str, ...]
    parents: Mapping[str, frozenset]
    unknown: Mapping[str, str]
    escapes: Tuple[Tuple[Tuple[str, ...], str], ...] = ()

    def descendants(self) -> Dict[str, frozenset]:
        """
        The transitive closure of :attr:`parents` reversed: for each site the
        sites sampled later whose distribution depends on it, directly or
        through other sites.
        """
        children: Dict[str, set] = {name: set() for name in self.order}
        for name in self.order:
            for parent in self.parents[name]:
                children.setdefault(parent, set()).add(name)
        result: Dict[str, frozenset] = {}
        for name in reversed(self.order):
            desc = set(children[name])
            for child in children[name]:
                desc |= result.get(child, frozenset())
            result[name] = frozenset(desc)
        return result


class DependencyMessenger(Messenger):
    """
    Records the parents of every sample site and tags its value, while a
    :class:`~pyro_markov_kl.provenance.DependencyTracker` is active.

    A site's parents are the provenance of every tensor its distribution
    holds (parameters, base distributions, transforms, captured closures) and
    of its ``log_prob`` at the site's value, computed before the value is
    tagged. After a value has escaped into Python (see
    :class:`~pyro_markov_kl.provenance.DependencyTracker`) the parents are all
    sites sampled so far.
    """

    def __init__(self, tracker: DependencyTracker) -> None:
        super().__init__()
        self.tracker = tracker
        self.order: list = []
        self.parents: Dict[str, int] = {}
        self.unknown: Dict[str, str] = {}

    def _pyro_post_sample(self, msg: dict) -> None:
        if is_subsample_site(msg):
            return
        tracker, name, fn, value = self.tracker, msg["name"], msg["fn"], msg["value"]
        reason = None
        try:
            bits = tracker.provenance_of(fn)
        except RecursionError:
            bits = tracker.all_sites()
            reason = "its distribution holds too large an object graph to search for tensors"
        if torch.is_tensor(value):
            bits |= tracker.provenance(value)
            try:
                bits |= tracker.provenance_of(fn.log_prob(value))
            except Exception:  # noqa: BLE001 -- the attribute walk above still counts
                pass
        if tracker.escaped and reason is None:
            bits = tracker.all_sites()
            names, where = tracker.escapes[0]
            reason = (
                f"the value of {', '.join(names)} reached Python (.item(), bool(), .tolist(), "
                f"...) at {where}, so later control flow may depend on it"
            )
        self.order.append(name)
        self.parents[name] = bits
        if reason is not None:
            self.unknown[name] = reason
        if torch.is_tensor(value):
            # an observed value (data, a pyro.factor, a pyro.deterministic) is not sampled
            # here: what it is computed from stays in its provenance, so that a site using a
            # pyro.deterministic of z depends on z
            prior = tracker.provenance(value) if msg["is_observed"] else 0
            tracker.tag(value, name, also=prior)

    def dependencies(self) -> ProgramDependencies:
        names_of = self.tracker.names_of
        return ProgramDependencies(
            order=tuple(self.order),
            parents={name: names_of(bits) for name, bits in self.parents.items()},
            unknown=dict(self.unknown),
            escapes=tuple(self.tracker.escapes),
        )


def _run_tracked(
    fn: Callable, guide_trace: Trace, args: tuple, kwargs: dict
) -> ProgramDependencies:
    messenger = DependencyMessenger(DependencyTracker())
    with poutine.block(), messenger.tracker, messenger:
        poutine.replay(fn, trace=guide_trace)(*args, **kwargs)
    return messenger.dependencies()


def analyse_dependencies(
    model: Callable, guide: Callable, guide_trace: Trace, args: tuple, kwargs: dict
) -> Tuple[ProgramDependencies, ProgramDependencies]:
    """
    Run the guide, then the model, replayed on the values of ``guide_trace``
    under dependency tracking.

    The runs are hidden from enclosing handlers, run with validation off (its
    checks read values into Python but cannot change the result) and without
    autograd, outside any JIT trace, and leave the random number generator as
    they found it, so that analysing a step changes nothing about the step.

    :param guide_trace: a trace of ``guide`` (with its subsample sites)
    :returns: the guide's and the model's dependencies
    """
    # without autograd: dependencies are found at the dispatcher, below autograd, so the
    # result is the same, and no graph is kept alive
    tracing_state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)  # the analysis is never part of a JIT-compiled graph
    try:
        with torch.random.fork_rng(devices=[]), pyro.validation_enabled(False), torch.no_grad():
            guide_deps = _run_tracked(guide, guide_trace, args, kwargs)
            model_deps = _run_tracked(model, guide_trace, args, kwargs)
    finally:
        torch._C._set_tracing_state(tracing_state)
    return guide_deps, model_deps
