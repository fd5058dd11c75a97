# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
Stacking same-typed distributions along a new leading dimension, so that the
analytic KLs of many time steps are evaluated by one call instead of one call
per step. For the elementwise closed forms this is the same arithmetic: the
stacked result equals the per-site results to floating-point rounding.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch.distributions import (
    Bernoulli,
    Categorical,
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
)


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(tensors))


def _stack_independent(dists: Sequence[Any]) -> Optional[Distribution]:
    base = stack_distributions([d.base_dist for d in dists])
    if base is None:
        return None
    return type(dists[0])(base, dists[0].reinterpreted_batch_ndims, validate_args=False)


def _stack_by_parameter(dists: Sequence[Any]) -> Optional[Distribution]:
    # by the parameter each was built with: rebuilt from logits, a distribution built from
    # probs would lose the gradient of a zero probability (probs_to_logits clamps it)
    for name in ("probs", "logits"):
        if all(d.__dict__.get(name) is d._param for d in dists):
            stacked = _stack([d._param for d in dists])
            return type(dists[0])(**{name: stacked}, validate_args=False)
    return None


_STACKERS: Dict[type, Callable[[Sequence[Any]], Optional[Distribution]]] = {
    Normal: lambda ds: type(ds[0])(
        _stack([d.loc for d in ds]), _stack([d.scale for d in ds]), validate_args=False
    ),
    MultivariateNormal: lambda ds: type(ds[0])(
        _stack([d.loc for d in ds]),
        scale_tril=_stack([d.scale_tril for d in ds]),
        validate_args=False,
    ),
    LowRankMultivariateNormal: lambda ds: type(ds[0])(
        _stack([d.loc for d in ds]),
        _stack([d.cov_factor for d in ds]),
        _stack([d.cov_diag for d in ds]),
        validate_args=False,
    ),
    Bernoulli: _stack_by_parameter,
    Categorical: _stack_by_parameter,
    Independent: _stack_independent,
}


def _stacker(cls: type) -> Optional[Callable[[Sequence[Any]], Optional[Distribution]]]:
    for base in cls.__mro__:
        if base in _STACKERS:
            # only exact torch classes and Pyro's wrappers of them (pyro.distributions.torch):
            # a subclass (a user's, Pyro's OrderedLogistic or OMTMultivariateNormal) may take
            # other constructor arguments or hold more state than the parameters we stack
            if cls is base or cls.__module__ == "pyro.distributions.torch":
                return _STACKERS[base]
            return None
    return None


def is_stackable(d: Distribution) -> bool:
    """Whether :func:`stack_distributions` supports ``d``'s type (through ``Independent``)."""
    while isinstance(d, Independent):
        if _stacker(type(d)) is None:
            return False
        d = d.base_dist
    return _stacker(type(d)) is not None


def stack_distributions(dists: Sequence[Distribution]) -> Optional[Distribution]:
    """
    One distribution of batch shape ``(len(dists),) + batch_shape`` holding
    the parameters of ``dists``, which must share type and shapes; ``None``
    for unsupported types and for parameters that do not stack (shapes that
    differ beyond the batch and event shapes, Bernoullis or Categoricals built
    some from ``probs`` and some from ``logits``).
    """
    stacker = _stacker(type(dists[0]))
    if stacker is None:
        return None
    try:
        return stacker(dists)
    except (RuntimeError, TypeError, ValueError):
        # parameters whose shapes differ beyond the batch and event shapes (Categoricals with
        # different numbers of categories, LowRankMultivariateNormals of different ranks)
        return None
