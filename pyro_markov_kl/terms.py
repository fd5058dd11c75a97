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
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.distributions.util import scale_and_mask, sum_rightmost
from pyro.util import ignore_jit_warnings
from torch.distributions import Distribution, Independent

from .batched_kl import stack_distributions
from .kl import KLDivergenceError, compute_kl


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
    is constant along the reinterpreted dimensions (e.g. ``.mask(m).to_event(1)``
    with ``m`` of shape ``(B, 1)``), and return the bare distribution with the
    combined mask, or ``None`` for no mask. Other masks under an
    ``Independent`` are left in place, for :func:`site_factors` to handle
    element by element, or for a Monte Carlo term.

    A mask that is broadcast there (size 1 or stride 0: a boolean ``m``) is
    constant by its shape and strides, which are part of the plan's structure
    key. ``.mask()`` turns any other mask into a new boolean tensor (a float
    ``m`` of shape ``(B, 1)``, as Pyro's DMM example passes, loses its strides),
    so such a mask is checked by its values, every time: the plan is made on
    the first trace's mask, and a later mask that varies inside the event is
    handled by the fallbacks of the terms, which are unbiased as well. Inside a
    JIT trace, where a value-dependent branch would be compiled in, only the
    strides count.
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
            if torch.is_tensor(m) and m.dim() > len(inner.batch_shape) - k:
                nk = min(k, m.dim())
                if not _constant_along_last(m, nk):
                    break  # the mask may vary inside the event
                m = m[(Ellipsis,) + (0,) * nk]
            mask = _and(mask, m)
            fn = Independent(inner.base_dist, k)
            continue
        break
    return fn, mask


def _constant_along_last(m: torch.Tensor, n: int) -> bool:
    """Whether a mask is constant along its ``n`` rightmost dimensions (see :func:`unwrap_mask`)."""
    dims = range(m.dim() - n, m.dim())
    if all(m.size(d) == 1 or m.stride(d) == 0 for d in dims):
        return True
    if torch._C._get_tracing_state():
        return False
    first = m[(Ellipsis,) + (slice(0, 1),) * n]
    return bool(torch.equal(m, first.expand(m.shape)))


def _masked_event_dims(fn: Distribution) -> int:
    """How many event dimensions of ``fn`` hold a ``.mask()`` that could not be folded."""
    if isinstance(fn, Independent) and has_mask(fn.base_dist):
        return fn.reinterpreted_batch_ndims
    return 0


def _strip_event_dims(fn: Distribution, k: int) -> Optional[Distribution]:
    """``fn`` with its ``k`` rightmost event dimensions made batch dimensions, if it can be."""
    if isinstance(fn, Independent) and fn.reinterpreted_batch_ndims >= k:
        r = fn.reinterpreted_batch_ndims - k
        return Independent(fn.base_dist, r) if r else fn.base_dist
    return None


def _pad_right(x: Any, k: int) -> Any:
    """Give a batch-shaped factor ``k`` trailing singleton dimensions."""
    return x.reshape(x.shape + (1,) * k) if torch.is_tensor(x) and x.dim() else x


def has_mask(fn: Distribution) -> bool:
    """Whether a ``.mask()`` is left anywhere in ``fn``'s chain of base distributions."""
    while fn is not None:
        if isinstance(fn, MaskedDistribution):
            return True
        fn = getattr(fn, "base_dist", None)
    return False


def same_factor(scale_p: Any, mask_p: Any, scale_q: Any, mask_q: Any) -> bool:
    """Whether the model's and the guide's factors are certainly equal (cheap checks only)."""
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


class SiteFactors(NamedTuple):
    """
    A latent site's guide and model distributions without ``.mask()``
    wrappers, with their factors; ``event_dims`` event dimensions were made
    batch dimensions (where a mask varies inside the event), so terms are
    computed element by element and then summed over them.
    """

    q: Distribution
    p: Distribution
    scale_q: Any
    mask_q: Any
    scale_p: Any
    mask_p: Any
    event_dims: int = 0


def site_factors(model_site: Dict[str, Any], guide_site: Dict[str, Any]) -> SiteFactors:
    r"""
    Unwrap both sides' masks into their factors. A mask that varies inside
    an ``Independent``'s event (``.mask(m).to_event(1)`` with ``m`` of the full
    shape) cannot be a per-site factor; then both sides are lowered to the
    elementwise level, where it can: with
    :math:`\mathrm{KL}(\mathrm{Indep}(q_0) \| \mathrm{Indep}(p_0)) = \sum_i
    \mathrm{KL}(q_{0,i} \| p_{0,i})`, the term is
    :math:`\sum_i [-f_{p,i}\,\mathrm{KL}_i - (f_{p,i} - f_{q,i})\,\mathrm{H}_i]`.
    """
    q, mask_q = unwrap_mask(guide_site["fn"])
    p, mask_p = unwrap_mask(model_site["fn"])
    mask_q = _and(guide_site["mask"], mask_q)
    mask_p = _and(model_site["mask"], mask_p)
    scale_q, scale_p = guide_site["scale"], model_site["scale"]
    k = max(_masked_event_dims(q), _masked_event_dims(p))
    if k:
        q0, p0 = _strip_event_dims(q, k), _strip_event_dims(p, k)
        if q0 is not None and p0 is not None:
            q0, mask_q0 = unwrap_mask(q0)
            p0, mask_p0 = unwrap_mask(p0)
            return SiteFactors(
                q0,
                p0,
                _pad_right(scale_q, k),
                _and(_pad_right(mask_q, k), mask_q0),
                _pad_right(scale_p, k),
                _and(_pad_right(mask_p, k), mask_p0),
                k,
            )
    return SiteFactors(q, p, scale_q, mask_q, scale_p, mask_p)


def mc_term(
    model_site: Dict[str, Any], guide_site: Dict[str, Any], reparameterized: bool = True
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    ``log p - log q`` at the sample, and its surrogate: for a
    non-reparameterised site ``-log q`` is detached (its pathwise gradient has
    expectation zero; its score function carries the gradient).
    """
    log_p, log_q = site_log_prob(model_site), site_log_prob(guide_site)
    surrogate_q = log_q if reparameterized else log_q.detach()
    if log_p.shape == log_q.shape:
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
    with ignore_jit_warnings():  # shapes are constants of a compiled graph
        same_shape = kl.shape == q.batch_shape
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
    """
    The analytic terms of ``names`` from one KL call on stacked parameters
    (see :mod:`pyro_markov_kl.batched_kl`), or ``None`` where the sites cannot
    be stacked this step (factors that differ between model and guide, or
    scales and masks of mixed kinds): the caller then computes them one by one.
    """
    factors = [site_factors(model_nodes[n], guide_nodes[n]) for n in names]
    for f in factors:
        if has_mask(f.q) or has_mask(f.p):
            return None
        if f.p.batch_shape != f.q.batch_shape or not same_factor(
            f.scale_p, f.mask_p, f.scale_q, f.mask_q
        ):
            return None
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
        scale = _stack_factor([f.scale_p for f in factors], kl.shape, is_mask=False)
        mask = _stack_factor([f.mask_p for f in factors], kl.shape, is_mask=True)
    except _Unbatchable:
        return None
    return sum_rightmost(-scale_and_mask(kl, scale, mask), factors[0].event_dims)


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
    done: set = set()
    if plan.kl_groups and not plan.score_function_sites():
        # per-site terms are needed only for score-function costs
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
        if model_site is None:
            log_q = site_log_prob(guide_site)
            surrogate = None if record.reparameterized else -log_q.detach()
            add(name, "auxiliary", -log_q, stack, surrogate)
        elif record.estimator == "analytic":
            value = analytic_term(name, model_site, guide_site, record.kl_rule)
            add(name, "analytic", value, stack)
        else:
            value, surrogate = mc_term(model_site, guide_site, record.reparameterized)
            add(name, "mc", value, stack if value.dim() else (), surrogate)
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
