# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

r"""
The estimator plan: which ELBO estimator each sample site gets, and why.

For a latent site :math:`s` with guide factor :math:`q_s(z_s \mid \mathrm{pa}_q(s))`
and model factor :math:`p_s(z_s \mid \mathrm{pa}_p(s))`, the Monte Carlo term
:math:`\log p_s - \log q_s` may be replaced by its conditional expectation

.. math::

    \mathbb{E}_{q_s(z_s \mid \mathrm{pa}_q(s))}\left[\log p_s - \log q_s\right]
    = -\mathrm{KL}\left(q_s(\cdot \mid \mathrm{pa}_q(s)) \,\|\,
      p_s(\cdot \mid \mathrm{pa}_p(s))\right)

evaluated at the sampled parents, without bias, whenever no model parent
of :math:`s` is a guide descendant of :math:`s`: by the local Markov property
of the guide, :math:`z_s` is independent of its non-descendants given
:math:`\mathrm{pa}_q(s)`, so integrating :math:`z_s` out given every other
non-descendant is integrating against :math:`q_s(\cdot \mid \mathrm{pa}_q(s))`
with :math:`\mathrm{pa}_p(s)` held fixed. If a model parent is a descendant,
it moves with :math:`z_s` and the substitution is biased in general, so the
plan uses Monte Carlo there.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
from pyro.poutine.trace_struct import Trace

from .batched_kl import is_stackable
from .dependencies import ProgramDependencies
from .kl import KLRule, find_kl_rule
from .plan_cache import fn_signature
from .records import Plan, SiteRecord
from .score_function import add_baselines, add_cost_bases, add_downstream_costs, site_plates
from .sites import (
    check_model_guide_sites,
    has_mask,
    is_model_latent,
    is_reparameterized,
    kl_option,
    observed_site_factors,
    sample_sites,
    site_factors,
)

__all__ = [
    "Plan",
    "SiteRecord",
    "auxiliary_record",
    "bias_reason",
    "build_plan",
    "find_site_kl_rule",
    "observed_groups",
]


def _first_in_order(names: frozenset, order: Tuple[str, ...]) -> str:
    return min(names, key=order.index)


def bias_reason(
    name: str,
    model_parents: frozenset,
    guide_descendants: frozenset,
    guide_deps: ProgramDependencies,
    model_deps: ProgramDependencies,
) -> Optional[str]:
    """
    Why the KL substitution at ``name`` would be biased (a model parent that
    is a guide descendant), or ``None`` if it would not.
    """
    biased = model_parents & guide_descendants
    if not biased:
        return None
    parent = _first_in_order(biased, guide_deps.order)
    reason = f"model parent {parent} is sampled after {name} in the guide and depends on it"
    if len(biased) > 1:
        reason += f" (and {len(biased) - 1} more)"
    why_unknown = guide_deps.unknown.get(parent) or model_deps.unknown.get(name)
    if why_unknown:
        reason += f"; dependencies not fully known: {why_unknown}"
    return reason


def find_site_kl_rule(
    model_site: Mapping,
    guide_site: Mapping,
    kl_rules: Optional[Mapping[Tuple[type, type], Any]] = None,
) -> Tuple[Optional[KLRule], str, Any, Any]:
    r"""
    The KL rule for a site's unwrapped guide and model distributions, tried
    once on this trace's values, or ``None`` and the reason there is none.

    A rule found by the types can still refuse the pair by its values, with
    ``NotImplementedError``: torch's KL of two ``TransformedDistribution`` objects
    with different transforms, or of two ``Independent`` objects over different
    dimensions, for instance. :func:`~pyro_markov_kl.kl.find_kl_rule` tries the
    rule once (per plan, not per step), which makes such a site a Monte Carlo
    site whose reason the plan shows, instead of an error in the terms; the
    value conditions it depends on (equal transforms) are part of the plan key
    (:func:`~pyro_markov_kl.plan_cache.structure_key`).

    :returns: ``(rule, reason, q, p)``
    """
    q, p = site_factors(model_site, guide_site)[:2]
    if has_mask(q) or has_mask(p):
        return (
            None,
            "a .mask() varies inside the event and the other side cannot be taken apart "
            "element by element (it is not an Independent over the same dimensions), and a "
            "KL of masked distributions is biased where the model's and the guide's masks "
            "differ",
            q,
            p,
        )
    rule, why = find_kl_rule(q, p, kl_rules)
    return rule, why, q, p


def build_plan(
    model_trace: Trace,
    guide_trace: Trace,
    guide_deps: ProgramDependencies,
    model_deps: ProgramDependencies,
    kl_rules: Optional[Mapping[Tuple[type, type], Any]] = None,
    leave_one_out: bool = True,
    check_sites: bool = True,
) -> Plan:
    """
    Decide the estimator of every site.

    :param model_trace: the model's trace, run on the guide's samples
    :param guide_trace: the guide's trace
    :param guide_deps: the guide's dependency graph
    :param model_deps: the model's dependency graph
    :param kl_rules: KL rules scoped to one ELBO instance
    :param leave_one_out: whether score-function sites without a baseline of
        their own get the leave-one-out baseline where it is unbiased
    :param check_sites: whether to run
        :func:`~pyro_markov_kl.sites.check_model_guide_sites` on the traces;
        ``False`` where the caller has checked them (the ELBO does, every step
        under Pyro's validation, so that its errors come before Pyro's own)
    :raises ValueError: for ``infer={"kl": "analytic"}`` where the KL is
        unavailable or would be biased, and for inconsistent model/guide pairs
    """
    if check_sites:
        check_model_guide_sites(model_trace, guide_trace)
    model_sites = sample_sites(model_trace)
    guide_sites = sample_sites(guide_trace)
    # sampled guide values: a pyro.factor or pyro.deterministic is a function of them
    latents = frozenset(n for n, s in guide_sites.items() if not s["is_observed"])
    descendants = guide_deps.descendants()
    model_parents = model_deps.latent_parents(latents)

    records: Dict[str, SiteRecord] = {}
    observed = []
    groups: Dict[Any, list] = {}
    for name, model_site in model_sites.items():
        if model_site["is_observed"] or name not in guide_sites:
            # a model latent the guide does not sample is drawn by the model, and its term
            # is log p at that draw, as in Trace_ELBO (which warns about it under validation)
            if name not in guide_sites:
                observed.append(name)  # else one Monte Carlo term with the guide's, below
            continue
        guide_site = guide_sites[name]
        if guide_site["is_observed"]:
            continue  # auxiliary, below
        option = kl_option(name, guide_site)
        common = dict(
            name=name,
            guide_parents=guide_deps.parents[name] & latents,
            model_parents=model_parents[name],
            guide_descendants=descendants[name],
            override=option,
            reparameterized=is_reparameterized(guide_site),
        )
        if option == "mc":
            records[name] = SiteRecord(
                estimator="mc", reason="forced by infer={'kl': 'mc'}", **common
            )
            continue
        reason = bias_reason(
            name, common["model_parents"], common["guide_descendants"], guide_deps, model_deps
        )
        if reason is not None:
            if option == "analytic":
                raise ValueError(
                    f"site '{name}': infer={{'kl': 'analytic'}} would be biased: {reason}. "
                    "Reorder the guide so that it samples the model's parents of this site "
                    "without conditioning them on it, or use infer={'kl': 'auto'}"
                )
            records[name] = SiteRecord(estimator="mc", reason=reason, **common)
            continue
        rule, why, q, p = find_site_kl_rule(model_site, guide_site, kl_rules)
        if rule is None:
            if option == "analytic":
                raise ValueError(
                    f"site '{name}': infer={{'kl': 'analytic'}} but {why}. Register one with "
                    "torch.distributions.kl.register_kl, or use infer={'kl': 'auto'}"
                )
            records[name] = SiteRecord(estimator="mc", reason=why, **common)
            continue
        if is_stackable(q) and is_stackable(p):
            signature = (fn_signature(guide_site["fn"]), fn_signature(model_site["fn"]))
            groups.setdefault((rule.source, rule.description, signature), []).append(name)
        records[name] = SiteRecord(
            estimator="analytic",
            reason=f"no model parent depends on it in the guide; KL by {rule.description}",
            kl_rule=rule,
            **common,
        )

    for name, guide_site in guide_sites.items():
        if not is_model_latent(name, guide_site, model_sites):
            model_site = model_sites.get(name)
            records[name] = auxiliary_record(
                name, guide_site, model_site, guide_deps, model_parents, latents, descendants
            )

    plates = site_plates(model_sites, guide_sites)
    records = add_downstream_costs(records, observed, model_deps, latents, plates, guide_deps.order)
    records = add_baselines(records, guide_sites, plates, leave_one_out)
    records = add_cost_bases(records, guide_sites)
    return Plan(
        sites=records,
        observed=tuple(observed),
        guide=guide_deps,
        model=model_deps,
        kl_groups=tuple(tuple(g) for g in groups.values() if len(g) > 1),
        observed_groups=observed_groups(model_sites, observed),
    )


def observed_groups(model_sites: Mapping[str, Mapping], observed: Sequence[str]) -> tuple:
    """
    The observed sites (``obs=``) whose distributions, once their masks are
    taken off, are stackable (:func:`~pyro_markov_kl.batched_kl.is_stackable`),
    grouped by their structure through the wrappers and by the value's shape
    and type: the emissions of a Markov chain, whose log-densities
    :func:`~pyro_markov_kl.terms.batched_observed_term` computes in one call.
    """
    groups: Dict[Any, list] = {}
    for name in observed:
        site = model_sites[name]
        value = site["value"]
        if not site["is_observed"] or not torch.is_tensor(value):
            continue
        factors = observed_site_factors(site)
        if factors is None or not is_stackable(factors[0]):
            continue
        key = (fn_signature(site["fn"]), tuple(value.shape), value.dtype)
        groups.setdefault(key, []).append(name)
    return tuple(tuple(g) for g in groups.values() if len(g) > 1)


def auxiliary_record(
    name: str,
    guide_site: Mapping,
    model_site: Optional[Mapping],
    guide_deps: ProgramDependencies,
    model_parents: Mapping[str, frozenset],
    latents: frozenset,
    descendants: Mapping[str, frozenset],
) -> SiteRecord:
    r"""
    The record of a guide site that is not a latent of the model: its term is
    :math:`-\log q` (and the model's :math:`\log p` where the model has an
    observed site of the same name), Monte Carlo, exactly as Trace_ELBO counts it.
    """
    if guide_site["is_observed"]:
        what = "observed guide site (pyro.factor, pyro.deterministic or obs=...)"
    elif guide_site["infer"].get("is_auxiliary"):
        what = "auxiliary guide site"
    elif model_site is None:
        what = "guide site not in the model"
    else:
        what = "guide site observed in the model"
    reparameterized = is_reparameterized(guide_site)
    if model_site is not None:
        what += ": contributes log p - log q at the observed value"
        parents = model_parents.get(name, frozenset())
    else:
        what += ": contributes -log q"
        parents = frozenset()
    return SiteRecord(
        name=name,
        estimator="mc",
        reason=what,
        guide_parents=guide_deps.parents[name] & latents,
        model_parents=parents,
        guide_descendants=descendants[name],
        reparameterized=reparameterized,
        auxiliary=True,
        opaque=bool(guide_site["is_observed"]) and not reparameterized,
    )
