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

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.trace_struct import Trace
from torch.distributions import Independent, TransformedDistribution

from .batched_kl import is_stackable
from .dependencies import ProgramDependencies, is_subsample_site
from .kl import KLRule, compute_kl, find_kl_rule
from .terms import has_mask, site_factors

KL_OPTIONS = ("auto", "mc", "analytic")


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
    """

    sites: Mapping[str, SiteRecord]
    observed: Tuple[str, ...]
    guide: ProgramDependencies
    model: ProgramDependencies
    kl_groups: Tuple[Tuple[str, ...], ...] = ()

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


def kl_option(name: str, guide_site: Mapping) -> str:
    """
    The site's ``infer["kl"]``. As for every ``infer`` option in Pyro, the
    guide's setting is the one that counts: replaying the model on the guide
    trace gives each shared model site the guide site's ``infer`` dict.
    """
    option = guide_site["infer"].get("kl", "auto")
    if option not in KL_OPTIONS:
        raise ValueError(
            f"site '{name}': unknown infer={{'kl': {option!r}}}; "
            f"expected one of {', '.join(repr(o) for o in KL_OPTIONS)}"
        )
    return option


def is_reparameterized(site: Mapping) -> bool:
    """Whether a guide site's sample is a differentiable function of its parameters."""
    return bool(getattr(site["fn"], "has_rsample", False))


def sample_sites(trace: Trace) -> Dict[str, dict]:
    """The sample sites of ``trace`` without subsample sites, in order."""
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not is_subsample_site(site)
    }


def check_model_guide_sites(model_trace: Trace, guide_trace: Trace, strict: bool = False) -> None:
    """
    The model/guide consistency checks that hold whatever Pyro's validation
    setting, with errors that name the site. Guide sites that are not latents
    of the model (observed in the guide or the model, or missing from the
    model) are auxiliary, as in Trace_ELBO, which under validation warns about
    the last (:func:`pyro.util.check_model_guide_match`).

    A model latent without a guide site is drawn by the model and counts as
    ``log p`` at that draw, as in Trace_ELBO (which warns under validation).

    :param strict: also reject those guide sites and such model latents (for
        :class:`~pyro_markov_kl.trace_enum_markov_kl_elbo.TraceEnumMarkovKL_ELBO`)
    :raises ValueError: naming the site, if the model's and the guide's event
        shapes differ (with the words of Pyro's error for the same situation,
        "Model and guide event_dims disagree" or "Model and guide shapes
        disagree"); with ``strict``, if a guide site is observed, observed in
        the model, or neither in the model nor auxiliary, or a model latent has
        no guide site
    """
    model_sites = sample_sites(model_trace)
    guide_sites = sample_sites(guide_trace)
    if strict:
        for name, site in model_sites.items():
            if not site["is_observed"] and name not in guide_sites:
                raise ValueError(
                    f"site '{name}' is a latent sample site of the model but the guide has no "
                    "site of that name; add it to the guide, or observe it in the model "
                    "(obs=...)"
                )
    for name, site in guide_sites.items():
        if strict:
            _check_strict(name, site, model_sites)
        if name not in model_sites or site["is_observed"] or model_sites[name]["is_observed"]:
            continue
        q_event = site["fn"].event_shape
        p_event = model_sites[name]["fn"].event_shape
        if q_event != p_event:
            if len(q_event) != len(p_event):
                pyro_words = (
                    f"Model and guide event_dims disagree at site '{name}': "
                    f"{len(p_event)} vs {len(q_event)}"
                )
            else:
                pyro_words = (
                    f"Model and guide shapes disagree at site '{name}': "
                    f"{tuple(p_event)} vs {tuple(q_event)} (event shapes)"
                )
            raise ValueError(
                f"{pyro_words}. The guide's distribution has event shape {tuple(q_event)} but "
                f"the model's has {tuple(p_event)}; make them agree (declare the same "
                "dimensions as event dimensions on both sides, e.g. .to_event(1) in both)"
            )


def _check_strict(name: str, site: Mapping, model_sites: Mapping[str, Mapping]) -> None:
    if site["is_observed"]:
        raise ValueError(
            f"guide site '{name}' is observed (obs=...); observations belong in the model"
        )
    if name not in model_sites and not site["infer"].get("is_auxiliary"):
        raise ValueError(
            f"guide site '{name}' does not appear in the model; mark it "
            "infer={'is_auxiliary': True} if it is an auxiliary variable of the guide"
        )
    if name in model_sites and model_sites[name]["is_observed"]:
        raise ValueError(
            f"site '{name}' is observed in the model but sampled in the guide; "
            "remove it from the guide"
        )


