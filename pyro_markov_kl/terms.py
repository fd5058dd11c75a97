# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

r"""
One ELBO term per site.

With model factor :math:`f_p` and guide factor :math:`f_q` (``poutine.scale``
times ``poutine.mask`` times a ``.mask()``), the ELBO contribution of a latent
site is :math:`\mathbb{E}_q[f_p \log p - f_q \log q]`. Writing
:math:`f_p \log p - f_q \log q = f_p(\log p - \log q) + (f_p - f_q)\log q`,

.. math::

    \mathbb{E}_{q}[f_p \log p - f_q \log q]
    = -f_p\,\mathrm{KL}(q \,\|\, p) - (f_p - f_q)\,\mathrm{H}(q),

where the entropy :math:`\mathrm{H}(q)` is analytic when ``q.entropy()`` is
implemented and estimated by :math:`-\log q(z)` at the sample otherwise. The
second term vanishes where the factors agree, the common case; KL annealing
with ``poutine.scale`` in the model only is the usual case where they do not.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from pyro.distributions.util import scale_and_mask, sum_rightmost
from pyro.util import ignore_jit_warnings

from .batched_kl import stack_distributions
from .kl import KLDivergenceError, compute_kl
from .sites import (
    has_mask,
    observed_site_factors,
    outside_jit_trace,
    same_factor,
    shape_within,
    site_factors,
    site_log_prob_of_value,
)


class Term(NamedTuple):
    r"""
    One site's contribution to the ELBO.

    :ivar name: the site
    :ivar kind: ``"observed"``, ``"analytic"``, ``"mc"`` or ``"auxiliary"``
    :ivar value: the scaled and masked contribution, before summing over
        batch dimensions
    :ivar frames: the plates ``value``'s dimensions belong to (empty where
        ``value`` was summed to a scalar)
    :ivar surrogate: what the surrogate ELBO uses in place of ``value``: the
        same, but for a non-reparameterised site's ``-log q``, whose pathwise
        gradient has expectation zero and is left to its score function
    :ivar log_q: for a non-reparameterised guide site whose term evaluates
        :math:`\log q` at the sample (a Monte Carlo or auxiliary term), that
        log-density, not scaled or masked: the site's score function, which
        :func:`~pyro_markov_kl.score_function.score_function_terms` reuses
        instead of computing it again; else ``None``
    """

    name: str
    kind: str
    value: torch.Tensor
    frames: tuple
    surrogate: torch.Tensor
    log_q: Optional[torch.Tensor] = None


def site_log_prob(site: Dict[str, Any], log_prob: Optional[torch.Tensor] = None) -> torch.Tensor:
    """
    ``scale * mask * log_prob(value)`` of a trace site, not summed.

    :param log_prob: the site's ``log_prob(value)``, if already computed
    """
    if log_prob is None:
        log_prob = site_log_prob_of_value(site)
    return scale_and_mask(log_prob, site["scale"], site["mask"])


def mc_term(
    model_site: Dict[str, Any],
    guide_site: Dict[str, Any],
    reparameterized: bool = True,
    log_q: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    ``log p - log q`` at the sample, and its surrogate: for a
    non-reparameterised site ``-log q`` is detached (its pathwise gradient has
    expectation zero; its score function carries the gradient).

    :param log_q: the guide site's ``log_prob(value)``, if already computed
    """
    log_p, log_q = site_log_prob(model_site), site_log_prob(guide_site, log_q)
    surrogate_q = log_q if reparameterized else log_q.detach()
    with outside_jit_trace():  # shapes only: constants of a compiled graph
        same_shape = log_p.shape == log_q.shape
    if same_shape:
        return log_p - log_q, log_p - surrogate_q
    return log_p.sum() - log_q.sum(), log_p.sum() - surrogate_q.sum()


def analytic_term(
    name: str, model_site: Dict[str, Any], guide_site: Dict[str, Any], rule: Any
) -> torch.Tensor:
    r"""
    :math:`-f_p\,\mathrm{KL}(q \| p) - (f_p - f_q)\,\mathrm{H}(q)` for one site,
    not summed; see the module docstring.
    """
    q, p, scale_q, mask_q, scale_p, mask_p, k = site_factors(model_site, guide_site)
    if has_mask(q) or has_mask(p):
        # a mask inside the event that could not be lowered to the elementwise level:
        # a KL of the masked pair would be biased where the two masks differ
        return mc_term(model_site, guide_site)[0]
    kl = compute_kl(name, q, p, rule)
    term = -scale_and_mask(kl, scale_p, mask_p)
    with outside_jit_trace():  # shapes only: constants of a compiled graph
        # a factor with dimensions beyond the batch shape broadcasts its side's terms
        # (scale_and_mask): then each side sums over its own shape
        same_shape = kl.shape == q.batch_shape and all(
            _within(f, q.batch_shape) for f in (scale_q, mask_q, scale_p, mask_p)
        )
    if same_shape and same_factor(scale_p, mask_p, scale_q, mask_q):
        return sum_rightmost(term, k)
    try:
        entropy = q.entropy()
    except NotImplementedError:
        entropy = -q.log_prob(guide_site["value"])
    model_part = term - scale_and_mask(entropy, scale_p, mask_p)
    guide_part = scale_and_mask(entropy, scale_q, mask_q)
    if same_shape:
        return sum_rightmost(model_part + guide_part, k)
    # p's batch shape is larger than q's: each side sums over its own shape
    return model_part.sum() + guide_part.sum()


