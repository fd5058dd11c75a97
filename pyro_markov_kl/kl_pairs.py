# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0
r"""
Built-in KL rules of :mod:`pyro_markov_kl.kl`.

Each entry of :data:`BUILTIN_KL` maps a type pair ``(TypeQ, TypeP)`` to a
*builder* ``builder(q, p, resolve)`` that inspects the two distribution
instances and returns either a :class:`~pyro_markov_kl.kl.KLRule` or a string
saying why it does not apply. ``resolve(q1, p1)`` is
:func:`~pyro_markov_kl.kl.find_kl_rule` with the caller's ``kl_rules``, used
by composite rules (``Independent``, ``TransformedDistribution``,
``ExpandedDistribution``) for their base distributions, so user registrations
apply inside them.

Gaussian closed forms use, for :math:`q = \mathcal N(\mu_q, \Sigma_q)` and
:math:`p = \mathcal N(\mu_p, \Sigma_p)` of dimension :math:`n`,

.. math::

    \mathrm{KL}(q \,\|\, p) = \tfrac12 \Big[
        \operatorname{tr}(\Sigma_p^{-1} \Sigma_q)
        + (\mu_p - \mu_q)^\top \Sigma_p^{-1} (\mu_p - \mu_q)
        - n + \log\det\Sigma_p - \log\det\Sigma_q \Big]

with the structure of each covariance (diagonal :math:`\operatorname{diag}\sigma^2`,
Cholesky :math:`L L^\top`, low rank :math:`W W^\top + \operatorname{diag} D`)
exploited as in :mod:`torch.distributions.kl`; low-rank inverses and
determinants use the Woodbury identity and the matrix determinant lemma with
the capacitance matrix :math:`K = I + W^\top D^{-1} W` [1].

**References**

[1] K. B. Petersen, M. S. Pedersen, *The Matrix Cookbook* (2012), eqs. 24, 159.

[2] S. Kullback, R. A. Leibler, *On information and sufficiency*, Ann. Math.
Statist. 22(1), 1951.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from pyro.distributions.delta import Delta
from pyro.distributions.distribution import Distribution as PyroDistribution
from pyro.distributions.torch_distribution import ExpandedDistribution
from pyro.distributions.util import sum_rightmost
from torch import Tensor
from torch.distributions import (
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
    TransformedDistribution,
)
from torch.distributions.transforms import (
    AffineTransform,
    ComposeTransform,
    IndependentTransform,
    Transform,
    _InverseTransform,
)

from .kl import KLDivergenceError, KLRule, distribution_name

Resolver = Callable[[Distribution, Distribution], Tuple[Optional[KLRule], str]]
Builder = Callable[[Distribution, Distribution, Resolver], Union[KLRule, str]]

#: ``(TypeQ, TypeP) -> builder``; see the module docstring.
BUILTIN_KL: Dict[Tuple[type, type], Builder] = {}


def _builtin(type_q: type, type_p: type) -> Callable[[Builder], Builder]:
    def decorator(builder: Builder) -> Builder:
        BUILTIN_KL[type_q, type_p] = builder
        return builder

    return decorator


def _rule(fn: Callable[[Any, Any], Tensor], description: str) -> KLRule:
    return KLRule(fn, "builtin", f"builtin: {description}")


def _stale(what: str) -> KLDivergenceError:
    return KLDivergenceError(
        f"KL rule was found for {what}, but the distributions changed structure since; "
        "call find_kl_rule again for the new distributions."
    )


################################################################################
# Linear algebra helpers
################################################################################


def _tril_inverse(tril: Tensor) -> Tensor:
    eye = torch.eye(tril.size(-1), dtype=tril.dtype, device=tril.device)
    return torch.linalg.solve_triangular(tril, eye.expand_as(tril), upper=False)


def _mahalanobis(tril: Tensor, x: Tensor) -> Tensor:
    r"""
    :math:`\| L^{-1} x \|^2` for lower-triangular ``tril`` and ``x`` of any
    broadcastable batch shape, solving a single system when ``tril`` is unbatched.
    """
    n = x.size(-1)
    if tril.dim() == 2:
        flat = x.reshape(-1, n).mT
        sol = torch.linalg.solve_triangular(tril, flat, upper=False)
        return sol.pow(2).sum(-2).reshape(x.shape[:-1])
    sol = torch.linalg.solve_triangular(tril, x.unsqueeze(-1), upper=False)
    return sol.squeeze(-1).pow(2).sum(-1)


def _capacitance_tril(W: Tensor, D: Tensor) -> Tensor:
    r"""Cholesky factor of :math:`K = I + W^\top D^{-1} W`."""
    Wt_Dinv = W.mT / D.unsqueeze(-2)
    K = torch.matmul(Wt_Dinv, W)
    K = K + torch.eye(W.size(-1), dtype=W.dtype, device=W.device)
    return torch.linalg.cholesky(K)


def _lowrank_logdet(W: Tensor, D: Tensor, C: Tensor) -> Tensor:
    r""":math:`\log\det(W W^\top + D) = 2 \sum \log \operatorname{diag} C + \sum \log D`."""
    return 2 * C.diagonal(dim1=-2, dim2=-1).log().sum(-1) + D.log().sum(-1)


def _lowrank_parts(d: LowRankMultivariateNormal) -> Tuple[Tensor, Tensor]:
    return d._unbroadcasted_cov_factor, d._unbroadcasted_cov_diag


################################################################################
# Gaussian closed forms
################################################################################


def _kl_diag_mvn(q_loc: Tensor, q_scale: Tensor, p: MultivariateNormal) -> Tensor:
    r"""
    :math:`q = \mathcal N(\mu_q, \operatorname{diag}\sigma_q^2)`,
    :math:`p = \mathcal N(\mu_p, L_p L_p^\top)`:

    .. math::

        \mathrm{KL} = \sum_i \log (L_p)_{ii} - \sum_i \log \sigma_{q,i}
        + \tfrac12 \Big[ \sum_j \sigma_{q,j}^2 \sum_i (L_p^{-1})_{ij}^2
        + \| L_p^{-1} (\mu_p - \mu_q) \|^2 - n \Big]
    """
    n = q_loc.size(-1)
    L = p._unbroadcasted_scale_tril
    precision_diag = _tril_inverse(L).pow(2).sum(-2)  # diag(Sigma_p^{-1})
    trace = (precision_diag * q_scale.pow(2)).sum(-1)
    mahalanobis = _mahalanobis(L, p.loc - q_loc)
    half_logdet_p = L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return half_logdet_p - q_scale.log().sum(-1) + 0.5 * (trace + mahalanobis - n)


def _kl_mvn_diag(q: MultivariateNormal, p_loc: Tensor, p_scale: Tensor) -> Tensor:
    r"""
    :math:`q = \mathcal N(\mu_q, L_q L_q^\top)`,
    :math:`p = \mathcal N(\mu_p, \operatorname{diag}\sigma_p^2)`:

    .. math::

        \mathrm{KL} = \sum_i \log \sigma_{p,i} - \sum_i \log (L_q)_{ii}
        + \tfrac12 \Big[ \sum_i \frac{\sum_j (L_q)_{ij}^2}{\sigma_{p,i}^2}
        + \sum_i \frac{(\mu_{p,i} - \mu_{q,i})^2}{\sigma_{p,i}^2} - n \Big]
    """
    n = p_loc.size(-1)
    L = q._unbroadcasted_scale_tril
    var_q = L.pow(2).sum(-1)  # diag(Sigma_q)
    var_p = p_scale.pow(2)
    trace = (var_q / var_p).sum(-1)
    mahalanobis = ((p_loc - q.loc).pow(2) / var_p).sum(-1)
    half_logdet_q = L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return p_scale.log().sum(-1) - half_logdet_q + 0.5 * (trace + mahalanobis - n)


def _kl_lowrank_diag(q: LowRankMultivariateNormal, p_loc: Tensor, p_scale: Tensor) -> Tensor:
    r"""
    :math:`q = \mathcal N(\mu_q, W W^\top + \operatorname{diag} D)`,
    :math:`p = \mathcal N(\mu_p, \operatorname{diag}\sigma_p^2)`:

    .. math::

        \mathrm{KL} = \sum_i \log \sigma_{p,i} - \tfrac12 \log\det(W W^\top + D)
        + \tfrac12 \Big[ \sum_i \frac{\sum_k W_{ik}^2 + D_i}{\sigma_{p,i}^2}
        + \sum_i \frac{(\mu_{p,i} - \mu_{q,i})^2}{\sigma_{p,i}^2} - n \Big]
    """
    n = p_loc.size(-1)
    W, D = _lowrank_parts(q)
    var_q = W.pow(2).sum(-1) + D
    var_p = p_scale.pow(2)
    trace = (var_q / var_p).sum(-1)
    mahalanobis = ((p_loc - q.loc).pow(2) / var_p).sum(-1)
    logdet_q = _lowrank_logdet(W, D, _capacitance_tril(W, D))
    return p_scale.log().sum(-1) - 0.5 * logdet_q + 0.5 * (trace + mahalanobis - n)


def _kl_diag_lowrank(q_loc: Tensor, q_scale: Tensor, p: LowRankMultivariateNormal) -> Tensor:
    r"""
    :math:`q = \mathcal N(\mu_q, \operatorname{diag}\sigma_q^2)`,
    :math:`p = \mathcal N(\mu_p, W W^\top + \operatorname{diag} D)`. With
    :math:`K = C C^\top = I + W^\top D^{-1} W` and :math:`A = C^{-1} W^\top D^{-1}`,
    Woodbury gives :math:`\Sigma_p^{-1} = D^{-1} - A^\top A`, so

    .. math::

        \mathrm{KL} = \tfrac12 \log\det\Sigma_p - \sum_i \log \sigma_{q,i}
        + \tfrac12 \Big[ \sum_i \sigma_{q,i}^2 \big(D_i^{-1} - \textstyle\sum_k A_{ki}^2\big)
        + \delta^\top D^{-1} \delta - \| A \delta \|^2 - n \Big],
        \quad \delta = \mu_p - \mu_q
    """
    n = q_loc.size(-1)
    W, D = _lowrank_parts(p)
    C = _capacitance_tril(W, D)
    A = torch.linalg.solve_triangular(C, W.mT / D.unsqueeze(-2), upper=False)
    precision_diag = D.reciprocal() - A.pow(2).sum(-2)
    trace = (precision_diag * q_scale.pow(2)).sum(-1)
    delta = p.loc - q_loc
    A_delta = torch.matmul(A, delta.unsqueeze(-1)).squeeze(-1)
    mahalanobis = (delta.pow(2) / D).sum(-1) - A_delta.pow(2).sum(-1)
    logdet_p = _lowrank_logdet(W, D, C)
    return 0.5 * logdet_p - q_scale.log().sum(-1) + 0.5 * (trace + mahalanobis - n)


def _kl_lowrank_mvn(q: LowRankMultivariateNormal, p: MultivariateNormal) -> Tensor:
    r"""
    :math:`q = \mathcal N(\mu_q, W W^\top + \operatorname{diag} D)`,
    :math:`p = \mathcal N(\mu_p, L_p L_p^\top)`:

    .. math::

        \mathrm{KL} = \sum_i \log (L_p)_{ii} - \tfrac12 \log\det(W W^\top + D)
        + \tfrac12 \Big[ \| L_p^{-1} W \|_F^2 + \sum_j D_j \sum_i (L_p^{-1})_{ij}^2
        + \| L_p^{-1} (\mu_p - \mu_q) \|^2 - n \Big]

    Replaces torch's ``_kl_lowrankmultivariatenormal_multivariatenormal``,
    which fails when ``cov_diag`` has batch dims that ``cov_factor`` lacks.
    """
    n = q.event_shape[0]
    W, D = _lowrank_parts(q)
    L = p._unbroadcasted_scale_tril
    L_inv = _tril_inverse(L)
    trace = torch.matmul(L_inv, W).pow(2).sum((-2, -1)) + (L_inv.pow(2).sum(-2) * D).sum(-1)
    mahalanobis = _mahalanobis(L, p.loc - q.loc)
    logdet_q = _lowrank_logdet(W, D, _capacitance_tril(W, D))
    half_logdet_p = L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return half_logdet_p - 0.5 * logdet_q + 0.5 * (trace + mahalanobis - n)


def _diag_normal(d: Distribution) -> Optional[Normal]:
    """The base Normal of ``Independent(Normal, 1)``, else ``None``."""
    if (
        isinstance(d, Independent)
        and d.reinterpreted_batch_ndims == 1
        and isinstance(d.base_dist, Normal)
    ):
        return d.base_dist
    return None


def _kl_indepnormal_mvn(q: Independent, p: MultivariateNormal) -> Tensor:
    base = q.base_dist
    return _kl_diag_mvn(base.loc, base.scale, p)


def _kl_mvn_indepnormal(q: MultivariateNormal, p: Independent) -> Tensor:
    base = p.base_dist
    return _kl_mvn_diag(q, base.loc, base.scale)


def _kl_lowrank_indepnormal(q: LowRankMultivariateNormal, p: Independent) -> Tensor:
    base = p.base_dist
    return _kl_lowrank_diag(q, base.loc, base.scale)


def _kl_indepnormal_lowrank(q: Independent, p: LowRankMultivariateNormal) -> Tensor:
    base = q.base_dist
    return _kl_diag_lowrank(base.loc, base.scale, p)


_DIAG = "Independent(Normal, 1)"


def _diag_rule(
    q: Distribution, p: Distribution, side: str, fn: Callable[[Any, Any], Tensor], desc: str
) -> Union[KLRule, str]:
    delta = _delta_rule(q)
    if delta is not None:
        return delta
    d = q if side == "q" else p
    if _diag_normal(d) is None:
        return f"no closed form for {distribution_name(q)} vs {distribution_name(p)}"

    def checked(q: Distribution, p: Distribution) -> Tensor:
        if _diag_normal(q if side == "q" else p) is None:
            raise _stale(desc)
        return fn(q, p)

    checked.__name__ = checked.__qualname__ = fn.__name__
    return _rule(checked, f"{fn.__name__} ({desc})")


@_builtin(Independent, MultivariateNormal)
def _build_indep_mvn(q: Any, p: Any, resolve: Resolver) -> Union[KLRule, str]:
    # Supersedes Pyro's (Independent, MultivariateNormal) rule: avoids the explicit
    # precision matrix and handles Delta bases with log_density.
    return _diag_rule(q, p, "q", _kl_indepnormal_mvn, f"{_DIAG} vs MultivariateNormal")


@_builtin(MultivariateNormal, Independent)
def _build_mvn_indep(q: Any, p: Any, resolve: Resolver) -> Union[KLRule, str]:
    return _diag_rule(q, p, "p", _kl_mvn_indepnormal, f"MultivariateNormal vs {_DIAG}")


@_builtin(LowRankMultivariateNormal, Independent)
def _build_lowrank_indep(q: Any, p: Any, resolve: Resolver) -> Union[KLRule, str]:
    return _diag_rule(q, p, "p", _kl_lowrank_indepnormal, f"LowRankMultivariateNormal vs {_DIAG}")


@_builtin(Independent, LowRankMultivariateNormal)
def _build_indep_lowrank(q: Any, p: Any, resolve: Resolver) -> Union[KLRule, str]:
    return _diag_rule(q, p, "q", _kl_indepnormal_lowrank, f"{_DIAG} vs LowRankMultivariateNormal")


@_builtin(LowRankMultivariateNormal, MultivariateNormal)
def _build_lowrank_mvn(q: Any, p: Any, resolve: Resolver) -> Union[KLRule, str]:
    return _rule(_kl_lowrank_mvn, "_kl_lowrank_mvn")


################################################################################
# Delta guides
################################################################################


def _delta_parts(d: Distribution) -> Optional[Tuple[Tensor, Tensor]]:
    """
    ``(v, log_density)`` of a ``Delta`` possibly wrapped in ``Independent``s,
    with ``log_density`` summed over the reinterpreted dims; else ``None``.
    """
    ndims = 0
    while isinstance(d, Independent):
        ndims += d.reinterpreted_batch_ndims
        d = d.base_dist
    if not isinstance(d, Delta):
        return None
    return d.v, sum_rightmost(d.log_density.expand(d.batch_shape), ndims)


def _kl_delta(q: Distribution, p: Distribution) -> Tensor:
    r"""
    KL term of a point-mass guide :math:`q = \delta_v` with Pyro's
    ``log_density`` :math:`\ell` (MAP/ML sites):

    .. math::

        \mathrm{KL}(q \,\|\, p) := \log q(v) - \log p(v) = \ell - \log p(v),

    the same per-site term as :class:`~pyro.infer.Trace_ELBO`, which scores
    the guide sample with ``q.log_prob(v) = log_density``. (Pyro's registered
    ``(Delta, Distribution)`` rule returns :math:`-\log p(v)`, dropping
    :math:`\ell`.)
    """
    parts = _delta_parts(q)
    if parts is None:
        raise _stale("a Delta guide")
    v, log_density = parts
    return log_density - p.log_prob(v)


def _delta_rule(q: Distribution) -> Optional[KLRule]:
    if _delta_parts(q) is None:
        return None
    # the same value as the Monte Carlo term, draw for draw: say so, as nothing is saved
    return _rule(_kl_delta, "_kl_delta (a Delta guide: the KL equals log q - log p at the sample)")


@_builtin(Delta, Distribution)
@_builtin(Delta, PyroDistribution)  # supersedes Pyro's (Delta, Distribution) registration
def _build_delta(q: Any, p: Any, resolve: Resolver) -> Union[KLRule, str]:
    return _delta_rule(q)  # type: ignore[return-value]


@_builtin(Independent, Distribution)
def _build_indep_any(q: Any, p: Any, resolve: Resolver) -> Union[KLRule, str]:
    rule = _delta_rule(q)
    if rule is not None:
        return rule
    return f"no closed form for {distribution_name(q)} vs {distribution_name(p)}"


################################################################################
# Independent with different reinterpreted_batch_ndims
################################################################################


def _strip(d: Distribution, ndims: int) -> Distribution:
    """
    Remove ``ndims`` reinterpreted dims from ``Independent`` ``d``, returning
    the base distribution if none remain (also for ``Independent(base, 0)``).
    """
    extra = d.reinterpreted_batch_ndims - ndims
    if extra == 0:
        return d.base_dist
    if ndims == 0:
        return d
    return Independent(d.base_dist, extra, validate_args=False)


@_builtin(Independent, Independent)
def _build_indep_indep(q: Any, p: Any, resolve: Resolver) -> Union[KLRule, str]:
    r"""
    :math:`\mathrm{KL}(\mathrm{Indep}(q_0, k_q) \,\|\, \mathrm{Indep}(p_0, k_p))`
    with :math:`s = \min(k_q, k_p)` shared dims: strip :math:`s` dims from
    both sides, recurse, and sum the :math:`s` rightmost dims. Unlike torch's
    rule, handles :math:`k_q \ne k_p` (as Pyro's does) and resolves the
    inner pair through the full lookup (so user rules apply).
    """
    rule = _delta_rule(q)
    if rule is not None:
        return rule
    kq, kp = q.reinterpreted_batch_ndims, p.reinterpreted_batch_ndims
    shared = min(kq, kp)
    inner, reason = resolve(_strip(q, shared), _strip(p, shared))
    if inner is None:
        return f"inside Independent vs Independent: {reason}"
    inner_fn = inner.fn

    def _kl_independent_independent(q: Any, p: Any) -> Tensor:
        if q.reinterpreted_batch_ndims != kq or p.reinterpreted_batch_ndims != kp:
            raise _stale(f"Independent(., {kq}) vs Independent(., {kp})")
        q0, p0 = _strip(q, shared), _strip(p, shared)
        kl = inner_fn(q0, p0)
        expected = torch.broadcast_shapes(q0.batch_shape, p0.batch_shape)
        if not isinstance(kl, Tensor) or kl.shape != expected:
            shape = tuple(kl.shape) if isinstance(kl, Tensor) else type(kl).__name__
            raise KLDivergenceError(
                f"{inner.description} returned shape {shape} for the pair inside "
                f"Independent, expected {tuple(expected)}. Fix: a KL function must return one "
                "value per element of the broadcast batch shape of the pair."
            )
        return sum_rightmost(kl, shared)

    return _rule(
        _kl_independent_independent,
        f"Independent/Independent (sum of {shared} rightmost dims) of [{inner.description}]",
    )


################################################################################
# TransformedDistribution with equal transforms
################################################################################


def _any_tensor(obj: Any, pred: Callable[[Tensor], bool], seen: Optional[set] = None) -> bool:
    """Whether a transform (or nested container or module) holds a tensor satisfying ``pred``."""
    if isinstance(obj, Tensor):
        return pred(obj)
    if seen is None:
        seen = set()
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    if isinstance(obj, Transform):  # not its cache (x, y): values, not parameters
        obj = {k: v for k, v in vars(obj).items() if k != "_cached_x_y"}
    elif isinstance(obj, torch.nn.Module):
        obj = vars(obj)
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_any_tensor(x, pred, seen) for x in obj)
    return False


def _holds_tensors(obj: Any) -> bool:
    return _any_tensor(obj, lambda t: True)


def _requires_grad(obj: Any) -> bool:
    return _any_tensor(obj, lambda t: t.requires_grad)


def _transforms_match(tq: Transform, tp: Transform) -> Optional[str]:
    """``None`` if ``tq`` and ``tp`` are the same transform, else why not."""
    if tq is tp:
        return None
    if type(tq) is not type(tp):
        return f"transforms differ: {tq!r} vs {tp!r}"
    if _requires_grad(tq) or _requires_grad(tp):
        return (
            f"transforms {tq!r} and {tp!r} are different objects with learnable "
            "parameters, so their equality is data dependent; use the same transform "
            "object in model and guide or register a rule"
        )
    if not bool(tq == tp):
        return f"transforms differ: {tq!r} vs {tp!r}"
    return None


def _is_identity(t: Transform) -> bool:
    """Whether ``t`` is the identity: an empty composition, ``AffineTransform(0, 1)``, ..."""
    if isinstance(t, _InverseTransform):
        return _is_identity(t.inv)
    if isinstance(t, ComposeTransform):
        return all(_is_identity(part) for part in t.parts)
    if isinstance(t, IndependentTransform):
        return _is_identity(t.base_transform)
    if isinstance(t, AffineTransform):
        loc, scale = t.loc, t.scale
        return (
            isinstance(loc, numbers.Number)
            and isinstance(scale, numbers.Number)
            and loc == 0
            and scale == 1
        )
    return False


def canonical_transforms(transforms: Any) -> list:
    """
    ``transforms`` with compositions flattened and identities left out: e.g.
    ``[ComposeTransform([ExpTransform(), AffineTransform(0., 1.)])]`` (torch's
    ``biject_to(constraints.positive)``, as autoguides use) is ``[ExpTransform()]``
    (LogNormal's), and ``biject_to(constraints.real)`` is ``[]``. Event
    dimensions are accounted for separately (:func:`_transformed_extra_dims`).
    """
    result: list = []
    for t in transforms:
        if isinstance(t, ComposeTransform):
            result.extend(canonical_transforms(t.parts))
        elif not _is_identity(t):
            result.append(t)
    return result


def _transformed_extra_dims(d: TransformedDistribution) -> int:
    # Mirrors TransformedDistribution.log_prob's event-dim bookkeeping.
    event_dim = len(d.event_shape)
    for t in reversed(d.transforms):
        event_dim += t.domain.event_dim - t.codomain.event_dim
    return event_dim - len(d.base_dist.event_shape)


@_builtin(TransformedDistribution, TransformedDistribution)
def _build_transformed(q: Any, p: Any, resolve: Resolver) -> Union[KLRule, str]:
    r"""
    For the same bijective transform :math:`T` on both sides,

    .. math::

        \mathrm{KL}(T_\# q_0 \,\|\, T_\# p_0) = \mathrm{KL}(q_0 \,\|\, p_0)

    since :math:`\log q(y) - \log p(y) = \log q_0(x) - \log p_0(x)` at
    :math:`x = T^{-1}(y)` (the Jacobian terms cancel), summed over the batch
    dims of the bases that the transforms reinterpret as event dims.

    Transforms are compared pairwise after flattening compositions and
    leaving out identities (:func:`canonical_transforms`): the same object, or
    the same type and ``==`` when neither holds a tensor requiring grad (e.g.
    ``ExpTransform()``, ``AffineTransform(0., 2.)``, constant tensors).
    Otherwise the rule declines and the KL is estimated by Monte Carlo.
    """
    tq, tp = canonical_transforms(q.transforms), canonical_transforms(p.transforms)
    if len(tq) != len(tp):
        return f"transforms differ: {tq!r} vs {tp!r}"
    for a, b in zip(tq, tp):
        why = _transforms_match(a, b)
        if why is not None:
            return why
        if not a.bijective:
            return f"transform {a!r} is not bijective"
    if q.base_dist.event_shape != p.base_dist.event_shape:
        return "base distributions have different event shapes"
    extra = _transformed_extra_dims(q)
    if extra != _transformed_extra_dims(p) or extra < 0:
        return "transforms reinterpret different numbers of batch dims"
    inner, reason = resolve(q.base_dist, p.base_dist)
    if inner is None:
        return f"inside TransformedDistribution: {reason}"
    inner_fn = inner.fn
    # Equality of tensor-holding transforms is rechecked each call.
    recheck = [i for i, (a, b) in enumerate(zip(tq, tp)) if a is not b and _holds_tensors(a)]

    def _kl_transformed_transformed(q: Any, p: Any) -> Tensor:
        tq, tp = canonical_transforms(q.transforms), canonical_transforms(p.transforms)
        if len(tq) != len(tp) or any(
            a is not b and (type(a) is not type(b) or (i in recheck and not bool(a == b)))
            for i, (a, b) in enumerate(zip(tq, tp))
        ):
            raise _stale("equal transforms")
        return sum_rightmost(inner_fn(q.base_dist, p.base_dist), extra)

    return _rule(
        _kl_transformed_transformed,
        f"TransformedDistribution with equal transforms of [{inner.description}]",
    )


@_builtin(TransformedDistribution, Distribution)
def _build_identity_transformed(q: Any, p: Any, resolve: Resolver) -> Union[KLRule, str]:
    r"""
    A guide distribution whose transforms are identities (as
    :class:`~pyro.infer.autoguide.AutoNormalMessenger` builds for a site with
    real support: a ``TransformedDistribution`` of a Normal by
    ``biject_to(constraints.real)``) is its base distribution:
    :math:`\mathrm{KL}(q_0 \,\|\, p)`.
    """
    q0 = _simplify_transformed(q)
    if q0 is None:
        return f"no kl_divergence registered for ({type(q).__name__}, {type(p).__name__})"
    inner, reason = resolve(q0, p)
    if inner is None:
        return f"inside TransformedDistribution: {reason}"
    inner_fn = inner.fn

    def _kl_identity_transformed(q: Any, p: Any) -> Tensor:
        q0 = _simplify_transformed(q) if isinstance(q, TransformedDistribution) else None
        if q0 is None:
            raise _stale("identity or affine transforms of a Normal")
        return inner_fn(q0, p)

    return _rule(
        _kl_identity_transformed,
        "TransformedDistribution with identity or affine transforms, as the base "
        f"[{inner.description}]",
    )


def _simplify_transformed(q: TransformedDistribution) -> Optional[Distribution]:
    r"""
    ``q`` as a distribution without transforms, or ``None``: its base if its
    transforms are identities (as :class:`~pyro.infer.autoguide.AutoNormalMessenger`
    builds for real support), or a Normal if they are one
    :class:`~torch.distributions.transforms.AffineTransform` of a Normal or
    ``Independent`` Normal (as :class:`~pyro.infer.autoguide.AutoRegressiveMessenger`
    builds from a Normal prior): :math:`a + bX \sim \mathcal{N}(a + b\mu, |b|\sigma)`.
    """
    if _transformed_extra_dims(q) != 0:
        return None
    ts = canonical_transforms(q.transforms)
    base = q.base_dist
    if not ts:
        return base
    if len(ts) != 1 or type(ts[0]) is not AffineTransform:
        return None
    affine = ts[0]
    inner = base.base_dist if isinstance(base, Independent) else base
    if not isinstance(inner, Normal) or affine.event_dim != len(base.event_shape):
        return None
    scale = affine.scale.abs() if torch.is_tensor(affine.scale) else abs(affine.scale)
    folded = Normal(affine.loc + affine.scale * inner.loc, scale * inner.scale)
    shape = torch.broadcast_shapes(folded.batch_shape, q.batch_shape + q.event_shape)
    folded = folded.expand(shape)
    return Independent(folded, len(q.event_shape)) if q.event_shape else folded


################################################################################
# Pyro's ExpandedDistribution
################################################################################


def _build_expanded(q: Any, p: Any, resolve: Resolver, strip_q: bool, strip_p: bool):
    q0 = q.base_dist if strip_q else q
    p0 = p.base_dist if strip_p else p
    inner, reason = resolve(q0, p0)
    if inner is None:
        return f"inside ExpandedDistribution: {reason}"
    inner_fn = inner.fn

    def _kl_expanded(q: Any, p: Any) -> Tensor:
        if (strip_q and not isinstance(q, ExpandedDistribution)) or (
            strip_p and not isinstance(p, ExpandedDistribution)
        ):
            raise _stale("ExpandedDistribution")
        shape = torch.broadcast_shapes(q.batch_shape, p.batch_shape)
        kl = inner_fn(q.base_dist if strip_q else q, p.base_dist if strip_p else p)
        return kl.expand(shape)

    return _rule(_kl_expanded, f"ExpandedDistribution of [{inner.description}]")


@_builtin(ExpandedDistribution, Distribution)
def _build_expanded_any(q: Any, p: Any, resolve: Resolver) -> Union[KLRule, str]:
    return _build_expanded(q, p, resolve, True, False)


@_builtin(Distribution, ExpandedDistribution)
def _build_any_expanded(q: Any, p: Any, resolve: Resolver) -> Union[KLRule, str]:
    return _build_expanded(q, p, resolve, False, True)


@_builtin(ExpandedDistribution, ExpandedDistribution)
def _build_expanded_expanded(q: Any, p: Any, resolve: Resolver) -> Union[KLRule, str]:
    return _build_expanded(q, p, resolve, True, True)


# Tie-breakers for pairs matched by two of the generic rules above.
@_builtin(Delta, ExpandedDistribution)
def _build_delta_expanded(q: Any, p: Any, resolve: Resolver) -> Union[KLRule, str]:
    return _delta_rule(q)  # type: ignore[return-value]


@_builtin(Independent, ExpandedDistribution)
def _build_indep_expanded(q: Any, p: Any, resolve: Resolver) -> Union[KLRule, str]:
    rule = _delta_rule(q)
    if rule is not None:
        return rule
    return _build_expanded(q, p, resolve, False, True)


@_builtin(TransformedDistribution, ExpandedDistribution)
def _build_transformed_expanded(q: Any, p: Any, resolve: Resolver) -> Union[KLRule, str]:
    if not canonical_transforms(q.transforms):
        return _build_identity_transformed(q, p, resolve)
    return _build_expanded(q, p, resolve, False, True)
