# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
Which sample sites the distribution of each site depends on, in the guide and
in the model run on the guide's replayed samples.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Mapping, Tuple

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from pyro.util import get_rng_state, set_rng_state
from torch.nn.modules.module import register_module_forward_pre_hook

from .provenance import DependencyTracker
from .sites import outside_jit_trace


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

    def latent_parents(self, latents: frozenset) -> Dict[str, frozenset]:
        """
        For each site, the sites of ``latents`` its distribution depends on,
        directly or through sites that are not latents (observed sites,
        ``pyro.deterministic``, a model latent the guide does not sample): those
        pass their own such parents on, as a value computed from them would.
        """
        result: Dict[str, frozenset] = {}
        for name in self.order:
            direct = self.parents[name]
            through = [result.get(p, frozenset()) for p in direct - latents]
            result[name] = (direct & latents).union(*through)
        return result

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
        if site_is_subsample(msg):
            return
        tracker, name, fn, value = self.tracker, msg["name"], msg["fn"], msg["value"]
        reason = None
        try:
            fn_bits = tracker.provenance_of(fn)
        except RecursionError:
            fn_bits = tracker.all_sites()
            reason = "its distribution holds too large an object graph to search for tensors"
        # the factors any handler scales or masks the site's log-density by are inputs of
        # its ELBO term like the distribution's parameters (poutine.scale, poutine.mask,
        # or any handler writing msg["scale"] / msg["mask"])
        bits = fn_bits | tracker.provenance_of((msg["scale"], msg["mask"]))
        value_bits = 0
        if torch.is_tensor(value):
            value_bits = tracker.provenance(value)
            bits |= value_bits
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
        # a replayed value carries its own site from the guide's run: no site is its own parent
        self.parents[name] = bits & ~tracker.bit_of(name)
        if reason is not None:
            self.unknown[name] = reason
        if torch.is_tensor(value):
            # A value the site drew from its distribution depends on the sites that flow into
            # the distribution, which are its parents: tagged with the site alone, the graph
            # keeps direct parents and ancestry is the transitive closure. A value recorded
            # at the site (observed, pyro.deterministic, or set by a handler) keeps what it
            # was computed from besides, or a later site using it would forget those latents.
            kept = value_bits if msg["is_observed"] else value_bits & ~fn_bits
            tracker.tag(value, name, kept)

    def dependencies(self) -> ProgramDependencies:
        names_of = self.tracker.names_of
        return ProgramDependencies(
            order=tuple(self.order),
            parents={name: names_of(bits) for name, bits in self.parents.items()},
            unknown=dict(self.unknown),
            escapes=tuple(self.tracker.escapes),
        )


def _run_tracked(
    fn: Callable, guide_trace: Trace, args: tuple, kwargs: dict, tracker: DependencyTracker
) -> ProgramDependencies:
    messenger = DependencyMessenger(tracker)
    tracker.new_run()
    with poutine.block(), tracker, messenger:
        poutine.replay(fn, trace=guide_trace)(*args, **kwargs)
    return messenger.dependencies()


def analyse_dependencies(
    model: Callable, guide: Callable, guide_trace: Trace, args: tuple, kwargs: dict
) -> Tuple[ProgramDependencies, ProgramDependencies]:
    """
    Run the guide, then the model, replayed on the values of ``guide_trace``
    under dependency tracking, in :func:`isolated_analysis`. (A
    :class:`~pyro.poutine.guide.GuideMessenger` guide, which runs the model
    itself, is analysed by
    :func:`~pyro_markov_kl.guide_messenger.analyse_guide_messenger` instead.)

    :param guide_trace: a trace of ``guide`` (with its subsample sites)
    :returns: the guide's and the model's dependencies
    """
    with isolated_analysis():
        # one tracker for both runs: a tensor the guide computes from its samples and
        # leaves where the model reads it (state of a shared module, say) carries them
        tracker = DependencyTracker()
        guide_deps = _run_tracked(guide, guide_trace, args, kwargs, tracker)
        model_deps = _run_tracked(model, guide_trace, args, kwargs, tracker)
    return guide_deps, model_deps


@contextlib.contextmanager
def isolated_analysis() -> Iterator[None]:
    """
    The conditions of a dependency analysis: outside any JIT trace, with
    Pyro's validation off (its checks read values into Python but cannot
    change the result), without autograd (dependencies are found at the
    dispatcher, below autograd, so the result is the same, and no graph is
    kept alive), and leaving no trace of itself (:func:`no_side_effects`), so
    that analysing a step changes nothing about the step.
    """
    with outside_jit_trace(), no_side_effects(), pyro.validation_enabled(False):
        with torch.no_grad():
            yield


@contextlib.contextmanager
def no_side_effects() -> Iterator[None]:
    """
    Undo, on exit, what running a model and a guide once more changes besides
    its result:

    * the random number generators (torch's, CUDA's, Python's and NumPy's, as
      :func:`pyro.util.get_rng_state`);
    * the buffers of every :class:`torch.nn.Module` called inside, and of its
      submodules (BatchNorm's ``running_mean``, ``running_var`` and
      ``num_batches_tracked``, ...): a global forward pre-hook
      (:func:`torch.nn.modules.module.register_module_forward_pre_hook`) gives
      each module copies of its buffers before its first call, and the
      originals are put back on exit. The originals are never written to, so
      their autograd version counters do not change: the graph of the step
      being analysed (which saved them, e.g. for BatchNorm's backward) stays
      valid;
    * the param store: params it did not hold before are removed.
    """
    originals: Dict[int, Tuple[torch.nn.Module, Dict[str, torch.Tensor]]] = {}

    def swap_buffers(module: torch.nn.Module, inputs: Any) -> None:
        for sub in module.modules():
            if id(sub) in originals:
                continue
            saved = {name: buf for name, buf in sub._buffers.items() if buf is not None}
            originals[id(sub)] = (sub, saved)
            with torch.no_grad():
                for name, buf in saved.items():
                    sub._buffers[name] = buf.detach().clone()

    rng_state = get_rng_state()
    param_names = set(pyro.get_param_store().keys())
    handle = register_module_forward_pre_hook(swap_buffers)
    try:
        yield
    finally:
        handle.remove()
        for module, saved in originals.values():
            module._buffers.update(saved)
        store = pyro.get_param_store()
        for name in set(store.keys()) - param_names:
            del store[name]
        set_rng_state(rng_state)
