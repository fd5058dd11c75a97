# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
The estimator plan of
:class:`~pyro_markov_kl.trace_enum_markov_kl_elbo.TraceEnumMarkovKL_ELBO`:
which latent sites of a pair of traces packed by
:class:`~pyro.infer.traceenum_elbo.TraceEnum_ELBO` get the analytic KL
(:func:`build_enum_plan`), and the :class:`EnumPlan` that records it. The
substitution of the analytic terms into the packed traces is in
:mod:`pyro_markov_kl.trace_enum_markov_kl_elbo`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any, Dict, Mapping, Optional, Tuple

from pyro.poutine.trace_struct import Trace

from .dependencies import ProgramDependencies
from .plan import bias_reason, find_site_kl_rule
from .records import Plan, SiteRecord
from .score_function import add_downstream_costs, site_plates
from .sites import check_model_guide_sites, is_reparameterized, kl_option, sample_sites

__all__ = ["EnumPlan", "build_enum_plan"]


@dataclass(frozen=True)
class EnumPlan(Plan):
    """
    A :class:`~pyro_markov_kl.records.Plan` for
    :class:`~pyro_markov_kl.trace_enum_markov_kl_elbo.TraceEnumMarkovKL_ELBO`.
    Latent sites enumerated in the guide have ``estimator == "enum"``
    (TraceEnum_ELBO sums over their values exactly).

    :ivar model_enumerated: sites enumerated in the model (not in the guide),
        summed out by TraceEnum_ELBO, in model order
    :ivar guide_enumerated: sites enumerated in the guide, in guide order
    """

    model_enumerated: Tuple[str, ...] = ()
    guide_enumerated: Tuple[str, ...] = ()

    def score_function_sites(self) -> Tuple[str, ...]:
        """Non-reparameterised guide sites that are sampled, not enumerated: DiCE factors."""
        return tuple(
            n
            for n, r in self.sites.items()
            if not r.reparameterized and n not in self.guide_enumerated
        )

    def __str__(self) -> str:
        lines = super().__str__().split("\n")[:-1]  # all but the count line
        if self.model_enumerated:
            names = self.model_enumerated
            shown = ", ".join(names[:4]) + (f" (+{len(names) - 4})" if len(names) > 4 else "")
            lines.append(f"enumerated in the model (summed out exactly): {shown}")
        counts = {e: 0 for e in ("analytic", "mc", "enum")}
        for rec in self.sites.values():
            counts[rec.estimator] = counts.get(rec.estimator, 0) + 1
        lines.append(
            f"{counts['analytic']} analytic, {counts['mc']} Monte Carlo, {counts['enum']} "
            f"enumerated in the guide, {len(self.model_enumerated)} enumerated in the model, "
            f"{len(self.observed)} observed site(s)"
        )
        return "\n".join(lines)


def _model_enumerated(model_trace: Trace, guide_trace: Trace) -> Dict[str, str]:
    """Model sites enumerated in the model, not in the guide: name -> enumeration symbol."""
    return {
        name: site["infer"].get("_enumerate_symbol", "")
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample"
        and name not in guide_trace.nodes
        and site["infer"].get("_enumerate_dim") is not None
    }


def _is_enumerated(guide_site: Mapping) -> bool:
    return bool(guide_site["infer"].get("enumerate"))


def _without(trace: Trace, names: Any) -> Trace:
    filtered = Trace(graph_type=trace.graph_type)
    filtered.nodes.update((n, s) for n, s in trace.nodes.items() if n not in names)
    return filtered


def _ordinal(site: Mapping) -> frozenset:
    return frozenset(f.name for f in site["cond_indep_stack"] if f.vectorized)


def _fallback(common: Dict[str, Any], reason: str) -> SiteRecord:
    """A Monte Carlo record, or an error for ``infer={"kl": "analytic"}``."""
    if common["override"] == "analytic":
        raise ValueError(
            f"site '{common['name']}': infer={{'kl': 'analytic'}} is not possible: {reason}. "
            "Use infer={'kl': 'auto'}"
        )
    return SiteRecord(estimator="mc", reason=reason, **common)


