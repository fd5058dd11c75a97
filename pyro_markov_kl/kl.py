# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0
r"""
KL-divergence rules for :class:`~pyro_markov_kl.TraceMarkovKL_ELBO`.

This module decides *which function* computes :math:`\mathrm{KL}(q \,\|\, p)`
for a guide distribution ``q`` and a model distribution ``p``, and checks the
result of that function before the ELBO uses it.

Lookup order (first layer that produces a rule wins):

1. ``"scoped"``: the ``kl_rules={(TypeQ, TypeP): fn}`` mapping passed to one
   ELBO instance;
2. ``"registry"``: this package's registry, filled with :func:`register_kl`;
3. ``"builtin"`` and ``"torch"``: this package's built-in rules
   (:mod:`pyro_markov_kl.kl_pairs`) and
   :func:`torch.distributions.kl.register_kl`'s registry (which also holds
   Pyro's registrations), dispatched together as one registry in which a
   built-in rule wins over a torch rule for the *same* type pair, while a
   strictly more specific torch registration (e.g. a user's pair of
   subclasses) still wins over a generic built-in;
4. ``"funsor"``: exact Gaussian integration with :mod:`funsor` for any pair of
   Gaussian-family distributions no rule covers
   (:mod:`pyro_markov_kl.kl_funsor`).

Within one registry, dispatch follows
:func:`torch.distributions.kl.register_kl`: among the registered pairs
``(TypeQ, TypeP)`` with ``issubclass(type(q), TypeQ)`` and
``issubclass(type(p), TypeP)``, the most specific pair is chosen by comparing
the pairs lexicographically by subclass, from the left and from the right; if
the two orders disagree the match is ambiguous and a :class:`RuntimeWarning`
names the pair to register to break the tie.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, Callable, Dict, Iterator, Mapping, NamedTuple, Optional, Tuple

import torch
import torch.distributions.kl as _torch_kl
from pyro.distributions.torch_distribution import ExpandedDistribution
from pyro.util import ignore_jit_warnings
from torch import Tensor
from torch.distributions import Distribution, Independent

__all__ = [
    "KLDivergenceError",
    "KLRule",
    "compute_kl",
    "find_kl_rule",
    "isolated_kl_registry",
    "kl_divergence",
    "register_kl",
    "registry_version",
]

KLFn = Callable[[Distribution, Distribution], Tensor]
TypePair = Tuple[type, type]


class KLRule(NamedTuple):
    """
    A function computing :math:`\\mathrm{KL}(q \\,\\|\\, p)` together with where
    it came from.

    :ivar fn: callable ``fn(q, p) -> Tensor`` of shape
        ``broadcast_shapes(q.batch_shape, p.batch_shape)``.
    :ivar str source: one of ``"scoped"``, ``"registry"``, ``"builtin"``,
        ``"torch"``, ``"funsor"``.
    :ivar str description: human readable description, e.g.
        ``"torch: _kl_normal_normal"``, used by ``explain()``.

    A rule is found for distribution *instances* and is valid for later
    instances of the same structure (same types, ``reinterpreted_batch_ndims``,
    transforms, ...); composite built-in rules check this cheaply and raise if
    the structure changed.
    """

    fn: KLFn
    source: str
    description: str


class KLDivergenceError(ValueError):
    """
    Raised when a KL rule returns an invalid result (wrong shape, NaN or
    infinite values) or fails. The message names the site, both
    distributions, the rule and suggests a fix.
    """


# Source of truth: (type_q, type_p) -> fn, filled by register_kl().
_KL_REGISTRY: Dict[TypePair, KLFn] = {}
# Memoized dispatch of _KL_REGISTRY: (type(q), type(p)) -> (fn, matched pair) or None.
_KL_MEMOIZE: Dict[TypePair, Optional[Tuple[Any, TypePair]]] = {}
# Memoized dispatch of built-in + torch registries, valid for one torch registry state.
_MERGED_MEMOIZE: Dict[TypePair, Optional[Tuple[Any, TypePair]]] = {}
_MERGED_TOKEN: list = [None]
# Bumped on every change of _KL_REGISTRY; see registry_version().
_REGISTRY_COUNTER: list = [0]


def _check_type(t: Any, name: str) -> None:
    if not (isinstance(t, type) and issubclass(t, Distribution)):
        raise TypeError(f"Expected {name} to be a Distribution subclass but got {t!r}")


def register_kl(type_q: type, type_p: type) -> Callable[[KLFn], KLFn]:
    """
    Decorator to register a function computing :math:`\\mathrm{KL}(q \\,\\|\\, p)`
    in this package's registry, which :class:`~pyro_markov_kl.TraceMarkovKL_ELBO`
    consults before the built-in rules and before
    :func:`torch.distributions.kl.register_kl`'s registry. Usage::

        @register_kl(MyGuideDist, MyModelDist)
        def kl_mine(q, p):
            return ...  # tensor of shape broadcast_shapes(q.batch_shape, p.batch_shape)

    The argument order is the same as torch's: the first type is the
    distribution the expectation is taken under (the guide ``q``).

    Lookup returns the most specific ``(type_q, type_p)`` match ordered by
    subclass, exactly as torch does. If the match is ambiguous, a
    :class:`RuntimeWarning` is issued; break the tie by registering the more
    specific pair, e.g. ``register_kl(DerivedQ, DerivedP)(kl_version1)``.

    Registering clears the dispatch cache. To undo registrations (e.g. in
    tests) use :func:`isolated_kl_registry`.

    :param type type_q: a subclass of :class:`~torch.distributions.Distribution`.
    :param type type_p: a subclass of :class:`~torch.distributions.Distribution`.
    """
    _check_type(type_q, "type_q")
    _check_type(type_p, "type_p")

    def decorator(fn: KLFn) -> KLFn:
        _KL_REGISTRY[type_q, type_p] = fn
        _KL_MEMOIZE.clear()  # reset since lookup order may have changed
        _REGISTRY_COUNTER[0] += 1
        return fn

    return decorator


@contextlib.contextmanager
def isolated_kl_registry() -> Iterator[None]:
    """
    Context manager that restores this package's KL registry *and* torch's
    KL registry on exit, and clears both dispatch caches. Registrations made
    inside the block (with :func:`register_kl` or
    :func:`torch.distributions.kl.register_kl`) are undone. Intended for
    tests::

        with isolated_kl_registry():
            register_kl(MyQ, MyP)(my_kl)
            ...
    """
    saved = dict(_KL_REGISTRY)
    saved_torch = dict(_torch_kl._KL_REGISTRY)
    try:
        yield
    finally:
        _KL_REGISTRY.clear()
        _KL_REGISTRY.update(saved)
        _KL_MEMOIZE.clear()
        _REGISTRY_COUNTER[0] += 1
        _torch_kl._KL_REGISTRY.clear()
        _torch_kl._KL_REGISTRY.update(saved_torch)
        _torch_kl._KL_MEMOIZE.clear()
        _MERGED_MEMOIZE.clear()
        _MERGED_TOKEN[0] = None


def registry_version() -> Tuple[int, int]:
    """
    A hashable token that changes whenever this package's registry or torch's
    KL registry changes (a registration, or the restore at the end of
    :func:`isolated_kl_registry`), for caches of :func:`find_kl_rule` results
    such as the ELBO's plans. Costs a hash over torch's registry (~100 pairs).
    """
    return _REGISTRY_COUNTER[0], _torch_token()


################################################################################
# Dispatch (mirrors torch.distributions.kl._dispatch_kl)
################################################################################


@functools.total_ordering
class _Match:
    __slots__ = ["types"]

    def __init__(self, *types: type) -> None:
        self.types = types

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Match) and self.types == other.types

    def __le__(self, other: _Match) -> bool:
        for x, y in zip(self.types, other.types):
            if not issubclass(x, y):
                return False
            if x is not y:
                break
        return True


def _dispatch(
    registry: Mapping[TypePair, Any], type_q: type, type_p: type, what: str
) -> Optional[Tuple[Any, TypePair]]:
    """
    Find the most specific approximate match in ``registry``, assuming single
    inheritance, as :func:`torch.distributions.kl._dispatch_kl` does.

    :returns: ``(value, (matched_q, matched_p))`` or ``None``.
    """
    matches = [
        (super_q, super_p)
        for super_q, super_p in registry
        if issubclass(type_q, super_q) and issubclass(type_p, super_p)
    ]
    if not matches:
        return None
    # Check that the left- and right- lexicographic orders agree.
    left_q, left_p = min(_Match(*m) for m in matches).types
    right_p, right_q = min(_Match(*reversed(m)) for m in matches).types
    left = registry[left_q, left_p]
    right = registry[right_q, right_p]
    if left is not right and left != right:  # merged registries hold (source, fn) pairs
        warnings.warn(
            f"Ambiguous {what} kl_divergence({type_q.__name__}, {type_p.__name__}): "
            f"both ({left_q.__name__}, {left_p.__name__}) and "
            f"({right_q.__name__}, {right_p.__name__}) match. "
            f"Please register_kl({left_q.__name__}, {right_p.__name__}) to break the tie.",
            RuntimeWarning,
            stacklevel=4,
        )
    return left, (left_q, left_p)


def _registry_dispatch(type_q: type, type_p: type) -> Optional[Tuple[Any, TypePair]]:
    key = type_q, type_p
    try:
        return _KL_MEMOIZE[key]
    except KeyError:
        result = _dispatch(_KL_REGISTRY, type_q, type_p, "registered")
        _KL_MEMOIZE[key] = result
        return result


def _torch_token() -> int:
    # Changes whenever torch's registry gains, loses or rebinds a pair.
    return hash(tuple(_torch_kl._KL_REGISTRY.items()))


def _merged_registry() -> Dict[TypePair, Tuple[str, Any]]:
    from .kl_pairs import BUILTIN_KL

    merged: Dict[TypePair, Tuple[str, Any]] = {
        k: ("torch", fn) for k, fn in _torch_kl._KL_REGISTRY.items()
    }
    for k, builder in BUILTIN_KL.items():
        merged[k] = ("builtin", builder)
    return merged


def _merged_dispatch(type_q: type, type_p: type) -> Optional[Tuple[Any, TypePair]]:
    token = _torch_token()
    if _MERGED_TOKEN[0] != token:
        _MERGED_MEMOIZE.clear()
        _MERGED_TOKEN[0] = token
    key = type_q, type_p
    try:
        return _MERGED_MEMOIZE[key]
    except KeyError:
        result = _dispatch(_merged_registry(), type_q, type_p, "built-in/torch")
        _MERGED_MEMOIZE[key] = result
        return result


def _torch_only_dispatch(type_q: type, type_p: type) -> Optional[Tuple[Any, TypePair]]:
    # torch's registry without the pairs a built-in rule supersedes; used when the
    # built-in rule declined (the superseded torch function would fail alike).
    from .kl_pairs import BUILTIN_KL

    registry = {k: v for k, v in _torch_kl._KL_REGISTRY.items() if k not in BUILTIN_KL}
    return _dispatch(registry, type_q, type_p, "torch")


################################################################################
# Lookup
################################################################################


def distribution_name(d: Distribution) -> str:
    """``Independent(Normal, 1)``-style name of a distribution through its wrappers."""
    if isinstance(d, Independent):
        return f"Independent({distribution_name(d.base_dist)}, {d.reinterpreted_batch_ndims})"
    if isinstance(d, ExpandedDistribution):
        return f"ExpandedDistribution({distribution_name(d.base_dist)})"
    return type(d).__name__


def _fn_name(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return name if name else repr(fn)


def _describe_registered(source: str, fn: Any, pair: TypePair) -> str:
    return f"{source}: {_fn_name(fn)} registered for ({pair[0].__name__}, {pair[1].__name__})"


def _torch_rule_declines(fn: Any, q: Distribution, p: Distribution) -> Optional[str]:
    """
    Instance conditions under which a torch registration dispatches by type but
    raises :class:`NotImplementedError` at call time.
    """
    if fn is getattr(_torch_kl, "_kl_expfamily_expfamily", None) and type(q) is not type(p):
        return (
            f"torch's generic exponential-family KL requires identical types, "
            f"got ({type(q).__name__}, {type(p).__name__})"
        )
    return None


def _check_kl_rules(kl_rules: Mapping[TypePair, KLFn]) -> Mapping[TypePair, KLFn]:
    for key in kl_rules:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise TypeError(f"kl_rules keys must be (TypeQ, TypeP) pairs, got {key!r}")
        _check_type(key[0], "kl_rules key type_q")
        _check_type(key[1], "kl_rules key type_p")
    return kl_rules


def find_kl_rule(
    q: Distribution, p: Distribution, kl_rules: Optional[Mapping[TypePair, KLFn]] = None
) -> Tuple[Optional[KLRule], str]:
    """
    Find the rule computing :math:`\\mathrm{KL}(q \\,\\|\\, p)` for the guide
    distribution ``q`` and the model distribution ``p``.

    Precedence: ``kl_rules`` (``"scoped"``) > :func:`register_kl`
    (``"registry"``) > built-in rules and torch's registry (``"builtin"``,
    ``"torch"``; see the module docstring) > :mod:`funsor` Gaussian fallback
    (``"funsor"``). Type dispatch is memoized; instance conditions (e.g.
    ``reinterpreted_batch_ndims``, transforms, base distributions) are checked
    on every call, so call this once per site and plan, not every step.

    :param q: guide distribution.
    :param p: model distribution.
    :param kl_rules: optional mapping ``{(TypeQ, TypeP): fn}`` overriding the
        registries for one ELBO instance.
    :returns: ``(rule, reason)``; ``rule`` is ``None`` if no analytic KL is
        available and ``reason`` then says why (e.g. ``"no kl_divergence
        registered for (Gamma, LogNormal)"``), so the caller can fall back to
        a Monte Carlo estimate. ``reason`` is ``""`` when a rule is found.
    """
    if not isinstance(q, Distribution) or not isinstance(p, Distribution):
        raise TypeError(f"Expected two Distributions, got {type(q)} and {type(p)}")
    if q.event_shape != p.event_shape:
        return None, (
            f"event shapes differ: guide {type(q).__name__} has event_shape "
            f"{tuple(q.event_shape)}, model {type(p).__name__} has {tuple(p.event_shape)}"
        )
    try:
        torch.broadcast_shapes(q.batch_shape, p.batch_shape)
    except RuntimeError:
        return None, (
            f"batch shapes {tuple(q.batch_shape)} (guide {type(q).__name__}) and "
            f"{tuple(p.batch_shape)} (model {type(p).__name__}) do not broadcast"
        )
    type_q, type_p = type(q), type(p)

    # 1. Scoped rules of one ELBO instance.
    if kl_rules:
        found = _dispatch(_check_kl_rules(kl_rules), type_q, type_p, "scoped")
        if found is not None:
            fn, pair = found
            return KLRule(fn, "scoped", _describe_registered("scoped", fn, pair)), ""

    # 2. This package's registry.
    found = _registry_dispatch(type_q, type_p)
    if found is not None:
        fn, pair = found
        return KLRule(fn, "registry", _describe_registered("registry", fn, pair)), ""

    # 3. Built-in rules and torch's registry, dispatched together.
    reasons = []
    found = _merged_dispatch(type_q, type_p)
    if found is not None and found[0][0] == "builtin":
        builder = found[0][1]

        def resolve(q1: Distribution, p1: Distribution) -> Tuple[Optional[KLRule], str]:
            return find_kl_rule(q1, p1, kl_rules)

        result = builder(q, p, resolve)
        if isinstance(result, KLRule):
            return result, ""
        # The built-in rule declined; torch functions registered for the same pairs
        # would fail alike, so only consider torch's other registrations.
        reasons.append(str(result))
        found = _torch_only_dispatch(type_q, type_p)
        torch_fn = None if found is None else found[0]
    else:
        torch_fn = None if found is None else found[0][1]
    if torch_fn is not None:
        declined = _torch_rule_declines(torch_fn, q, p)
        if declined is None:
            return KLRule(torch_fn, "torch", f"torch: {_fn_name(torch_fn)}"), ""
        reasons.append(declined)

    # 4. Exact Gaussian integration with funsor.
    from .kl_funsor import find_gaussian_rule

    rule, why = find_gaussian_rule(q, p)
    if rule is not None:
        return rule, ""
    if not reasons:
        reasons.append(f"no kl_divergence registered for ({type_q.__name__}, {type_p.__name__})")
    return None, "; ".join(reasons)


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
            if torch.broadcast_shapes(kl.shape, expected) == expected:
                hint = (
                    " The result broadcasts to the expected shape: the rule probably "
                    "ignored the batch shape of one side; expand it with "
                    f".expand({tuple(expected)})."
                )
        except RuntimeError:
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
            "Fix: register a rule for this pair with register_kl or kl_rules, or "
            "unregister this one so that a Monte Carlo estimate is used."
        ) from e
    except KLDivergenceError as e:
        raise KLDivergenceError(f"{_where(name, q, p)}: {e}") from e
    except Exception as e:
        if hasattr(e, "add_note"):
            e.add_note(f"while computing {_where(name, q, p)} with {rule.description}")
        raise
    # shapes are constants of a compiled graph: no TracerWarning (an error under -W error)
    with ignore_jit_warnings():
        expected = torch.broadcast_shapes(q.batch_shape, p.batch_shape)
        bad_shape = not isinstance(kl, Tensor) or kl.shape != expected
    if bad_shape:
        raise _shape_error(name, q, p, rule, kl, expected)
    if check_values is None:
        check_values = not _skip_value_checks()
    if check_values and not bool(torch.isfinite(kl).all()):
        _raise_value_error(name, q, p, rule, kl)
    return kl


def kl_divergence(
    q: Distribution, p: Distribution, kl_rules: Optional[Mapping[TypePair, KLFn]] = None
) -> Tensor:
    """
    Compute :math:`\\mathrm{KL}(q \\,\\|\\, p) = \\mathbb{E}_q[\\log q(x) - \\log p(x)]`
    with :func:`find_kl_rule` and :func:`compute_kl`.

    :param q: guide distribution.
    :param p: model distribution.
    :param kl_rules: optional scoped rules, as in :func:`find_kl_rule`.
    :returns: tensor of shape ``broadcast_shapes(q.batch_shape, p.batch_shape)``.
    :raises NotImplementedError: if no analytic KL is available.
    """
    rule, reason = find_kl_rule(q, p, kl_rules)
    if rule is None:
        raise NotImplementedError(
            f"No analytic KL(q || p) for q = {_fmt(q)}, p = {_fmt(p)}: {reason}"
        )
    return compute_kl(None, q, p, rule)