def is_model_latent(name: str, guide_site: Mapping, model_sites: Mapping[str, Mapping]) -> bool:
    """Whether a guide site is a latent of the model: sampled in both, observed in neither."""
    model_site = model_sites.get(name)
    return (
        model_site is not None and not model_site["is_observed"] and not guide_site["is_observed"]
    )


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
    name: str,
    model_site: Mapping,
    guide_site: Mapping,
    kl_rules: Optional[Mapping[Tuple[type, type], Any]] = None,
) -> Tuple[Optional[KLRule], str, Any, Any]:
    """
    The KL rule for a site's unwrapped guide and model distributions, tried
    once on this trace's values, or ``None`` and the reason there is none.

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
    if rule is not None:
        try:
            with torch.no_grad():
                compute_kl(name, q, p, rule)
        except NotImplementedError as e:
            rule, why = None, f"{rule.description} does not apply: {e}"
    return rule, why, q, p


def build_plan(
    model_trace: Trace,
    guide_trace: Trace,
    guide_deps: ProgramDependencies,
    model_deps: ProgramDependencies,
    kl_rules: Optional[Mapping[Tuple[type, type], Any]] = None,
    leave_one_out: bool = True,
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
    :raises ValueError: for ``infer={"kl": "analytic"}`` where the KL is
        unavailable or would be biased, and for inconsistent model/guide pairs
    """
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
        rule, why, q, p = find_site_kl_rule(name, model_site, guide_site, kl_rules)
        if rule is None:
            if option == "analytic":
                raise ValueError(
                    f"site '{name}': infer={{'kl': 'analytic'}} but {why}. Register one with "
                    "torch.distributions.kl.register_kl, or use infer={'kl': 'auto'}"
                )
            records[name] = SiteRecord(estimator="mc", reason=why, **common)
            continue
        if is_stackable(q) and is_stackable(p):
            signature = (_fn_signature(guide_site["fn"]), _fn_signature(model_site["fn"]))
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
    records = _add_baselines(records, guide_sites, plates, leave_one_out)
    records = _add_cost_bases(records, guide_sites)
    return Plan(
        sites=records,
        observed=tuple(observed),
        guide=guide_deps,
        model=model_deps,
        kl_groups=tuple(tuple(g) for g in groups.values() if len(g) > 1),
    )


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


def add_downstream_costs(
    records: Dict[str, SiteRecord],
    observed: list,
    model_deps: ProgramDependencies,
    latents: frozenset,
    plates: Callable[[str], frozenset],
    guide_order: Tuple[str, ...],
) -> Dict[str, SiteRecord]:
    r"""
    For every non-reparameterised guide site :math:`k`, the ELBO terms whose
    value depends on :math:`z_k`: a term depends on the sampled values it is a
    function of (an observed site's model parents; an analytic site's guide and
    model parents; a Monte Carlo site's own value besides), and it depends on
    :math:`z_k` if one of those is :math:`k` or a guide descendant of
    :math:`k`. Terms not downstream are left out of the cost
    (Rao-Blackwellisation, as in :class:`~pyro.infer.tracegraph_elbo.TraceGraph_ELBO`).

    Element :math:`i` of the cost gets element :math:`i` of a term along the
    plates of :math:`k` that every dependency path from :math:`k` to the term
    stays in, and the term summed over the others: a path through a site
    outside a plate (a global variable the guide samples from the plate's
    elements, say) makes every element of the term depend on every element
    of :math:`z_k`, and :class:`~pyro.infer.tracegraph_elbo.TraceGraph_ELBO`,
    which keeps element :math:`i` only, is biased there. Within a plate,
    computations are taken to be element by element, as Pyro's plates
    declare.
    """
    if all(r.reparameterized for r in records.values()):
        return records
    model_parents = model_deps.latent_parents(latents)
    term_inputs = {name: model_parents[name] for name in observed}
    for name, rec in records.items():
        inputs = rec.guide_parents | rec.model_parents
        term_inputs[name] = inputs if rec.estimator == "analytic" else inputs | {name}
    result = dict(records)
    for name, rec in records.items():
        if rec.reparameterized:
            continue
        if rec.opaque:
            # every term, summed over the site's plates: unbiased whatever depends on it
            terms = tuple(term_inputs)
            whole = tuple(plates(name) & plates(t) for t in terms)
            result[name] = replace(rec, downstream=terms, downstream_summed=whole)
            continue
        affected = rec.guide_descendants | {name}
        # plates along which each affected site depends on z_k element by element
        kept = {name: plates(name)}
        for s in guide_order:
            if s in affected and s not in kept and s in records:
                parents = [kept[p] for p in records[s].guide_parents if p in kept]
                kept[s] = plates(s).intersection(*parents)
        downstream, summed = [], []
        for term, inputs in term_inputs.items():
            hit = inputs & affected
            if hit:
                downstream.append(term)
                along = plates(term).intersection(*(kept.get(p, frozenset()) for p in hit))
                summed.append((kept[name] - along) & plates(term))
        result[name] = replace(rec, downstream=tuple(downstream), downstream_summed=tuple(summed))
    return result


