# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

r"""
Score-function (REINFORCE) terms for non-reparameterised guide sites, with
analytic KL terms among the costs: their planning (which terms each site's cost
sums, over which plates, and which baseline it gets; run by
:func:`~pyro_markov_kl.plan.build_plan` once per structure) and their values
(every step).

For a non-reparameterised guide site :math:`k` the surrogate ELBO gains

.. math::

    \log q_k(z_k)\,\big(C_k - b_k\big)_{\text{detached}},
    \qquad C_k = \sum_{t \in \mathrm{downstream}(k)} \ell_t,

where :math:`\ell_t` is either :math:`\log p_t - \log q_t` at the sample or,
where the plan allows it, :math:`-\mathrm{KL}_t` conditioned on the sampled
parents, and :math:`b_k` a baseline: the site's own
``infer={"baseline": ...}`` or else, by default, the leave-one-out baseline
(:func:`leave_one_out_baseline`). By the tower property the
score term only needs :math:`\mathbb{E}[C_k \mid z_k, \text{ancestors}]`, and
where the substitution is valid
:math:`-\mathrm{KL}_t(\mathrm{pa}) = \mathbb{E}[\log p_t - \log q_t \mid \mathrm{pa}]`,
so the analytic term may stand in :math:`C_k`, with less variance. Terms that
do not depend on :math:`z_k` are left out (Rao-Blackwellisation), and terms in
plates are summed down to :math:`k`'s plates, as in
:class:`~pyro.infer.tracegraph_elbo.TraceGraph_ELBO`, whose baseline options
(``infer={"baseline": {...}}``) are accepted unchanged.

References

[1] Gradient Estimation Using Stochastic Computation Graphs,
    John Schulman, Nicolas Heess, Theophane Weber, Pieter Abbeel (NeurIPS 2015)

[2] Neural Variational Inference and Learning in Belief Networks,
    Andriy Mnih, Karol Gregor (ICML 2014)

[3] Buy 4 REINFORCE Samples, Get a Baseline for Free!,
    Wouter Kool, Herke van Hoof, Max Welling (ICLR 2019 workshop DeepRLStructPred)

[4] Variational Inference for Monte Carlo Objectives,
    Andriy Mnih, Danilo J. Rezende (ICML 2016)
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from typing import Any, Callable, Dict, List, Mapping, Tuple

import torch
from pyro.infer.tracegraph_elbo import _construct_baseline
from pyro.infer.util import MultiFrameTensor
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.trace_struct import Trace

from .dependencies import ProgramDependencies
from .records import Plan, SiteRecord
from .terms import Term

__all__ = [
    "add_baselines",
    "add_cost_bases",
    "add_downstream_costs",
    "downstream_cost",
    "leave_one_out_baseline",
    "score_function_terms",
    "site_plates",
]


# --- planning: each site's cost and baseline (part of the plan, once per structure) -------------
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


def add_baselines(
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


def add_cost_bases(
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


# --- the terms (every step) -------------------------------------------------------------------


def score_function_terms(plan: Plan, terms: List[Term], guide_trace: Trace) -> Tuple[Any, Any]:
    """
    :returns: the score-function part of the surrogate ELBO and the baselines'
        loss, both ``0.0`` when every guide site is reparameterised
    """
    surrogate_elbo: Any = 0.0
    baseline_loss: Any = 0.0
    names = plan.score_function_sites()
    if not names:
        return surrogate_elbo, baseline_loss
    by_name = {term.name: term for term in terms}
    costs: Dict[str, Any] = {}  # before baselines, for the sites whose cost extends them
    position = {n: i for i, n in enumerate(plan.guide.order)}
    for name in sorted(names, key=lambda n: position.get(n, -1), reverse=True):
        rec = plan.sites[name]
        if not rec.downstream:
            continue  # nothing depends on z_k: its score term is zero
        site = guide_trace.nodes[name]
        cost = costs[name] = downstream_cost(
            rec, by_name, site["cond_indep_stack"], costs.get(rec.cost_base)
        )
        use_baseline, baseline_loss_term, baseline = _construct_baseline(name, site, cost)
        if use_baseline:
            cost = cost - baseline
            baseline_loss = baseline_loss + baseline_loss_term
        term = by_name.get(name)
        score_function = term.log_q if term is not None else None
        if score_function is None:  # the term did not evaluate log q (an analytic term)
            score_function = site["fn"].log_prob(site["value"])
        if rec.baseline_frames and not use_baseline:
            cost = cost - leave_one_out_baseline(
                cost, score_function.shape, rec.baseline_frames, site["mask"]
            )
        surrogate_elbo = surrogate_elbo + (score_function * cost.detach()).sum()
    return surrogate_elbo, baseline_loss


def downstream_cost(
    rec: SiteRecord, by_name: Dict[str, Term], cond_indep_stack: tuple, base_cost: Any = None
) -> Any:
    """
    The cost :math:`C_k` of a score-function site, element by element: its
    downstream terms summed down to the site's plates, except those summed
    over the plates across which they depend on the site
    (:attr:`~pyro_markov_kl.records.SiteRecord.downstream_summed`).

    :param base_cost: the cost of the site's
        :attr:`~pyro_markov_kl.records.SiteRecord.cost_base`, if any: then only the
        other terms are added to it
    """
    indices = range(len(rec.downstream)) if base_cost is None else rec.cost_extra
    groups: Dict[frozenset, list] = {}
    for i in indices:
        groups.setdefault(rec.downstream_summed[i], []).append(by_name[rec.downstream[i]])
    cost: Any = 0.0 if base_cost is None else base_cost
    for summed, group in groups.items():
        target = frozenset(f for f in cond_indep_stack if f.vectorized) - summed
        cost = cost + MultiFrameTensor(*((t.frames, t.value) for t in group)).sum_to(target)
    return cost


def leave_one_out_baseline(
    cost: torch.Tensor, shape: torch.Size, frames: Tuple[Any, ...], mask: Any = None
) -> torch.Tensor:
    r"""
    The leave-one-out baseline of a score-function site :math:`k` whose
    elements :math:`i` lie in the plates ``frames``: the mean cost of the
    other elements,

    .. math::

        b_i = \frac{1}{n - 1} \sum_{j \ne i} C_j,

    detached, over the :math:`n` elements that share :math:`i`'s index in
    every other dimension. It is unbiased because :math:`C_j`, for
    :math:`j \ne i`, is a function of element :math:`j`'s samples alone
    (the plan checks that every term of the cost lies in these plates element
    by element), which the plate declares conditionally independent of
    :math:`z_{k,i}` given its parents, so that
    :math:`\mathbb{E}[\nabla \log q(z_{k,i})\, b_i] = 0`. The vectorised
    particles of ``vectorize_particles=True`` are such a plate [3, 4]. The
    baseline removes what the elements' costs have in common, typically the
    large offset of a sum of many log-densities, which otherwise multiplies
    every score. Where the site has a mask, masked elements get a baseline of
    ``0`` (their cost stays as TraceGraph_ELBO has it) and are left out of the
    other elements' means.

    :param cost: the downstream cost, summed down to the site's plates
    :param shape: the shape of the site's ``log_prob``
    :param frames: the plates to leave one out over
    :param mask: the site's ``mask`` (``None``, a bool or a bool tensor)
    :returns: the baseline, of shape ``shape``, without gradient
    """
    if torch.is_tensor(mask) and torch.broadcast_shapes(shape, mask.shape) != shape:
        # a mask with dimensions beyond the site's (without validation, as Trace_ELBO runs
        # it): an element counts as masked where it is masked in every one of them
        extra = mask.dim() - len(shape)
        full = mask.expand(torch.broadcast_shapes(shape, mask.shape))
        mask = full.reshape((-1,) + full.shape[extra:]).any(0) if extra > 0 else full
        mask = mask if mask.shape == shape else None  # enlarges a dimension of size 1
    cost = cost.detach().expand(shape)
    dims = tuple(f.dim for f in frames)
    if mask is None or mask is True:
        n = math.prod(shape[d] for d in dims)
        return (cost.sum(dims, keepdim=True) - cost) / (n - 1)
    if mask is False:
        return torch.zeros_like(cost)
    keep = mask.expand(shape)
    kept = torch.where(keep, cost, torch.zeros_like(cost))
    others = kept.sum(dims, keepdim=True) - kept
    n_others = keep.sum(dims, keepdim=True) - keep.to(torch.long)
    baseline = others / n_others.clamp(min=1)
    return torch.where(keep, baseline, torch.zeros_like(baseline))
