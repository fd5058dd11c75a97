# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

r"""
Effect-based guides (:class:`~pyro.poutine.guide.GuideMessenger`:
:class:`~pyro.infer.autoguide.AutoNormalMessenger`,
:class:`~pyro.infer.autoguide.AutoHierarchicalNormalMessenger`,
:class:`~pyro.infer.autoguide.AutoRegressiveMessenger`, user subclasses).

A GuideMessenger runs the model *inside* the guide: at each latent site it
replaces the model's distribution :math:`p_s` (the *prior*, conditioned on the
upstream samples, kept in ``msg["infer"]["prior"]``) by the distribution
returned by :meth:`~pyro.poutine.guide.GuideMessenger.get_posterior`, which may
itself be computed from the prior (as in AutoRegressiveMessenger). There is no
separate guide program to trace, so one run of the guide is analysed with two
dependency trackers over the same torch operations: one reads each latent
site's posterior (the guide's :math:`q_s`, hence its guide parents), the other
the prior (the model's :math:`p_s`, hence its model parents); observed sites
count for the model only, auxiliary sites sampled inside ``get_posterior`` for
the guide only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Tuple

from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

from .dependencies import (
    DependencyMessenger,
    ProgramDependencies,
    isolated_analysis,
)
from .provenance import DependencyTracker

__all__ = ["analyse_guide_messenger", "guide_messenger_traces", "is_guide_messenger"]


def is_guide_messenger(guide: Callable) -> bool:
    """Whether ``guide`` (possibly wrapped in handlers) is an effect-based guide, as for Pyro."""
    return isinstance(poutine.unwrap(guide), Messenger)


def _split(trace: Trace) -> Tuple[Trace, Trace]:
    """
    ``(model_trace, guide_trace)`` of one GuideMessenger run, as
    :meth:`~pyro.poutine.guide.GuideMessenger.get_traces` makes them but with
    subsample sites kept (in both) and auxiliary guide sites (sampled inside
    ``get_posterior``, without a prior) in the guide trace only.
    """
    model_trace = trace.copy()
    guide_trace = trace.copy()
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"]:
            del guide_trace.nodes[name]
            continue
        if site_is_subsample(site):
            guide_trace.nodes[name] = site.copy()
            continue
        prior = site["infer"].get("prior")
        if prior is None:  # an auxiliary variable of the guide
            del model_trace.nodes[name]
            continue
        model_site = site.copy()
        model_site["fn"] = prior
        model_trace.nodes[name] = model_site
    return model_trace, guide_trace


def guide_messenger_traces(guide: Callable, args: tuple, kwargs: dict) -> Tuple[Trace, Trace]:
    """
    Run a GuideMessenger guide (which runs the model) and return
    ``(model_trace, guide_trace)``, with subsample sites.
    """
    guide(*args, **kwargs)
    return _split(poutine.unwrap(guide).trace)


class _ReplayValues(Messenger):
    """
    Replays the values of ``trace`` at its latent (and subsample) sites, as
    :class:`~pyro.poutine.replay_messenger.ReplayMessenger` does, but leaves
    ``msg["infer"]`` alone: ReplayMessenger would replace it by the old trace's,
    which holds the old run's ``"prior"`` instead of this run's.
    """

    def __init__(self, trace: Trace) -> None:
        super().__init__()
        self.trace = trace

    def _pyro_sample(self, msg: dict) -> None:
        site = self.trace.nodes.get(msg["name"])
        if site is None or msg["is_observed"] or site["type"] != "sample":
            return
        msg["value"] = site["value"]
        msg["done"] = True


class _PriorDependencyMessenger(DependencyMessenger):
    """
    A :class:`~pyro_markov_kl.dependencies.DependencyMessenger` that reads each
    latent site's prior (the model's distribution) instead of ``msg["fn"]``
    (the guide's), and ignores the guide's auxiliary sites.
    """

    def _pyro_post_sample(self, msg: dict) -> None:
        if not msg["is_observed"] and not site_is_subsample(msg):
            prior = (msg["infer"] or {}).get("prior")
            if prior is None:
                return  # auxiliary: not a site of the model
            msg = dict(msg, fn=prior)
        super()._pyro_post_sample(msg)


def _restrict(deps: ProgramDependencies, names: Any) -> ProgramDependencies:
    return dataclasses.replace(
        deps,
        order=tuple(n for n in deps.order if n in names),
        parents={n: p for n, p in deps.parents.items() if n in names},
        unknown={n: r for n, r in deps.unknown.items() if n in names},
    )


def analyse_guide_messenger(
    guide: Callable, guide_trace: Trace, args: tuple, kwargs: dict
) -> Tuple[ProgramDependencies, ProgramDependencies]:
    """
    Run a GuideMessenger guide once, replayed on the values of
    ``guide_trace``, under two dependency trackers: one for the guide's
    distributions (the posteriors), one for the model's (the priors and the
    observed sites), in :func:`~pyro_markov_kl.dependencies.isolated_analysis`.
    The guide's ``trace`` attribute is left as it was.

    :returns: the guide's and the model's dependencies
    """
    messenger = poutine.unwrap(guide)
    saved_trace: Optional[Trace] = getattr(messenger, "trace", None)
    guide_side = DependencyMessenger(DependencyTracker())
    model_side = _PriorDependencyMessenger(DependencyTracker())
    try:
        with isolated_analysis(), poutine.block(), guide_side.tracker, model_side.tracker:
            with guide_side, model_side, _ReplayValues(guide_trace):
                guide(*args, **kwargs)
    finally:
        if saved_trace is not None:
            messenger.trace = saved_trace
    guide_names = frozenset(
        name
        for name, site in guide_trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    )
    model_deps = model_side.dependencies()
    return _restrict(guide_side.dependencies(), guide_names), model_deps