def _add_baselines(
    records: Dict[str, SiteRecord],
    guide_sites: Mapping[str, Mapping],
    plates: Callable[[str], frozenset],
    leave_one_out: bool,
) -> Dict[str, SiteRecord]:
    r"""
    Choose the baseline of every score-function site :math:`k`: its own
    ``infer={"baseline": ...}`` if it has one, else the leave-one-out baseline
    over the plates of :math:`k` (of two or more elements) along which every
    downstream term depends on :math:`z_k` element by element (each element's
    cost then comes from that element's samples alone, which the plate
    declares conditionally independent of the other elements'), else none.
    """
    result = dict(records)
    for name, rec in records.items():
        if rec.reparameterized or not rec.downstream:
            continue
        if guide_sites[name]["infer"].get("baseline"):
            result[name] = replace(rec, baseline="infer={'baseline': ...}, as TraceGraph_ELBO")
            continue
        if not leave_one_out:
            continue
        frames, why = [], []
        shape = guide_sites[name]["fn"].batch_shape  # the plates' sizes at run time
        for f in sorted(plates(name), key=lambda f: f.dim):
            if shape[f.dim] < 2:
                continue
            outside = next(
                (
                    t
                    for t, summed in zip(rec.downstream, rec.downstream_summed)
                    if f in summed or f not in plates(t)
                ),
                None,
            )
            if outside is None:
                frames.append(f)
            else:
                why.append(f"term {outside} depends on {name} outside plate '{f.name}'")
        if frames:
            names = " x ".join(f"'{f.name}'" for f in frames)
            size = math.prod(shape[f.dim] for f in frames)
            text = f"leave-one-out over plate {names} ({size} elements)"
        else:
            text = "none: " + ("; ".join(why) if why else "no plate of two or more elements")
        result[name] = replace(rec, baseline=text, baseline_frames=tuple(frames))
    return result


def site_plates(
    model_sites: Mapping[str, Mapping], guide_sites: Mapping[str, Mapping]
) -> Callable[[str], frozenset]:
    """
    A cached function: site name -> the vectorised plates that the site fills
    with their full (subsample) size in the model and in the guide. The size
    of a plate declared without one (``pyro.plate("data")``, size ``-1``) is
    the largest size any site has at its dimension: the size it sees at run
    time.
    """
    sizes: Dict[CondIndepStackFrame, int] = {}
    for sites in (model_sites, guide_sites):
        for site in sites.values():
            shape = site["fn"].batch_shape
            for f in site["cond_indep_stack"]:
                if f.vectorized and _is_sizeless(f) and len(shape) >= -f.dim:
                    sizes[f] = max(sizes.get(f, 1), shape[f.dim])

    @functools.cache
    def plates(name: str) -> frozenset:
        sites = [s[name] for s in (model_sites, guide_sites) if name in s]
        return frozenset.intersection(*(_full_plates(site, sizes) for site in sites))

    return plates


def _add_cost_bases(
    records: Dict[str, SiteRecord], guide_sites: Mapping[str, Mapping]
) -> Dict[str, SiteRecord]:
    """
    For every score-function site, the descendant score-function site with the
    largest cost that its own cost extends (:attr:`SiteRecord.cost_base`): a
    guide descendant's downstream terms are among the site's, and they can be
    reused where both sites lie in the same plates and every shared term is
    summed over the same ones.
    """
    score = {n: r for n, r in records.items() if not r.reparameterized and r.downstream}
    if len(score) < 2:
        return records

    def frames(name: str) -> frozenset:
        return frozenset(f for f in guide_sites[name]["cond_indep_stack"] if f.vectorized)

    result = dict(records)
    for name, rec in score.items():
        candidates = sorted(
            (n for n in rec.guide_descendants if n in score),
            key=lambda n: len(score[n].downstream),
            reverse=True,
        )
        summed = dict(zip(rec.downstream, rec.downstream_summed))
        for base in candidates:
            other = score[base]
            if frames(base) == frames(name) and all(
                summed.get(t) == s for t, s in zip(other.downstream, other.downstream_summed)
            ):
                shared = set(other.downstream)
                extra = tuple(i for i, t in enumerate(rec.downstream) if t not in shared)
                result[name] = replace(rec, cost_base=base, cost_extra=extra)
                break
    return result


def _is_sizeless(frame: CondIndepStackFrame) -> bool:
    """Whether a plate was declared without a size (Pyro's size ``-1``)."""
    return not torch.is_tensor(frame.size) and frame.size == -1