def _within(factor: Any, shape: torch.Size) -> bool:
    """Whether a scale or mask broadcasts to ``shape`` without enlarging it."""
    return not torch.is_tensor(factor) or shape_within(factor.shape, shape)


def _stack_factor(values: List[Any], shape: torch.Size, is_mask: bool) -> Any:
    """Stack per-site scales or masks to broadcast against a stacked KL of ``shape``."""
    first = values[0]
    if all(v is None for v in values):
        return None
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        if all(v == first for v in values):
            return first
        return torch.tensor(values).reshape((-1,) + (1,) * (len(shape) - 1))
    if all(torch.is_tensor(v) for v in values):
        with outside_jit_trace():  # shapes only: constants of a compiled graph
            same_shape = all(v.shape == first.shape for v in values)
        if same_shape:  # (scalar annealing factors): stacked as they are, broadcast after
            stacked = torch.stack(values)
            return stacked.reshape((-1,) + (1,) * (len(shape) - stacked.dim()) + first.shape)
        return torch.stack([v.expand(shape[1:]) for v in values])
    if is_mask and all(v is None or v is True or torch.is_tensor(v) for v in values):
        return torch.stack(
            [
                torch.ones(shape[1:], dtype=torch.bool)
                if v is None or v is True
                else v.expand(shape[1:])
                for v in values
            ]
        )
    raise _Unbatchable


class _Unbatchable(Exception):
    pass


def batched_analytic_term(
    names: Tuple[str, ...], model_nodes: Dict[str, Any], guide_nodes: Dict[str, Any], rule: Any
) -> Optional[torch.Tensor]:
    r"""
    The analytic terms of ``names`` from one KL call on stacked parameters
    (see :mod:`pyro_markov_kl.batched_kl`), or ``None`` where the sites cannot
    be stacked this step (a mask left inside a distribution, batch shapes that
    differ between model and guide, factors beyond the batch shape or of mixed
    kinds): the caller then computes them one by one.

    Where the factors of model and guide are not the same objects (KL annealing
    by ``poutine.scale`` with a tensor, which makes a new tensor at every site;
    masks made per site; every factor under the JIT, where values cannot be
    compared), the stacked entropy gives the term of the module docstring,
    :math:`-f_p\,\mathrm{KL} - (f_p - f_q)\,\mathrm{H}`, for all steps at once.
    """
    factors = [site_factors(model_nodes[n], guide_nodes[n]) for n in names]
    same = True
    for f in factors:
        if has_mask(f.q) or has_mask(f.p):
            return None
        with outside_jit_trace():  # shapes only: constants of a compiled graph
            shape = f.q.batch_shape
            fits = f.p.batch_shape == shape and all(
                _within(x, shape) for x in (f.scale_p, f.mask_p, f.scale_q, f.mask_q)
            )
        if not fits:
            return None
        same = same and same_factor(f.scale_p, f.mask_p, f.scale_q, f.mask_q)
    q = stack_distributions([f.q for f in factors])
    p = stack_distributions([f.p for f in factors])
    if q is None or p is None:
        return None
    label = f"{names[0]} (stacked with {len(names) - 1} other sites)"
    try:
        kl = compute_kl(label, q, p, rule)
    except KLDivergenceError:
        for n in names:  # raise the error of the first failing site, by name
            analytic_term(n, model_nodes[n], guide_nodes[n], rule)
        raise
    try:
        scale_p = _stack_factor([f.scale_p for f in factors], kl.shape, is_mask=False)
        mask_p = _stack_factor([f.mask_p for f in factors], kl.shape, is_mask=True)
        if same:
            term = -scale_and_mask(kl, scale_p, mask_p)
        else:
            scale_q = _stack_factor([f.scale_q for f in factors], kl.shape, is_mask=False)
            mask_q = _stack_factor([f.mask_q for f in factors], kl.shape, is_mask=True)
            entropy = q.entropy()
            term = -scale_and_mask(kl + entropy, scale_p, mask_p) + scale_and_mask(
                entropy, scale_q, mask_q
            )
    except (_Unbatchable, NotImplementedError):
        return None
    return sum_rightmost(term, factors[0].event_dims)


