# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0
r"""
Exact KL between Gaussian-family distributions with :mod:`funsor`: the last
layer of :func:`~pyro_markov_kl.kl.find_kl_rule`, used for pairs of
``Normal``, ``MultivariateNormal``, ``LowRankMultivariateNormal``,
``Independent`` and Pyro ``ExpandedDistribution`` wrappers of these, with any
broadcastable batch shapes, that no closed-form rule covers.

Both distributions are converted with :func:`funsor.to_funsor` (batch dims
named from the right, as in :mod:`pyro.contrib.funsor`) to normalized Gaussian
log densities :math:`\log q(x) = c_q + g_q(x)`, :math:`\log p(x) = c_p + g_p(x)`,
where :math:`g(x) = -\tfrac12 \| w - x P \|^2` is an unnormalized
:class:`funsor.gaussian.Gaussian` and :math:`c` a :class:`funsor.tensor.Tensor`.
Then

.. math::

    \mathrm{KL}(q \,\|\, p) = c_q - \tfrac n2 - c_p - \mathbb E_q[g_p(x)],
    \qquad \mathbb E_q[g_q(x)] = -\tfrac n2,

and :math:`\mathbb E_q[g_p]` is funsor's exact Gaussian-Gaussian
:class:`~funsor.integrate.Integrate`. Two workarounds are needed with funsor
0.4: ``Integrate`` multiplies by :math:`\exp` of the measure's log
normalizer, which over- or underflows (e.g. 20 dims of scale :math:`10^{-3}`
in float32), so :math:`x = s y` is rescaled per batch element to make it one
(the KL is invariant under this bijection); and ``Integrate`` fails when the
measure lacks batch inputs of the integrand, so both are aligned first.

This is 100x or more slower than a closed form (funsor's term-rewriting
overhead), so closed forms always come first.

The first use calls ``funsor.set_backend("torch")`` if another backend is
active.
"""

from __future__ import annotations

import importlib.util
from collections import OrderedDict
from typing import Any, Optional, Tuple

import torch
from pyro.distributions.torch_distribution import ExpandedDistribution
from torch import Tensor
from torch.distributions import (
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
)

from .kl import KLRule, distribution_name

_GAUSSIANS = (Normal, MultivariateNormal, LowRankMultivariateNormal)


def is_gaussian(d: Distribution) -> bool:
    """Whether ``d`` is a Gaussian family distribution this module converts."""
    while isinstance(d, (Independent, ExpandedDistribution)):
        d = d.base_dist
    return isinstance(d, _GAUSSIANS)


def find_gaussian_rule(q: Distribution, p: Distribution) -> Tuple[Optional[KLRule], str]:
    """
    :returns: ``(rule, "")`` if both are Gaussian-family distributions with
        equal event shapes, else ``(None, reason)``.
    """
    if not (is_gaussian(q) and is_gaussian(p)):
        return None, "not a pair of Gaussian-family distributions for the funsor fallback"
    if q.event_shape != p.event_shape:
        return None, "event shapes differ"
    if importlib.util.find_spec("funsor") is None:
        return None, "funsor is not installed (the exact Gaussian fallback needs it)"
    return KLRule(
        gaussian_kl,
        "funsor",
        f"funsor: exact Gaussian integral ({distribution_name(q)} vs {distribution_name(p)})",
    ), ""


def _canonical(d: Distribution) -> Distribution:
    """
    Rewrite ``d`` with Pyro classes :func:`funsor.to_funsor` converts: merge
    nested ``Independent``, expand ``ExpandedDistribution`` bases, and turn
    ``LowRankMultivariateNormal`` into ``MultivariateNormal``.
    """
    import pyro.distributions as dist

    if isinstance(d, ExpandedDistribution):
        return _canonical(d.base_dist).expand(d.batch_shape)
    if isinstance(d, Independent):
        base = _canonical(d.base_dist)
        ndims = d.reinterpreted_batch_ndims
        while isinstance(base, Independent):
            ndims += base.reinterpreted_batch_ndims
            base = base.base_dist
        return dist.Independent(base, ndims, validate_args=False) if ndims else base
    if isinstance(d, (LowRankMultivariateNormal, MultivariateNormal)):
        return dist.MultivariateNormal(d.loc, scale_tril=d.scale_tril, validate_args=False)
    if isinstance(d, Normal):
        return dist.Normal(d.loc, d.scale, validate_args=False)
    raise NotImplementedError(f"funsor KL cannot convert {type(d).__name__}")