def _full_plates(site: Mapping, sizes: Mapping[CondIndepStackFrame, int]) -> frozenset:
    """
    The vectorised plates a site's batch shape fills with their full (subsample)
    size, that of ``sizes`` for a plate declared without a size.
    """
    shape = site["fn"].batch_shape
    return frozenset(
        f
        for f in site["cond_indep_stack"]
        if f.vectorized and len(shape) >= -f.dim and shape[f.dim] == sizes.get(f, f.size)
    )


def _fn_signature(fn: Any) -> tuple:
    sig: list = []
    while fn is not None:
        entry: tuple = (
            type(fn),
            _shape(getattr(fn, "batch_shape", None)),
            _shape(getattr(fn, "event_shape", None)),
        )
        if isinstance(fn, Independent):
            entry += (fn.reinterpreted_batch_ndims,)
        elif isinstance(fn, TransformedDistribution):
            entry += (tuple(type(t) for t in fn.transforms),)
        elif isinstance(fn, MaskedDistribution):
            entry += (_mask_signature(fn._mask),)
        sig.append(entry)
        fn = getattr(fn, "base_dist", None)
    return tuple(sig)


def _mask_signature(mask: Any) -> Any:
    # which dimensions of a .mask() are broadcast decides whether it can be folded
    if torch.is_tensor(mask):
        return _shape(mask.shape), tuple(st == 0 for st in mask.stride())
    return mask


def _shape(shape: Any) -> Any:
    # plain ints: under Pyro's JIT, sizes hash by identity although they compare equal
    return None if shape is None else tuple(int(d) for d in shape)


def _factor_signature(x: Any) -> Any:
    # a 0-dim tensor scale is a number to the plan (Pyro's JIT turns numbers into tensors)
    if torch.is_tensor(x) and (x.dim() or x.dtype == torch.bool):
        return _shape(x.shape), x.dtype
    return x if x is None or x is True or x is False else float


class StructureKey:
    """A tuple key whose hash is computed once (plan keys are large and looked up twice)."""

    __slots__ = ("key", "_hash")

    def __init__(self, key: tuple) -> None:
        self.key = key
        self._hash = hash(key)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, StructureKey) and self._hash == other._hash and self.key == other.key
        )


def structure_key(model_trace: Trace, guide_trace: Trace) -> StructureKey:
    """
    A hashable summary of everything the plan depends on besides the program
    text: site names, types and order, distribution types (through their
    wrappers), shapes, plate stacks, observation status, ``infer`` options and
    the kinds of scale and mask. A plan is reused only for an equal key.
    """
    key = []
    frames: Dict[int, tuple] = {}  # plates are usually entered once: convert each frame once

    def frame_key(f: Any) -> tuple:
        k = frames.get(id(f))
        if k is None:
            k = frames[id(f)] = f._key()  # sizes as numbers, also when JIT made them tensors
        return k

    for trace in (guide_trace, model_trace):
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            value = site["value"]
            infer = site["infer"]
            key.append(
                (
                    name,
                    site["is_observed"],
                    _fn_signature(site["fn"]),
                    _shape(value.shape) if torch.is_tensor(value) else type(value),
                    tuple(frame_key(f) for f in site["cond_indep_stack"]),
                    infer.get("kl"),
                    infer.get("is_auxiliary"),
                    infer.get("enumerate"),
                    bool(infer.get("baseline")),
                    _factor_signature(site["scale"]),
                    _factor_signature(site["mask"]),
                )
            )
        key.append(None)
    model_nodes = model_trace.nodes
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and name in model_nodes:
            equal = _transform_equalities(site["fn"], model_nodes[name]["fn"])
            if equal:
                key.append((name, equal))
    return StructureKey(tuple(key))


def _transform_equalities(q: Any, p: Any) -> tuple:
    """
    Whether each pair of transforms of ``q`` and ``p`` (the guide's and the
    model's distribution of a site, through their wrappers) is equal, for the
    ``TransformedDistribution`` pairs whose KL rule requires equal transforms:
    a value condition that a plan depends on, so it belongs in the key. Empty,
    at the cost of a walk along the wrappers, for every other site.
    """
    equal: list = []
    while q is not None and p is not None:
        if isinstance(q, TransformedDistribution) and isinstance(p, TransformedDistribution):
            equal.extend(_same_transform(a, b) for a, b in zip(q.transforms, p.transforms))
        q, p = getattr(q, "base_dist", None), getattr(p, "base_dist", None)
    return tuple(equal)


def _same_transform(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    try:
        with torch.no_grad():
            return bool(a == b)
    except (RuntimeError, TypeError, ValueError):
        return False