def build_enum_plan(
    model_trace: Trace,
    guide_trace: Trace,
    guide_deps: ProgramDependencies,
    model_deps: ProgramDependencies,
    kl_rules: Optional[Mapping[Tuple[type, type], Any]] = None,
) -> EnumPlan:
    r"""
    Decide the estimator of every latent site of a pair of traces packed by
    :class:`~pyro.infer.traceenum_elbo.TraceEnum_ELBO` (sites enumerated in
    the model carry ``infer["_enumerate_dim"]``, every site
    ``site["packed"]["log_prob"]``).

    A latent site sampled in the guide gets the analytic KL iff (checked in
    this order; the first that fails gives the reason):

    1. ``infer={"kl": "mc"}`` is not set;
    2. its model ``log_prob`` carries no dimension of a site enumerated in the
       model (otherwise TraceEnum_ELBO sums that site out inside the log);
    3. the guide samples it with ``rsample`` (the non-reparameterised case is
       left to TraceEnum_ELBO's DiCE estimator);
    4. no model parent of it is a guide descendant of it (the core rule);
    5. a KL rule applies (as in :func:`pyro_markov_kl.plan.build_plan`).

    Sites enumerated in the guide get ``"enum"``, except those sampled
    ``num_samples`` times (``"mc"``); auxiliary guide sites get ``"mc"`` (or
    ``"enum"`` if enumerated).

    :raises ValueError: for ``infer={"kl": "analytic"}`` on a site that fails
        2--5, and for inconsistent model/guide pairs
    """
    enumerated = _model_enumerated(model_trace, guide_trace)
    check_model_guide_sites(_without(model_trace, enumerated), guide_trace, strict=True)
    symbol_to_site = {sym: name for name, sym in enumerated.items() if sym}
    model_sites = sample_sites(model_trace)
    guide_sites = sample_sites(guide_trace)
    latents = frozenset(guide_sites)
    descendants = guide_deps.descendants()
    guide_enumerated = tuple(n for n, s in guide_sites.items() if _is_enumerated(s))

    records: Dict[str, SiteRecord] = {}
    observed = []
    for name, model_site in model_sites.items():
        if model_site["is_observed"]:
            observed.append(name)
            continue
        if name in enumerated:
            continue
        guide_site = guide_sites[name]
        option = kl_option(name, guide_site)
        common = dict(
            name=name,
            guide_parents=guide_deps.parents[name] & latents,
            model_parents=model_deps.parents[name] & (latents | frozenset(enumerated)),
            guide_descendants=descendants[name],
            override=option,
            reparameterized=is_reparameterized(guide_site),
        )
        fallback = functools.partial(_fallback, common)

        if _is_enumerated(guide_site):
            num_samples = guide_site["infer"].get("num_samples")
            if option == "analytic":
                raise ValueError(
                    f"site '{name}': infer={{'kl': 'analytic'}} on a site enumerated in the "
                    "guide; TraceEnum_ELBO already sums over its values"
                )
            if num_samples is not None:
                records[name] = SiteRecord(
                    estimator="mc",
                    reason=f"sampled {num_samples} times in parallel in the guide "
                    "(infer num_samples): TraceEnum_ELBO's estimator",
                    **common,
                )
            else:
                how = guide_site["infer"]["enumerate"]
                records[name] = SiteRecord(
                    estimator="enum",
                    reason=f"enumerated in the guide ({how}): TraceEnum_ELBO sums over its "
                    "values exactly",
                    **common,
                )
            continue
        if option == "mc":
            records[name] = SiteRecord(
                estimator="mc", reason="forced by infer={'kl': 'mc'}", **common
            )
            continue
        dims = getattr(model_site["packed"]["log_prob"], "_pyro_dims", "")
        involved = [symbol_to_site[d] for d in dims if d in symbol_to_site]
        if involved:
            order = tuple(model_trace.nodes)
            involved.sort(key=order.index)
            reason = f"model factor involves enumerated site {involved[0]}"
            if len(involved) > 1:
                reason += f" (and {len(involved) - 1} more)"
            records[name] = fallback(
                reason + ", which TraceEnum_ELBO sums out inside the log-likelihood"
            )
            continue
        if not common["reparameterized"]:
            records[name] = fallback(
                "the guide does not reparameterise it: TraceEnum_ELBO's DiCE estimator"
            )
            continue
        reason = bias_reason(
            name, common["model_parents"], common["guide_descendants"], guide_deps, model_deps
        )
        if reason is not None:
            records[name] = fallback(reason)
            continue
        rule, why, _, _ = find_site_kl_rule(model_site, guide_site, kl_rules)
        if rule is None:
            records[name] = fallback(why)
            continue
        enum_parents = [n for n in guide_enumerated if n in common["guide_parents"]]
        where = f" (depends on {', '.join(enum_parents)}, enumerated in the guide)" * bool(
            enum_parents
        )
        records[name] = SiteRecord(
            estimator="analytic",
            reason=f"no enumerated site in its model factor and no model parent depends on it "
            f"in the guide; KL by {rule.description}{where}",
            kl_rule=rule,
            **common,
        )

    for name, guide_site in guide_sites.items():
        if name not in model_sites:
            records[name] = SiteRecord(
                name=name,
                estimator="enum" if _is_enumerated(guide_site) else "mc",
                reason="auxiliary guide site: contributes -log q",
                guide_parents=guide_deps.parents[name] & latents,
                guide_descendants=descendants[name],
                reparameterized=is_reparameterized(guide_site),
            )

    _check_plate_coupling(
        records, guide_enumerated, observed, model_sites, guide_sites, model_deps, guide_deps.order
    )
    # DiCE weights every cost at the same or a nested plate ordinal
    ordinals = {n: _ordinal(s) for n, s in model_sites.items() if n not in enumerated}
    ordinals.update((n, _ordinal(s)) for n, s in guide_sites.items() if n not in model_sites)
    for name, rec in list(records.items()):
        if not rec.reparameterized and name not in guide_enumerated:
            own = _ordinal(guide_sites[name])
            downstream = tuple(n for n, o in ordinals.items() if own <= o)
            records[name] = replace(
                rec, downstream=downstream, downstream_summed=(frozenset(),) * len(downstream)
            )

    return EnumPlan(
        sites=records,
        observed=tuple(observed),
        guide=guide_deps,
        model=model_deps,
        model_enumerated=tuple(enumerated),
        guide_enumerated=guide_enumerated,
    )


