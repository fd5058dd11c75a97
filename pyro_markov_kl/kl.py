# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0
r"""
KL divergences for :class:`~pyro_markov_kl.TraceMarkovKL_ELBO`.

This module decides *which function* computes :math:`\mathrm{KL}(q \,\|\, p)`
for a guide distribution ``q`` and a model distribution ``p``
(:func:`find_kl_rule`), and checks the result of that function before the
ELBO uses it (:func:`compute_kl`).

The functions live in torch's KL registry: torch's and Pyro's registrations,
this package's built-in ones (:mod:`pyro_markov_kl.kl_pairs`, registered on
import) and users' (:func:`torch.distributions.kl.register_kl`). Lookup order
(the first layer that produces a rule wins):

1. ``"scoped"``: the ``kl_rules={(TypeQ, TypeP): fn}`` mapping passed to one
   ELBO instance, dispatched as torch dispatches its registry (the most
   specific matching pair); it also applies to the parts of the composite
   built-in functions (``Independent``, ``ExpandedDistribution``,
   ``TransformedDistribution``) and never changes torch's registry;
2. ``"builtin"``: a ``Delta`` guide (possibly in ``Independent`` or
   ``ExpandedDistribution``) gets :func:`~pyro_markov_kl.kl_pairs.delta_kl`,
   the Monte Carlo term :math:`\log q(v) - \log p(v)` itself;
3. ``"builtin"`` or ``"torch"``: the function
   :func:`torch.distributions.kl_divergence` dispatches to (``"builtin"`` if
   it is one of :mod:`pyro_markov_kl.kl_pairs`);
4. ``"gaussian"``: :func:`~pyro_markov_kl.kl_pairs.gaussian_kl`, torch's
   closed form for the pair written as ``MultivariateNormal``, for any pair
   of Gaussian-family distributions that no function covers.

A function that cannot handle the instances raises
:class:`NotImplementedError`, as torch expects; :func:`find_kl_rule` calls
the function it finds once on ``q`` and ``p`` and reports that message as the
reason the rule does not apply (``explain()`` shows it).
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Tuple

import torch
from pyro.distributions.util import broadcast_shape
from pyro.util import ignore_jit_warnings
from torch import Tensor
from torch.distributions import Distribution

from .kl_pairs import BUILTIN_KL, delta_kl, gaussian_kl, is_delta, is_gaussian
from .kl_rule import (
    KLDivergenceError,
    KLFn,
    KLRule,
    KLScope,
    TypePair,
    distribution_name,
    torch_kl_function,
    torch_kl_registry_version,
)

__all__ = [
    "KLDivergenceError",
    "KLRule",
    "compute_kl",
    "find_kl_rule",
    "registry_version",
]


def registry_version() -> int:
    """
    A number that changes whenever torch's KL registry changes (a
    registration with :func:`torch.distributions.kl.register_kl`, or a
    removal), for caches of :func:`find_kl_rule` results such as the ELBO's
    plans. Cheap: see :func:`~pyro_markov_kl.kl_rule.torch_kl_registry_version`.
    """
    return torch_kl_registry_version()


################################################################################
# Lookup
################################################################################

_BUILTIN_FUNCTIONS = frozenset(BUILTIN_KL.values())


def _is_builtin(fn: Any) -> bool:
    try:
        return fn in _BUILTIN_FUNCTIONS
    except TypeError:  # an unhashable callable of the user's
        return False


def _fn_name(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return name if name else repr(fn)


def _describe(fn: Any, scoped_pair: Optional[TypePair]) -> Tuple[str, str]:
    """``(source, description)`` of a function found by dispatch."""
    if scoped_pair is not None:
        pair = f"({scoped_pair[0].__name__}, {scoped_pair[1].__name__})"
        return "scoped", f"scoped: {_fn_name(fn)} registered for {pair}"
    source = "builtin" if _is_builtin(fn) else "torch"
    return source, f"{source}: {_fn_name(fn)}"


def _in_scope(fn: KLFn, scope: KLScope) -> KLFn:
    """``fn`` running inside ``scope``, so that its parts see the scoped rules."""

    def kl_in_scope(q: Distribution, p: Distribution) -> Tensor:
        with scope:
            return fn(q, p)

    kl_in_scope.__name__ = kl_in_scope.__qualname__ = _fn_name(fn)
    return kl_in_scope


def _try_rule(
    fn: KLFn,
    description: str,
    q: Distribution,
    p: Distribution,
    kl_rules: Optional[Mapping[TypePair, KLFn]],
) -> Tuple[Optional[List[Tuple[KLFn, Optional[TypePair]]]], str]:
    """
    Call ``fn(q, p)`` once, recording the functions its parts dispatch to.

    :returns: ``(trace, "")``, or ``(None, reason)`` if ``fn`` raised
        :class:`NotImplementedError`. Other errors (and invalid results) are
        left to :func:`compute_kl`, which names the site.
    """
    trace: List[Tuple[KLFn, Optional[TypePair]]] = []
    try:
        with KLScope(kl_rules, trace=trace):
            fn(q, p)
    except NotImplementedError as e:
        message = str(e)
        if _is_builtin(fn) and message:
            return None, message  # written as a reason
        return None, f"{description} raised NotImplementedError({message})"
    except Exception:
        pass  # the rule applies but fails: compute_kl raises it again, naming the site
    return trace, ""


def find_kl_rule(
    q: Distribution,
    p: Distribution,
    kl_rules: Optional[Mapping[TypePair, KLFn]] = None,
) -> Tuple[Optional[KLRule], str]:
    """
    Find the rule computing :math:`\\mathrm{KL}(q \\,\\|\\, p)` for the guide
    distribution ``q`` and the model distribution ``p``.

    Precedence: ``kl_rules`` (``"scoped"``) > a ``Delta`` guide
    (``"builtin"``) > the function :func:`torch.distributions.kl_divergence`
    dispatches to (``"builtin"`` or ``"torch"``) > the Gaussian fallback
    (``"gaussian"``); see the module docstring. The function found is called
    once on ``q`` and ``p`` (the result is discarded): if it raises
    :class:`NotImplementedError`, its message is the reason no rule applies;
    other errors are left to :func:`compute_kl`.
    Call this once per site and plan, not every step.

    :param q: guide distribution.
    :param p: model distribution.
    :param kl_rules: optional mapping ``{(TypeQ, TypeP): fn}`` tried before
        torch's registry for one ELBO instance, also for the parts of
        composite distributions.
    :returns: ``(rule, reason)``; ``rule`` is ``None`` if no analytic KL is
        available and ``reason`` then says why (e.g. ``"no kl_divergence
        registered for (Gamma, LogNormal)"``), so the caller can fall back to
        a Monte Carlo estimate. ``reason`` is ``""`` when a rule is found.
    :raises TypeError: if ``q`` or ``p`` is not a distribution, or a key of
        ``kl_rules`` is not a pair of distribution types.
    """
    if not isinstance(q, Distribution) or not isinstance(p, Distribution):
        raise TypeError(f"Expected two Distributions, got {type(q)} and {type(p)}")
    if q.event_shape != p.event_shape:
        return None, (
            f"event shapes differ: guide {type(q).__name__} has event_shape "
            f"{tuple(q.event_shape)}, model {type(p).__name__} has {tuple(p.event_shape)}"
        )
    try:
        # Pyro's pure-Python broadcast_shape: torch.broadcast_shapes goes through torch._refs,
        # whose first call imports torch.fx's symbolic shapes (half a second)
        broadcast_shape(q.batch_shape, p.batch_shape)
    except ValueError:
        return None, (
            f"batch shapes {tuple(q.batch_shape)} (guide {type(q).__name__}) and "
            f"{tuple(p.batch_shape)} (model {type(p).__name__}) do not broadcast"
        )
    type_q, type_p = type(q), type(p)
    scope = KLScope(kl_rules)

    # 1. Scoped rules of one ELBO instance, then 2. Delta guides, then 3. torch's registry.
    found = scope.dispatch(type_q, type_p)
    if found is not None:
        fn, scoped_pair = found
    elif is_delta(q):
        description = "builtin: delta_kl (a Delta guide: the KL equals log q - log p at the sample)"
        return KLRule(delta_kl, "builtin", description), ""
    else:
        fn, scoped_pair = torch_kl_function(type_q, type_p), None
    reason = f"no kl_divergence registered for ({type_q.__name__}, {type_p.__name__})"
    if fn is not None:
        source, description = _describe(fn, scoped_pair)
        trace, reason = _try_rule(fn, description, q, p, kl_rules)
        if trace is not None:
            for part in trace:
                description += f" of [{_describe(*part)[1]}"
            description += "]" * len(trace)
            if scope.kl_rules:
                fn = _in_scope(fn, scope)
            return KLRule(fn, source, description), ""

    # 4. Gaussian pairs no function covers, as MultivariateNormal.
    if is_gaussian(q) and is_gaussian(p):
        description = (
            f"gaussian: gaussian_kl ({distribution_name(q)} vs {distribution_name(p)} "
            "as MultivariateNormal)"
        )
        return KLRule(gaussian_kl, "gaussian", description), ""
    return None, reason


################################################################################
# Computation and checks
################################################################################


def _fmt(d: Distribution) -> str:
    return f"{d!r} [batch_shape={tuple(d.batch_shape)}, event_shape={tuple(d.event_shape)}]"


def _where(name: Optional[str], q: Distribution, p: Distribution) -> str:
    site = f"site {name!r}: " if name is not None else ""
    return f"{site}KL(q || p) with guide q = {_fmt(q)} and model p = {_fmt(p)}"


def _skip_value_checks() -> bool:
    if torch._C._get_tracing_state():
        return True
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling is not None and is_compiling())


def _first_index(mask: Tensor) -> Tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0].tolist()) if mask.dim() else ()


def _nonfinite_params(d: Distribution, prefix: str) -> list:
    """
    Names of already-computed parameters of ``d`` (and its base distributions)
    containing NaN or inf. Only looks at attributes in ``vars(d)`` so that no
    lazy property is evaluated.
    """
    found = []
    seen = set()
    while isinstance(d, Distribution) and id(d) not in seen:
        seen.add(id(d))
        for key, value in vars(d).items():
            if isinstance(value, Tensor) and value.is_floating_point():
                if not bool(torch.isfinite(value).all()):
                    found.append(f"{prefix}.{key.lstrip('_')}")
        d = getattr(d, "base_dist", None)
        prefix += ".base_dist"
    return found


def _raise_value_error(
    name: Optional[str], q: Distribution, p: Distribution, rule: KLRule, kl: Tensor
) -> None:
    kl = kl.detach()
    nan = torch.isnan(kl)
    pos_inf = kl == float("inf")
    neg_inf = kl == float("-inf")
    numel = kl.numel()
    where = _where(name, q, p)
    if bool(nan.any()):
        bad = _nonfinite_params(q, "q") + _nonfinite_params(p, "p")
        cause = (
            f"non-finite parameters: {', '.join(bad)}"
            if bad
            else "no NaN parameter found, so the rule produced it (e.g. inf - inf, "
            "an invalid parameter such as a non-positive scale with validation "
            "disabled, or a numerically unstable formula)"
        )
        raise KLDivergenceError(
            f"{where}: {rule.description} returned NaN at {int(nan.sum())} of {numel} "
            f"batch elements (first at index {_first_index(nan)}); {cause}. "
            "Fix: check the guide and model parameters (a NaN parameter usually follows a "
            "divergent optimizer step: lower the learning rate or clip gradients), run "
            "with pyro.enable_validation(True) to catch invalid parameters, or override "
            "the rule with kl_rules={(TypeQ, TypeP): fn}."
        )
    if bool(pos_inf.any()):
        raise KLDivergenceError(
            f"{where}: {rule.description} returned +inf at {int(pos_inf.sum())} of "
            f"{numel} batch elements (first at index {_first_index(pos_inf)}). "
            f"An infinite KL means the guide puts mass where the model has none "
            f"(guide support {q.support}, model support {p.support}). "
            "Fix: give the guide a distribution whose support lies inside the "
            "model's (e.g. a LogNormal or Gamma guide for a positive model site, a "
            "Beta guide for a Uniform(0, 1) site), or check the model's parameters "
            "(e.g. Uniform bounds)."
        )
    raise KLDivergenceError(
        f"{where}: {rule.description} returned -inf at {int(neg_inf.sum())} of {numel} "
        f"batch elements (first at index {_first_index(neg_inf)}). A KL divergence is "
        "never negative, so the rule is wrong or a density is not normalized (e.g. "
        "the model's log_prob returned +inf). Fix the KL function or remove the "
        "rule so that a Monte Carlo estimate is used."
    )


def _shape_error(
    name: Optional[str], q: Distribution, p: Distribution, rule: KLRule, kl: Any, expected
) -> KLDivergenceError:
    where = _where(name, q, p)
    if not isinstance(kl, Tensor):
        return KLDivergenceError(
            f"{where}: {rule.description} returned {type(kl).__name__} {kl!r}, expected a "
            f"Tensor of shape {tuple(expected)}. Fix: return a tensor, e.g. "
            f"torch.full({tuple(expected)}, value)."
        )
    shape = tuple(kl.shape)
    hint = ""
    if len(q.event_shape) and shape == tuple(expected) + tuple(q.event_shape):
        hint = (
            " The extra trailing dims equal the event shape: the rule probably forgot "
            f"to sum over the {len(q.event_shape)} event dims."
        )
    else:
        try:
            if broadcast_shape(kl.shape, expected) == tuple(expected):
                hint = (
                    " The result broadcasts to the expected shape: the rule probably "
                    "ignored the batch shape of one side; expand it with "
                    f".expand({tuple(expected)})."
                )
        except ValueError:
            pass
    return KLDivergenceError(
        f"{where}: {rule.description} returned shape {shape}, expected "
        f"{tuple(expected)} = broadcast_shapes(q.batch_shape={tuple(q.batch_shape)}, "
        f"p.batch_shape={tuple(p.batch_shape)}).{hint} Fix: a KL function must return "
        "one value per element of the broadcast batch shape of the pair."
    )


def compute_kl(
    name: Optional[str],
    q: Distribution,
    p: Distribution,
    rule: KLRule,
    *,
    check_values: Optional[bool] = None,
) -> Tensor:
    """
    Compute :math:`\\mathrm{KL}(q \\,\\|\\, p)` with ``rule`` and check the
    result.

    Checks: the result is a tensor of shape
    ``torch.broadcast_shapes(q.batch_shape, p.batch_shape)`` (free); its values
    are finite (one ``torch.isfinite(kl).all()`` reduction; only if that fails
    the values are inspected to build the error message). ``+inf`` is reported
    as a support mismatch (the guide puts mass where the model has none),
    ``-inf`` as a broken rule, NaN with the non-finite parameters if any.

    :param name: site name used in error messages (``None`` for none).
    :param q: guide distribution.
    :param p: model distribution.
    :param rule: a rule from :func:`find_kl_rule`.
    :param check_values: whether to run the value check. ``None`` (default)
        runs it unless tracing with the JIT (``torch._C._get_tracing_state()``)
        or compiling with :func:`torch.compile`.
    :raises KLDivergenceError: on a wrong shape, NaN or infinite result.
    :raises NotImplementedError: if the rule raises it (with the site name).
    """
    try:
        kl = rule.fn(q, p)
    except NotImplementedError as e:
        raise NotImplementedError(
            f"{_where(name, q, p)}: {rule.description} raised NotImplementedError({e}). "
            "Fix: register a rule for this pair with torch.distributions.kl.register_kl or "
            "kl_rules, or unregister this one so that a Monte Carlo estimate is used."
        ) from e
    except KLDivergenceError as e:
        raise KLDivergenceError(f"{_where(name, q, p)}: {rule.description}: {e}") from e
    except Exception as e:
        if hasattr(e, "add_note"):
            e.add_note(f"while computing {_where(name, q, p)} with {rule.description}")
        raise
    # shapes are constants of a compiled graph: no TracerWarning (an error under -W error)
    with ignore_jit_warnings():
        expected = torch.Size(broadcast_shape(q.batch_shape, p.batch_shape))
        bad_shape = not isinstance(kl, Tensor) or kl.shape != expected
    if bad_shape:
        raise _shape_error(name, q, p, rule, kl, expected)
    if check_values is None:
        check_values = not _skip_value_checks()
    if check_values and not bool(torch.isfinite(kl).all()):
        _raise_value_error(name, q, p, rule, kl)
    return kl