def batched_observed_term(
    names: Tuple[str, ...], model_nodes: Dict[str, Any]
) -> Optional[torch.Tensor]:
    """
    ``scale * mask * log_prob(value)`` of the observed sites ``names`` (a
    group of :func:`~pyro_markov_kl.plan.observed_groups`) from one
    ``log_prob`` call on stacked parameters and values, not summed; ``None``
    where they cannot be stacked this step (a mask left inside a distribution,
    factors of mixed kinds or beyond the batch shape) or where the stacked
    call raises (an invalid value under validation): the caller then computes
    them one by one, and a site's own error is raised by name.
    """
    dists, scales, masks, values = [], [], [], []
    k = None
    for name in names:
        site = model_nodes[name]
        factors = observed_site_factors(site)
        if factors is None or (k is not None and factors[3] != k):
            return None
        fn, scale, mask, k = factors
        with outside_jit_trace():  # shapes only: constants of a compiled graph
            fits = _within(scale, fn.batch_shape) and _within(mask, fn.batch_shape)
        if not fits:
            return None
        with ignore_jit_warnings():  # the traced sizes of the expansion are recorded
            # a value smaller than the distribution (data not expanded over a particle
            # plate) is scored as its expansion: stacked, it must have the full shape
            values.append(site["value"].expand(fn.batch_shape + fn.event_shape))
        dists.append(fn)
        scales.append(scale)
        masks.append(mask)
    stacked = stack_distributions(dists)
    if stacked is None:
        return None
    try:
        value = torch.stack(values)
        if any(d._validate_args for d in dists):
            # the stacked distribution is built without validation: check the values here,
            # and on an invalid one let the per-site terms raise the site's error
            stacked._validate_sample(value)
        log_prob = stacked.log_prob(value)
        scale = _stack_factor(scales, log_prob.shape, is_mask=False)
        mask = _stack_factor(masks, log_prob.shape, is_mask=True)
    except (_Unbatchable, ValueError, RuntimeError):
        return None
    return sum_rightmost(scale_and_mask(log_prob, scale, mask), k)


def elbo_terms(plan: Any, model_trace: Any, guide_trace: Any) -> List[Term]:
    """
    Build the ELBO term of every site of ``plan``: ``log p`` for observed
    sites, the analytic term or ``log p - log q`` for latent sites, and
    ``-log q`` for auxiliary guide sites. Log-densities are computed only
    where a term uses them.
    """
    terms: List[Term] = []
    model_nodes, guide_nodes = model_trace.nodes, guide_trace.nodes

    def add(
        name: str, kind: str, value: torch.Tensor, stack: tuple, surrogate=None, log_q=None
    ) -> None:
        frames = stack if value.dim() else ()
        surrogate = value if surrogate is None else surrogate
        terms.append(Term(name, kind, value, frames, surrogate, log_q))

    # per-site terms are needed only for score-function costs
    may_stack = not plan.score_function_sites()
    done: set = set()
    if may_stack:
        for group in plan.observed_groups:
            value = batched_observed_term(group, model_nodes)
            if value is not None:
                terms.append(Term(group[0], "observed", value, (), value))
                done.update(group)
    for name in plan.observed:
        if name not in done:
            site = model_nodes[name]
            add(name, "observed", site_log_prob(site), site["cond_indep_stack"])
    if plan.kl_groups and may_stack:
        for group in plan.kl_groups:
            value = batched_analytic_term(
                group, model_nodes, guide_nodes, plan.sites[group[0]].kl_rule
            )
            if value is not None:
                terms.append(Term(group[0], "analytic", value, (), value))
                done.update(group)
    for name, record in plan.sites.items():
        if name in done:
            continue
        guide_site = guide_nodes[name]
        stack = guide_site["cond_indep_stack"]
        model_site: Optional[Dict[str, Any]] = model_nodes.get(name)
        if record.estimator == "analytic" and model_site is not None:
            value = analytic_term(name, model_site, guide_site, record.kl_rule)
            add(name, "analytic", value, stack)
            continue
        # log q at the sample, once: also the score function of a non-reparameterised site
        log_q = None
        if not record.reparameterized:
            log_q = guide_site["fn"].log_prob(guide_site["value"])
        if model_site is None:
            value = -site_log_prob(guide_site, log_q)
            surrogate = None if record.reparameterized else value.detach()
            add(name, "auxiliary", value, stack, surrogate, log_q)
        else:
            value, surrogate = mc_term(model_site, guide_site, record.reparameterized, log_q)
            add(name, "mc", value, stack if value.dim() else (), surrogate, log_q)
    return terms


def sum_terms(terms: List[Term]) -> Tuple[Any, Any]:
    """The sums of all terms' values and surrogates over all their dimensions."""
    total: Any = 0.0
    surrogate: Any = 0.0
    for term in terms:
        value = term.value.sum()
        total = total + value
        surrogate = surrogate + (value if term.surrogate is term.value else term.surrogate.sum())
    return total, surrogate


__all__ = [
    "Term",
    "analytic_term",
    "batched_analytic_term",
    "batched_observed_term",
    "elbo_terms",
    "mc_term",
    "site_log_prob",
    "sum_terms",
]
