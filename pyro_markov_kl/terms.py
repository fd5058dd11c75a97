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
from torch.distributions import Distribution, Independent

from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.distributions.util import scale_and_mask


class Term(NamedTuple):
    """
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
    """

    name: str
    kind: str
    value: torch.Tensor
    frames: tuple
    surrogate: torch.Tensor


def _and(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    return a & b


def unwrap_mask(fn: Distribution) -> Tuple[Distribution, Any]:
    """
    Strip :class:`~pyro.distributions.torch_distribution.MaskedDistribution`
    wrappers (``.mask()``), including one under an ``Independent`` whose mask
    is broadcast along the reinterpreted dimensions (``.mask(m).to_event(1)``
    with ``m`` of shape ``(B, 1)``, as in Pyro's DMM: size 1 or stride 0 there),
    and return the bare distribution with the combined mask, or ``None`` for
    no mask.
    """
    mask = None
    while True:
        if isinstance(fn, MaskedDistribution):
            mask = _and(mask, fn._mask)
            fn = fn.base_dist
            continue
        if isinstance(fn, Independent) and isinstance(fn.base_dist, MaskedDistribution):
            k = fn.reinterpreted_batch_ndims
            inner = fn.base_dist
            m = inner._mask
            if torch.is_tensor(m):
                if m.dim() > len(inner.batch_shape) - k:
                    event_dims = range(m.dim() - k, m.dim()) if m.dim() >= k else range(m.dim())
                    if any(m.size(d) != 1 and m.stride(d) != 0 for d in event_dims):
                        break  # the mask may vary inside the event: cannot be folded
                    m = m[(Ellipsis,) + (0,) * min(k, m.dim())]
            mask = _and(mask, m)
            fn = Independent(inner.base_dist, k)
            continue
        break
    return fn, mask


def _same_factor(scale_p: Any, mask_p: Any, scale_q: Any, mask_q: Any) -> bool:
    if torch.is_tensor(scale_p) or torch.is_tensor(scale_q):
        if scale_p is not scale_q:
            return False
    elif scale_p != scale_q:
        return False
    if mask_p is mask_q:
        return True
    if torch.is_tensor(mask_p) and torch.is_tensor(mask_q):
        if torch._C._get_tracing_state():
            return False
        return mask_p.shape == mask_q.shape and bool(torch.equal(mask_p, mask_q))
    return False


def site_log_prob(site: Dict[str, Any]) -> torch.Tensor:
    """``scale * mask * log_prob(value)`` of a trace site, not summed."""
    log_p = site["fn"].log_prob(site["value"])
    return scale_and_mask(log_p, site["scale"], site["mask"])


def analytic_term(
    name: str, model_site: Dict[str, Any], guide_site: Dict[str, Any], rule: Any
) -> torch.Tensor:
    r"""
    :math:`-f_p\,\mathrm{KL}(q \| p) - (f_p - f_q)\,\mathrm{H}(q)` for one site,
    not summed; see the module docstring.
    """
    from .kl import compute_kl

    q, mask_q = unwrap_mask(guide_site["fn"])
    p, mask_p = unwrap_mask(model_site["fn"])
    mask_q = _and(guide_site["mask"], mask_q)
    mask_p = _and(model_site["mask"], mask_p)
    scale_q, scale_p = guide_site["scale"], model_site["scale"]
    kl = compute_kl(name, q, p, rule)
    term = -scale_and_mask(kl, scale_p, mask_p)
    same_shape = kl.shape == q.batch_shape
    if same_shape and _same_factor(scale_p, mask_p, scale_q, mask_q):
        return term
    try:
        entropy = q.entropy()
    except NotImplementedError:
        entropy = -q.log_prob(guide_site["value"])
    model_part = term - scale_and_mask(entropy, scale_p, mask_p)
    guide_part = scale_and_mask(entropy, scale_q, mask_q)
    if same_shape:
        return model_part + guide_part
    # p's batch shape is larger than q's: each side sums over its own shape
    return model_part.sum() + guide_part.sum()


def elbo_terms(plan: Any, model_trace: Any, guide_trace: Any) -> List[Term]:
    """
    Build the ELBO term of every site of ``plan``: ``log p`` for observed
    sites, the analytic term or ``log p - log q`` for latent sites, and
    ``-log q`` for auxiliary guide sites. Log-densities are computed only
    where a term uses them.
    """
    terms: List[Term] = []
    model_nodes, guide_nodes = model_trace.nodes, guide_trace.nodes

    def add(name: str, kind: str, value: torch.Tensor, stack: tuple, surrogate=None) -> None:
        frames = stack if value.dim() else ()
        terms.append(Term(name, kind, value, frames, value if surrogate is None else surrogate))

    for name in plan.observed:
        site = model_nodes[name]
        add(name, "observed", site_log_prob(site), site["cond_indep_stack"])
    for name, record in plan.sites.items():
        guide_site = guide_nodes[name]
        stack = guide_site["cond_indep_stack"]
        model_site: Optional[Dict[str, Any]] = model_nodes.get(name)
        if model_site is None:
            log_q = site_log_prob(guide_site)
            surrogate = None if record.reparameterized else -log_q.detach()
            add(name, "auxiliary", -log_q, stack, surrogate)
        elif record.estimator == "analytic":
            value = analytic_term(name, model_site, guide_site, record.kl_rule)
            add(name, "analytic", value, stack)
        else:
            log_p, log_q = site_log_prob(model_site), site_log_prob(guide_site)
            if not record.reparameterized:
                surrogate_q = log_q.detach()
            else:
                surrogate_q = log_q
            if log_p.shape == log_q.shape:
                add(name, "mc", log_p - log_q, stack, log_p - surrogate_q)
            else:
                add(name, "mc", log_p.sum() - log_q.sum(), (), log_p.sum() - surrogate_q.sum())
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
    "elbo_terms",
    "site_log_prob",
    "sum_terms",
    "unwrap_mask",
]
