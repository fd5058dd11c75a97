# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
The plan's data types: :class:`SiteRecord`, what the plan decided for one site,
and :class:`Plan`, the decisions for one model/guide structure, with the table
``print(plan)`` shows. :func:`~pyro_markov_kl.plan.build_plan` makes them;
:meth:`~pyro_markov_kl.TraceMarkovKL_ELBO.explain` returns them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple

from pyro.poutine.indep_messenger import CondIndepStackFrame

from .dependencies import ProgramDependencies
from .kl import KLRule

__all__ = ["Plan", "SiteRecord"]


@dataclass(frozen=True)
class SiteRecord:
    """
    What the plan decided for one latent site.

    :ivar name: the site name
    :ivar estimator: ``"analytic"`` (the conditional KL) or ``"mc"``
        (:math:`\\log p - \\log q` at the sample)
    :ivar reason: a sentence saying why
    :ivar guide_parents: latent sites whose sampled values flow into :math:`q_s`
    :ivar model_parents: latent sites whose sampled values flow into :math:`p_s`
    :ivar guide_descendants: sites sampled later in the guide that depend on
        :math:`s`, transitively
    :ivar kl_rule: for analytic sites, which rule computes the KL
    :ivar override: the site's ``infer={"kl": ...}`` setting
    :ivar reparameterized: whether the guide samples it with ``rsample``
    :ivar downstream: for a non-reparameterised site, the ELBO terms (site
        names) whose value depends on its sample: the cost its score-function
        term is weighted by
    :ivar downstream_summed: for each downstream term, the plates of both
        the site and the term over which the term is summed in each element's
        cost, because it depends on the site across them (usually none)
    :ivar cost_base: a non-reparameterised guide descendant of the site whose
        cost is part of this one's, with the same plates (the regime at
        :math:`t + 1` for the regime at :math:`t`): the cost is computed as
        that one's plus the terms at :attr:`cost_extra` (indices into
        :attr:`downstream`), which keeps a chain of :math:`T` such sites at
        :math:`O(T)` additions instead of :math:`O(T^2)`
    :ivar cost_extra: see :attr:`cost_base`
    :ivar baseline: for a non-reparameterised site, which baseline its cost
        gets, and why (see :func:`~pyro_markov_kl.score_function.leave_one_out_baseline`)
    :ivar baseline_frames: the plates of its leave-one-out baseline, if it gets one
    :ivar auxiliary: a guide site that is not a latent of the model (an
        ``is_auxiliary`` site, a site the model does not have or observes, a
        ``pyro.factor`` or ``pyro.deterministic``): its term is
        :math:`-\\log q`, plus the model's :math:`\\log p` if the model observes
        a site of the same name, always Monte Carlo, as in Trace_ELBO
    :ivar opaque: an observed, non-reparameterised guide site (``pyro.factor(...,
        has_rsample=False)``): the sampling it stands for happened outside Pyro,
        so which terms depend on it is unknown and its score-function cost is
        every term
    """

    name: str
    estimator: str
    reason: str
    guide_parents: frozenset = frozenset()
    model_parents: frozenset = frozenset()
    guide_descendants: frozenset = frozenset()
    kl_rule: Optional[KLRule] = field(default=None, compare=False)
    override: str = "auto"
    reparameterized: bool = True
    downstream: Tuple[str, ...] = ()
    downstream_summed: Tuple[frozenset, ...] = ()
    cost_base: Optional[str] = None
    cost_extra: Tuple[int, ...] = ()
    baseline: str = ""
    baseline_frames: Tuple[CondIndepStackFrame, ...] = ()
    auxiliary: bool = False
    opaque: bool = False


@dataclass(frozen=True)
class Plan:
    """
    The estimator plan for one model/guide structure, as returned by
    :meth:`~pyro_markov_kl.TraceMarkovKL_ELBO.explain`; the same object drives
    the loss.

    :ivar sites: latent site name -> :class:`SiteRecord`, in model order,
        followed by the guide's auxiliary sites
    :ivar observed: observed site names, in model order
    :ivar guide: the guide's dependency graph
    :ivar model: the model's dependency graph
    :ivar kl_groups: groups of analytic sites whose distributions have the
        same types and shapes and share a KL rule, so that their KLs can be
        computed by one call on stacked parameters
    :ivar observed_groups: groups of observed sites whose distributions have
        the same types and shapes, so that their log-densities can be computed
        by one call on stacked parameters and values
    """

    sites: Mapping[str, SiteRecord]
    observed: Tuple[str, ...]
    guide: ProgramDependencies
    model: ProgramDependencies
    kl_groups: Tuple[Tuple[str, ...], ...] = ()
    observed_groups: Tuple[Tuple[str, ...], ...] = ()

    def analytic_sites(self) -> Tuple[str, ...]:
        return tuple(n for n, r in self.sites.items() if r.estimator == "analytic")

    def mc_sites(self) -> Tuple[str, ...]:
        return tuple(n for n, r in self.sites.items() if r.estimator == "mc")

    def score_function_sites(self) -> Tuple[str, ...]:
        """Non-reparameterised guide sites, which get a score-function term."""
        return tuple(n for n, r in self.sites.items() if not r.reparameterized)

    def __str__(self) -> str:
        def fmt(names: frozenset, order: Tuple[str, ...]) -> str:
            ranked = sorted(names, key=lambda n: order.index(n) if n in order else len(order))
            text = ", ".join(ranked[:3])
            return (text + f" (+{len(ranked) - 3})") if len(ranked) > 3 else (text or "-")

        rows = [("site", "estimator", "guide parents", "model parents", "reason")]
        for name, rec in self.sites.items():
            rows.append(
                (
                    name,
                    rec.estimator,
                    fmt(rec.guide_parents, self.guide.order),
                    fmt(rec.model_parents, self.model.order),
                    rec.reason,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4]
            for row in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 6)
        for name in self.score_function_sites():
            rec = self.sites[name]
            terms = []
            for term, summed in zip(rec.downstream, rec.downstream_summed):
                plates = ", ".join(sorted(f"'{f.name}'" for f in summed))
                terms.append(term + (f" (summed over plate {plates})" if summed else ""))
            line = f"score function at {name}: cost = {' + '.join(terms) or '0'}"
            lines.append(line + (f"; baseline: {rec.baseline}" if rec.baseline else ""))
        n_an = len(self.analytic_sites())
        lines.append(
            f"{n_an} analytic, {len(self.sites) - n_an} Monte Carlo, "
            f"{len(self.observed)} observed site(s)"
        )
        return "\n".join(lines)
