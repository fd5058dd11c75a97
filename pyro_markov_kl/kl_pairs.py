# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0
r"""
Built-in KL divergences, registered with
:func:`torch.distributions.kl.register_kl` when this module is imported (as
:mod:`pyro.distributions.kl` registers Pyro's), so that
:func:`torch.distributions.kl_divergence`, Pyro's
:class:`~pyro.infer.TraceMeanField_ELBO` and
:class:`~pyro_markov_kl.TraceMarkovKL_ELBO` all use them:

* ``(Independent, MultivariateNormal)``: :func:`_kl_independent_mvn`
  (replaces Pyro's);
* ``(MultivariateNormal, Independent)``: :func:`_kl_mvn_independent`;
* ``(Independent, LowRankMultivariateNormal)``: :func:`_kl_independent_lowrank`;
* ``(LowRankMultivariateNormal, Independent)``: :func:`_kl_lowrank_independent`;
* ``(LowRankMultivariateNormal, MultivariateNormal)``: :func:`_kl_lowrank_mvn`
  (replaces torch's);
* ``(Independent, Independent)``: :func:`_kl_independent_independent`
  (replaces Pyro's);
* ``(TransformedDistribution, TransformedDistribution)``:
  :func:`_kl_transformed_transformed` (replaces torch's);
* ``(TransformedDistribution, Distribution)``: :func:`_kl_transformed_any`;
* ``(ExpandedDistribution, Distribution)``, ``(Distribution,
  ExpandedDistribution)``, ``(ExpandedDistribution, ExpandedDistribution)``
  and ``(TransformedDistribution, ExpandedDistribution)``: :func:`_kl_expanded`;
* ``(Delta, ExpandedDistribution)``: :func:`_kl_delta_expanded` (Pyro's value).

A replaced registration returns the same value as the one it replaces
wherever that one returns a value, and declines (raises
:class:`NotImplementedError`) only where that one raises, with one exception:
for equal transforms that are not bijective (``FoldedDistribution`` against
``FoldedDistribution`` or ``HalfNormal``: ``AbsTransform``) torch's function
returns the KL of the bases, which is not the KL of the pair (only an upper
bound), and ours declines, so that Monte Carlo is used. The last two rows
only break ties between the generic pairs (and Pyro's ``(Delta,
Distribution)``) so that :func:`torch.distributions.kl_divergence` warns of no
ambiguity.

Composite functions compute the KL of their parts with
:func:`~pyro_markov_kl.kl_rule.nested_kl`, i.e. with
:func:`torch.distributions.kl_divergence` (so any function registered with
:func:`torch.distributions.kl.register_kl` applies inside ``Independent``,
``ExpandedDistribution`` and ``TransformedDistribution``) after the scoped
rules of the ELBO instance computing it, if any.

Also defined here, not registered: the KL term of a ``Delta`` guide with
Pyro's ``log_density`` (:func:`delta_kl`) and the Gaussian fallback
(:func:`gaussian_kl`), which :func:`~pyro_markov_kl.kl.find_kl_rule` uses.

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

import math
import numbers
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from pyro.distributions.delta import Delta
from pyro.distributions.torch_distribution import ExpandedDistribution
from pyro.distributions.util import sum_rightmost
from pyro.util import ignore_jit_warnings
from torch import Tensor
from torch.distributions import (
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
    TransformedDistribution,
    kl_divergence,
    register_kl,
)
from torch.distributions.transforms import (
    AffineTransform,
    ComposeTransform,
    IndependentTransform,
    Transform,
    _InverseTransform,
)

from .kl_rule import (
    KLDivergenceError,
    KLFn,
    TypePair,
    distribution_name,
    finding_rule,
    for_compiled_graph_active,
    nested_kl,
)

__all__ = [
    "BUILTIN_KL",
    "canonical_transforms",
    "delta_kl",
    "gaussian_kl",
    "is_delta",
    "is_gaussian",
]

#: ``(TypeQ, TypeP) -> fn`` for each pair this module registers with torch.
BUILTIN_KL: Dict[TypePair, KLFn] = {}


def _register(type_q: type, type_p: type) -> Callable[[KLFn], KLFn]:
    """:func:`torch.distributions.kl.register_kl`, remembering the pair in :data:`BUILTIN_KL`."""

    def decorator(fn: KLFn) -> KLFn:
        BUILTIN_KL[type_q, type_p] = fn
        return register_kl(type_q, type_p)(fn)

    return decorator


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


@_register(LowRankMultivariateNormal, MultivariateNormal)
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


def _no_closed_form(q: Distribution, p: Distribution) -> NotImplementedError:
    return NotImplementedError(
        f"no closed form for {distribution_name(q)} vs {distribution_name(p)}"
    )


@_register(Independent, MultivariateNormal)
def _kl_independent_mvn(q: Independent, p: MultivariateNormal) -> Tensor:
    """
    ``Independent(Normal, 1)`` vs ``MultivariateNormal`` by :func:`_kl_diag_mvn`.
    Replaces Pyro's registration for the pair, which returns the same values
    through the explicit precision matrix; like Pyro's, returns
    :math:`-\\log p(v)` for ``Independent(Delta, 1)``.
    """
    base = _diag_normal(q)
    if base is not None:
        return _kl_diag_mvn(base.loc, base.scale, p)
    if isinstance(q.base_dist, Delta) and q.reinterpreted_batch_ndims == 1:
        return -p.log_prob(q.base_dist.v)
    raise _no_closed_form(q, p)


@_register(MultivariateNormal, Independent)
def _kl_mvn_independent(q: MultivariateNormal, p: Independent) -> Tensor:
    """``MultivariateNormal`` vs ``Independent(Normal, 1)`` by :func:`_kl_mvn_diag`."""
    base = _diag_normal(p)
    if base is None:
        raise _no_closed_form(q, p)
    return _kl_mvn_diag(q, base.loc, base.scale)


@_register(LowRankMultivariateNormal, Independent)
def _kl_lowrank_independent(q: LowRankMultivariateNormal, p: Independent) -> Tensor:
    """``LowRankMultivariateNormal`` vs ``Independent(Normal, 1)`` by :func:`_kl_lowrank_diag`."""
    base = _diag_normal(p)
    if base is None:
        raise _no_closed_form(q, p)
    return _kl_lowrank_diag(q, base.loc, base.scale)


@_register(Independent, LowRankMultivariateNormal)
def _kl_independent_lowrank(q: Independent, p: LowRankMultivariateNormal) -> Tensor:
    """``Independent(Normal, 1)`` vs ``LowRankMultivariateNormal`` by :func:`_kl_diag_lowrank`."""
    base = _diag_normal(q)
    if base is None:
        raise _no_closed_form(q, p)
    return _kl_diag_lowrank(base.loc, base.scale, p)


################################################################################
# Independent with different reinterpreted_batch_ndims
################################################################################


def _strip(d: Independent, ndims: int) -> Distribution:
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


@_register(Independent, Independent)
def _kl_independent_independent(q: Independent, p: Independent) -> Tensor:
    r"""
    :math:`\mathrm{KL}(\mathrm{Indep}(q_0, k_q) \,\|\, \mathrm{Indep}(p_0, k_p))`
    with :math:`s = \min(k_q, k_p)` shared dims: strip :math:`s` dims from
    both sides, compute the KL of the rest with
    :func:`~pyro_markov_kl.kl_rule.nested_kl` and sum its :math:`s`
    rightmost dims. Replaces Pyro's registration for the pair, which computes
    the same; this one also applies an ELBO's scoped rules to the parts and
    names a part returning a wrong shape.
    """
    shared = min(q.reinterpreted_batch_ndims, p.reinterpreted_batch_ndims)
    q0, p0 = _strip(q, shared), _strip(p, shared)
    kl = nested_kl(q0, p0)
    if isinstance(kl, numbers.Number):
        # Pyro's (MaskedDistribution, MaskedDistribution) returns the float 0.0 for a mask of
        # False; Pyro's (Independent, Independent) passes a number through unchanged
        # (sum_rightmost leaves it), and TraceMeanField_ELBO accepts it
        return kl
    with ignore_jit_warnings():  # under the JIT, a constant of the compiled graph
        expected = torch.broadcast_shapes(q0.batch_shape, p0.batch_shape)
        wrong = not isinstance(kl, Tensor) or kl.shape != expected
    if wrong:
        shape = tuple(kl.shape) if isinstance(kl, Tensor) else type(kl).__name__
        raise KLDivergenceError(
            f"the KL of the pair inside Independent ({distribution_name(q0)} vs "
            f"{distribution_name(p0)}) has shape {shape}, expected {tuple(expected)}. Fix: a "
            "KL function must return one value per element of the broadcast batch shape of "
            "the pair."
        )
    return sum_rightmost(kl, shared)


################################################################################
# TransformedDistribution
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


def _requires_grad(obj: Any) -> bool:
    return _any_tensor(obj, lambda t: t.requires_grad)


def _always(t: Tensor) -> bool:
    return True


def _transforms_match(tq: Transform, tp: Transform, strict: bool) -> Optional[str]:
    """
    ``None`` if ``tq`` and ``tp`` are the same transform, else why not. With
    ``strict``, different objects holding tensors that require grad do not
    match (their equality is data dependent), nor, for a compiled graph
    (:func:`~pyro_markov_kl.kl_rule.for_compiled_graph`), different objects
    holding any tensor (a graph is reused for other values).
    """
    if tq is tp:
        return None
    if type(tq) is not type(tp):
        return f"transforms differ: {tq!r} vs {tp!r}"
    if strict and (_requires_grad(tq) or _requires_grad(tp)):
        return (
            f"transforms {tq!r} and {tp!r} are different objects with learnable "
            "parameters, so their equality is data dependent; use the same transform "
            "object in model and guide or register a rule"
        )
    if (
        strict
        and for_compiled_graph_active()
        and (_any_tensor(tq, _always) or _any_tensor(tp, _always))
    ):
        return (
            f"transforms {tq!r} and {tp!r} are different objects holding tensors, and a "
            "compiled graph is reused for other values of them; use the same transform "
            "object in model and guide, or the uncompiled ELBO (which checks them every step)"
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


@_register(TransformedDistribution, TransformedDistribution)
def _kl_transformed_transformed(q: TransformedDistribution, p: TransformedDistribution) -> Tensor:
    r"""
    For the same bijective transform :math:`T` on both sides,

    .. math::

        \mathrm{KL}(T_\# q_0 \,\|\, T_\# p_0) = \mathrm{KL}(q_0 \,\|\, p_0)

    since :math:`\log q(y) - \log p(y) = \log q_0(x) - \log p_0(x)` at
    :math:`x = T^{-1}(y)` (the Jacobian terms cancel), summed over the batch
    dims of the bases that the transforms reinterpret as event dims.

    Transforms are compared pairwise after flattening compositions and
    leaving out identities (:func:`canonical_transforms`): the same object, or
    the same type and ``==``. Replaces torch's registration for the pair,
    which compares the transform lists with ``==`` and does not sum
    reinterpreted dims. While :func:`~pyro_markov_kl.kl.find_kl_rule` tries it
    (:func:`~pyro_markov_kl.kl_rule.finding_rule`), different transform
    objects holding tensors that require grad do not match: their equality
    holds for the current values only, and the rule is reused for later ones.
    """
    tq, tp = canonical_transforms(q.transforms), canonical_transforms(p.transforms)
    if len(tq) != len(tp):
        raise NotImplementedError(f"transforms differ: {tq!r} vs {tp!r}")
    strict = finding_rule()
    for a, b in zip(tq, tp):
        why = _transforms_match(a, b, strict)
        if why is not None:
            raise NotImplementedError(why)
        if not a.bijective:
            raise NotImplementedError(f"transform {a!r} is not bijective")
    if q.base_dist.event_shape != p.base_dist.event_shape:
        raise NotImplementedError("base distributions have different event shapes")
    extra = _transformed_extra_dims(q)
    if extra != _transformed_extra_dims(p) or extra < 0:
        raise NotImplementedError("transforms reinterpret different numbers of batch dims")
    return sum_rightmost(nested_kl(q.base_dist, p.base_dist), extra)


@_register(TransformedDistribution, Distribution)
def _kl_transformed_any(q: TransformedDistribution, p: Distribution) -> Tensor:
    r"""
    A guide distribution whose transforms are identities (as
    :class:`~pyro.infer.autoguide.AutoNormalMessenger` builds for a site with
    real support: a ``TransformedDistribution`` of a Normal by
    ``biject_to(constraints.real)``) is its base distribution, and one
    affine transform of a Normal is a Normal (see
    :func:`_simplify_transformed`): :math:`\mathrm{KL}(q_0 \,\|\, p)`.
    """
    q0 = _simplify_transformed(q)
    if q0 is None:
        raise NotImplementedError(
            f"no kl_divergence registered for ({type(q).__name__}, {type(p).__name__})"
        )
    return nested_kl(q0, p)


################################################################################
# Pyro's ExpandedDistribution
################################################################################


@_register(ExpandedDistribution, ExpandedDistribution)
@_register(ExpandedDistribution, Distribution)
@_register(Distribution, ExpandedDistribution)
@_register(TransformedDistribution, ExpandedDistribution)  # tie of the generic pairs
def _kl_expanded(q: Distribution, p: Distribution) -> Tensor:
    r"""
    :math:`\mathrm{KL}` of an ``ExpandedDistribution`` (on either side or
    both) is that of its base, expanded:
    ``nested_kl(q.base_dist, p.base_dist).expand(batch_shape)``.
    """
    shape = torch.broadcast_shapes(q.batch_shape, p.batch_shape)
    q0 = q.base_dist if isinstance(q, ExpandedDistribution) else q
    p0 = p.base_dist if isinstance(p, ExpandedDistribution) else p
    return nested_kl(q0, p0).expand(shape)


@_register(Delta, ExpandedDistribution)
def _kl_delta_expanded(q: Delta, p: ExpandedDistribution) -> Tensor:
    """
    Pyro's value for ``(Delta, Distribution)``, :math:`-\\log p(v)`, registered
    to break the tie between that pair and ``(Distribution, ExpandedDistribution)``.
    """
    return -p.log_prob(q.v)


################################################################################
# Delta guides (not registered)
################################################################################


def _delta_parts(d: Distribution) -> Optional[Tuple[Tensor, Tensor]]:
    """
    ``(v, log_density)`` of a ``Delta`` possibly wrapped in ``Independent`` and
    ``ExpandedDistribution``, of shapes ``batch_shape + event_shape`` and
    ``batch_shape`` (summed over reinterpreted dims); else ``None``.
    """
    if isinstance(d, Delta):
        return d.v, d.log_density.expand(d.batch_shape)
    if isinstance(d, (Independent, ExpandedDistribution)):
        parts = _delta_parts(d.base_dist)
        if parts is None:
            return None
        v, log_density = parts
        if isinstance(d, Independent):
            return v, sum_rightmost(log_density, d.reinterpreted_batch_ndims)
        return v.expand(d.batch_shape + d.event_shape), log_density.expand(d.batch_shape)
    return None


def is_delta(d: Distribution) -> bool:
    """Whether ``d`` is a ``Delta``, possibly in ``Independent`` and ``ExpandedDistribution``."""
    while isinstance(d, (Independent, ExpandedDistribution)):
        d = d.base_dist
    return isinstance(d, Delta)


def delta_kl(q: Distribution, p: Distribution) -> Tensor:
    r"""
    KL term of a point-mass guide :math:`q = \delta_v` with Pyro's
    ``log_density`` :math:`\ell` (MAP/ML sites):

    .. math::

        \mathrm{KL}(q \,\|\, p) := \log q(v) - \log p(v) = \ell - \log p(v),

    the same per-site term as :class:`~pyro.infer.Trace_ELBO`, which scores
    the guide sample with ``q.log_prob(v) = log_density``. Not registered:
    Pyro's ``(Delta, Distribution)`` registration returns :math:`-\log p(v)`,
    dropping :math:`\ell`, and keeps doing so for
    :func:`torch.distributions.kl_divergence`.
    """
    parts = _delta_parts(q)
    if parts is None:
        raise NotImplementedError(f"{distribution_name(q)} is not a Delta")
    v, log_density = parts
    return log_density - p.log_prob(v)


################################################################################
# Gaussian fallback (not registered)
################################################################################

_GAUSSIANS = (Normal, MultivariateNormal, LowRankMultivariateNormal)


def is_gaussian(d: Distribution) -> bool:
    """
    Whether ``d`` is a Normal, MultivariateNormal or LowRankMultivariateNormal,
    possibly in ``Independent`` and ``ExpandedDistribution``.
    """
    while isinstance(d, (Independent, ExpandedDistribution)):
        d = d.base_dist
    return isinstance(d, _GAUSSIANS)


def _block_diagonal(tril: Tensor) -> Tensor:
    """``(..., m, n, n)`` blocks to the ``(..., m n, m n)`` block-diagonal matrix."""
    m, n = tril.shape[-3], tril.shape[-1]
    eye = torch.eye(m, dtype=tril.dtype, device=tril.device)
    blocks = eye[:, None, :, None] * tril.unsqueeze(-2)  # [..., i, a, j, c] = δ_ij L_i[a, c]
    return blocks.reshape(tril.shape[:-3] + (m * n, m * n))


def _flat_gaussian(d: Distribution) -> Tuple[Tensor, Tensor]:
    """
    ``(loc, scale_tril)`` of ``d`` as a MultivariateNormal over its event
    flattened to one dim, of batch shape ``d.batch_shape``.
    """
    if isinstance(d, Normal):
        return d.loc.unsqueeze(-1), d.scale.unsqueeze(-1).unsqueeze(-1)
    if isinstance(d, (MultivariateNormal, LowRankMultivariateNormal)):
        return d.loc, d.scale_tril
    loc, tril = _flat_gaussian(d.base_dist)
    n = loc.size(-1)
    if isinstance(d, ExpandedDistribution):
        return loc.expand(d.batch_shape + (n,)), tril.expand(d.batch_shape + (n, n))
    # Independent: reinterpreted batch dims join the event, block-diagonally
    base_shape = d.base_dist.batch_shape
    batch_shape, inner = d.batch_shape, base_shape[len(d.batch_shape) :]
    m = math.prod(inner)
    loc = loc.expand(base_shape + (n,)).reshape(batch_shape + (m * n,))
    tril = tril.expand(base_shape + (n, n)).reshape(batch_shape + (m, n, n))
    return loc, _block_diagonal(tril)


def gaussian_kl(q: Distribution, p: Distribution) -> Tensor:
    r"""
    Exact :math:`\mathrm{KL}(q \,\|\, p)` for any Gaussian-family ``q`` and
    ``p`` (:func:`is_gaussian`) with equal event shapes and broadcastable
    batch shapes: both are written as
    :class:`~torch.distributions.MultivariateNormal` over their event
    flattened to :math:`n` dims (``Independent`` wrappers become
    block-diagonal Cholesky factors, ``LowRankMultivariateNormal`` its
    ``scale_tril``), and torch's closed form of the pair is used. The KL is
    invariant under this reshaping of the event.

    A fallback for pairs no registered function covers (e.g. differently
    nested ``Independent`` wrappers): it builds dense :math:`n \times n`
    factors, :math:`O(n^3)` per batch element.

    :returns: tensor of shape ``broadcast_shapes(q.batch_shape, p.batch_shape)``.
    """
    shape = torch.broadcast_shapes(q.batch_shape, p.batch_shape)
    q_loc, q_tril = _flat_gaussian(q)
    p_loc, p_tril = _flat_gaussian(p)
    kl = kl_divergence(
        MultivariateNormal(q_loc, scale_tril=q_tril, validate_args=False),
        MultivariateNormal(p_loc, scale_tril=p_tril, validate_args=False),
    )
    return kl.expand(shape)
