# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

r"""
Score-function (REINFORCE) terms for non-reparameterised guide sites, with
analytic KL terms among the costs.

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

import math
from typing import Any, Dict, List, Tuple

import torch
from pyro.infer.tracegraph_elbo import _construct_baseline
from pyro.infer.util import MultiFrameTensor
from pyro.poutine.trace_struct import Trace

from .plan import Plan, SiteRecord
from .terms import Term


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
    (:attr:`~pyro_markov_kl.plan.SiteRecord.downstream_summed`).

    :param base_cost: the cost of the site's
        :attr:`~pyro_markov_kl.plan.SiteRecord.cost_base`, if any: then only the
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