def _to_gaussian_funsor(d: Distribution, dim_to_name: OrderedDict[int, str], value: Any):
    """Split ``log d(value)`` into a constant Tensor funsor and a Gaussian funsor."""
    import funsor
    import funsor.ops as ops
    from funsor.gaussian import Gaussian
    from funsor.terms import Independent as FunsorIndependent
    from funsor.terms import Variable

    def expand_independent(f):
        # to_funsor keeps Independent lazy; substitute and sum to get a Gaussian.
        if isinstance(f, FunsorIndependent):
            inner = expand_independent(f.fn)
            x = Variable(f.reals_var, f.inputs[f.reals_var])
            f = inner(**{f.diag_var: x[f.bint_var]}).reduce(ops.add, f.bint_var)
        return f

    nb = len(d.batch_shape)
    names = OrderedDict((dim, name) for dim, name in dim_to_name.items() if dim >= -nb)
    f = funsor.to_funsor(_canonical(d), dim_to_name=names)
    f = expand_independent(f)(value=value)
    terms = getattr(f, "terms", (f,))
    gaussians = [t for t in terms if isinstance(t, Gaussian)]
    consts = [t for t in terms if not isinstance(t, Gaussian)]
    const_types = (funsor.Tensor, funsor.Number)
    if len(gaussians) != 1 or not all(isinstance(t, const_types) for t in consts):
        raise NotImplementedError(f"funsor did not produce a Gaussian for {distribution_name(d)}")
    const = consts[0] if consts else funsor.Number(0.0)
    for t in consts[1:]:
        const = const + t
    return const, gaussians[0]


def gaussian_kl(q: Distribution, p: Distribution) -> Tensor:
    r"""
    Exact :math:`\mathrm{KL}(q \,\|\, p)` for Gaussian-family ``q`` and ``p``
    via funsor (see the module docstring).

    :returns: tensor of shape ``broadcast_shapes(q.batch_shape, p.batch_shape)``.
    """
    import funsor
    from funsor.domains import Reals
    from funsor.gaussian import Gaussian, align_gaussian
    from funsor.integrate import Integrate
    from funsor.interpretations import eager
    from funsor.terms import Variable

    if funsor.get_backend() != "torch":
        funsor.set_backend("torch")
    batch_shape = torch.broadcast_shapes(q.batch_shape, p.batch_shape)
    nb = len(batch_shape)
    dim_to_name = OrderedDict((-i, f"_kl_batch_{i}") for i in range(nb, 0, -1))
    event_shape = tuple(q.event_shape)
    value = Variable("_kl_value", Reals[event_shape])
    n = q.event_shape.numel()
    with eager:
        q_const, q_gauss = _to_gaussian_funsor(q, dim_to_name, value)
        p_const, p_gauss = _to_gaussian_funsor(p, dim_to_name, value)
        inputs = OrderedDict(
            (k, v) for g in (q_gauss, p_gauss) for k, v in g.inputs.items() if k != value.name
        )
        inputs[value.name] = value.output
        q_white, q_prec = align_gaussian(inputs, q_gauss, expand=True)
        p_white, p_prec = align_gaussian(inputs, p_gauss, expand=True)
        # Rescale x = s * y so that q's Gaussian has log normalizer 0. Not detached:
        # Integrate's factor exp(log normalizer) must be identically 1 for gradients.
        log_norm = Gaussian(white_vec=q_white, prec_sqrt=q_prec, inputs=inputs)._log_normalizer
        s = (log_norm / n).exp()[..., None, None]
        q_gauss = Gaussian(white_vec=q_white, prec_sqrt=q_prec * s, inputs=inputs)
        p_gauss = Gaussian(white_vec=p_white, prec_sqrt=p_prec * s, inputs=inputs)
        expected_log_p = Integrate(q_gauss, p_gauss, value.name)
        result = q_const - 0.5 * n - p_const - expected_log_p
    name_to_dim = {name: dim for dim, name in dim_to_name.items()}
    data = funsor.to_data(result, name_to_dim=name_to_dim)
    data = data.reshape((1,) * (nb - data.dim()) + data.shape)
    return data.expand(batch_shape)