def _check_plate_coupling(
    records: Dict[str, SiteRecord],
    guide_enumerated: Tuple[str, ...],
    observed: list,
    model_sites: Dict[str, Any],
    guide_sites: Dict[str, Any],
    model_deps: ProgramDependencies,
    guide_order: Tuple[str, ...],
) -> None:
    """
    :raises NotImplementedError: naming the site, where a sampled
        non-reparameterised guide site reaches a cost term in one of its plates
        through a site outside that plate: element :math:`j` of the term then
        depends on element :math:`i` of the site, which DiCE, weighting element
        :math:`j` by element :math:`j`'s factor only, leaves out (biased).
    """
    if all(r.reparameterized or n in guide_enumerated for n, r in records.items()):
        return
    latents = frozenset(guide_sites)
    plates = site_plates(model_sites, guide_sites)
    costs = add_downstream_costs(records, observed, model_deps, latents, plates, guide_order)
    for name, rec in costs.items():
        if rec.reparameterized or name in guide_enumerated:
            continue
        for term, summed in zip(rec.downstream, rec.downstream_summed):
            if summed:
                plate = sorted(f.name for f in summed)[0]
                raise NotImplementedError(
                    f"site '{name}': the cost term {term} depends on it across plate "
                    f"'{plate}' (through a site outside the plate), which TraceEnum_ELBO's DiCE "
                    "estimator of non-reparameterised sites leaves out, biasing the gradient; "
                    "use pyro_markov_kl.TraceMarkovKL_ELBO, which sums such terms over the plate"
                )
