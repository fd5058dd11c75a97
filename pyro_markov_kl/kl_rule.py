# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0
r"""
Types and helpers shared by :mod:`pyro_markov_kl.kl_pairs` (the built-in KL
functions, registered with :func:`torch.distributions.kl.register_kl`) and
:mod:`pyro_markov_kl.kl` (the lookup the ELBO uses). This module imports
neither.

KL functions follow torch's convention: ``fn(q, p)`` returns
:math:`\mathrm{KL}(q \,\|\, p) = \mathbb E_q[\log q(x) - \log p(x)]` of shape
``broadcast_shapes(q.batch_shape, p.batch_shape)``, or raises
:class:`NotImplementedError` (with a message saying why) for an instance it
cannot handle.

A :class:`KLScope` is the state a KL function runs in: the scoped rules of one
ELBO instance (``kl_rules={(TypeQ, TypeP): fn}``), which :func:`nested_kl`
tries before torch's registry when a composite function (``Independent``,
``ExpandedDistribution``, ``TransformedDistribution``) computes the KL of its
parts, and, while :func:`~pyro_markov_kl.kl.find_kl_rule` tries a rule, the
functions the parts dispatched to (for descriptions). Scopes never touch
torch's registry.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple

import torch.distributions.kl as torch_kl
from pyro.distributions.torch_distribution import ExpandedDistribution
from torch import Tensor
from torch.distributions import Distribution, Independent

__all__ = [
    "KLDivergenceError",
    "KLFn",
    "KLRule",
    "KLScope",
    "TypePair",
    "check_kl_rules",
    "dispatch_kl_rules",
    "distribution_name",
    "finding_rule",
    "for_compiled_graph",
    "for_compiled_graph_active",
    "nested_kl",
    "torch_kl_function",
    "torch_kl_registry_version",
]

KLFn = Callable[[Distribution, Distribution], Tensor]
TypePair = Tuple[type, type]


class KLRule(NamedTuple):
    """
    A function computing :math:`\\mathrm{KL}(q \\,\\|\\, p)` together with where
    it came from.

    :ivar fn: callable ``fn(q, p) -> Tensor`` of shape
        ``broadcast_shapes(q.batch_shape, p.batch_shape)``.
    :ivar str source: one of ``"scoped"`` (the ELBO's ``kl_rules``),
        ``"builtin"`` (a function of :mod:`pyro_markov_kl.kl_pairs`),
        ``"torch"`` (any other function registered with
        :func:`torch.distributions.kl.register_kl`, e.g. torch's, Pyro's or a
        user's) or ``"gaussian"`` (the Gaussian fallback of
        :func:`pyro_markov_kl.kl_pairs.gaussian_kl`).
    :ivar str description: human readable description, e.g.
        ``"torch: _kl_normal_normal"`` or
        ``"builtin: _kl_independent_independent of [torch: _kl_normal_normal]"``,
        used by ``explain()``.

    A rule is found for distribution *instances* and is valid for later
    instances of the same structure (same types, ``reinterpreted_batch_ndims``,
    transforms, ...): like any function registered with torch, it raises
    :class:`NotImplementedError` for an instance it cannot handle.
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


def distribution_name(d: Distribution) -> str:
    """``Independent(Normal, 1)``-style name of a distribution through its wrappers."""
    if isinstance(d, Independent):
        return f"Independent({distribution_name(d.base_dist)}, {d.reinterpreted_batch_ndims})"
    if isinstance(d, ExpandedDistribution):
        return f"ExpandedDistribution({distribution_name(d.base_dist)})"
    return type(d).__name__


def _check_type(t: object, name: str) -> None:
    if not (isinstance(t, type) and issubclass(t, Distribution)):
        raise TypeError(f"Expected {name} to be a Distribution subclass but got {t!r}")


def check_kl_rules(kl_rules: Mapping[TypePair, KLFn]) -> Mapping[TypePair, KLFn]:
    """
    Check that ``kl_rules`` maps ``(TypeQ, TypeP)`` pairs of
    :class:`~torch.distributions.Distribution` subclasses to functions.

    :raises TypeError: on a malformed key.
    """
    for key in kl_rules:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise TypeError(f"kl_rules keys must be (TypeQ, TypeP) pairs, got {key!r}")
        _check_type(key[0], "kl_rules key type_q")
        _check_type(key[1], "kl_rules key type_p")
    return kl_rules


################################################################################
# Dispatch
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


def dispatch_kl_rules(
    kl_rules: Mapping[TypePair, KLFn], type_q: type, type_p: type
) -> Optional[Tuple[KLFn, TypePair]]:
    """
    The most specific entry of ``kl_rules`` matching ``(type_q, type_p)``, by
    the rule of :func:`torch.distributions.kl.register_kl`: among the pairs
    ``(TypeQ, TypeP)`` with ``issubclass(type_q, TypeQ)`` and
    ``issubclass(type_p, TypeP)``, the least in the lexicographic subclass
    order from the left; if the order from the right disagrees, a
    :class:`RuntimeWarning` names the pair to add to break the tie.

    :returns: ``(fn, (TypeQ, TypeP))`` or ``None``.
    """
    matches = [
        (super_q, super_p)
        for super_q, super_p in kl_rules
        if issubclass(type_q, super_q) and issubclass(type_p, super_p)
    ]
    if not matches:
        return None
    left_q, left_p = min(_Match(*m) for m in matches).types
    right_p, right_q = min(_Match(*reversed(m)) for m in matches).types
    left = kl_rules[left_q, left_p]
    if left is not kl_rules[right_q, right_p]:
        warnings.warn(
            f"Ambiguous kl_rules entry for ({type_q.__name__}, {type_p.__name__}): both "
            f"({left_q.__name__}, {left_p.__name__}) and ({right_q.__name__}, "
            f"{right_p.__name__}) match. Please add ({left_q.__name__}, {right_p.__name__}) "
            "to break the tie.",
            RuntimeWarning,
            stacklevel=3,
        )
    return left, (left_q, left_p)


def torch_kl_function(type_q: type, type_p: type) -> Optional[KLFn]:
    """
    The function :func:`torch.distributions.kl_divergence` calls for
    ``(type_q, type_p)``, or ``None`` if there is none; warns as torch does if
    the match is ambiguous.
    """
    # torch has no public way to ask which registered function kl_divergence will call
    # (to name it in explain() and to call it without a second dispatch); its private
    # _dispatch_kl, the lookup kl_divergence memoizes, is read here and nowhere else.
    fn = torch_kl._dispatch_kl(type_q, type_p)
    return None if fn is NotImplemented else fn


_REGISTRY_SEEN: List[object] = [(), 0]


def torch_kl_registry_version() -> int:
    """
    A number that changes whenever torch's KL registry gains, loses or rebinds
    a pair, for caches of :func:`~pyro_markov_kl.kl.find_kl_rule` results (the
    ELBO's plans). Costs a tuple of the registered functions and one
    comparison by identity (about 2 us for torch's and Pyro's ~100 pairs).
    """
    # torch keeps no version of its registry: compare its functions with those seen last
    # (private _KL_REGISTRY, read only, here and nowhere else).
    functions = tuple(torch_kl._KL_REGISTRY.values())
    if functions != _REGISTRY_SEEN[0]:
        _REGISTRY_SEEN[0] = functions
        _REGISTRY_SEEN[1] += 1  # type: ignore[operator]
    return _REGISTRY_SEEN[1]  # type: ignore[return-value]


################################################################################
# Scopes
################################################################################

#: Active scopes, innermost last.
_KL_SCOPES: List[KLScope] = []


class KLScope:
    """
    Context manager activating scoped rules (and optionally a record of nested
    dispatches) for the KL functions called inside it::

        with KLScope({(MyQ, MyP): my_kl}):
            kl = fn(q, p)  # composite functions use my_kl for (MyQ, MyP) parts

    :param kl_rules: ``{(TypeQ, TypeP): fn}``, tried before torch's registry.
    :param trace: if a list, :func:`nested_kl` appends ``(fn, pair)`` for each
        part it computes (``pair`` is the matched ``kl_rules`` key, ``None``
        for a torch registration) and :func:`finding_rule` is true.
    """

    def __init__(
        self, kl_rules: Optional[Mapping[TypePair, KLFn]] = None, trace: Optional[list] = None
    ) -> None:
        self.kl_rules = check_kl_rules(kl_rules) if kl_rules else {}
        self.trace = trace
        self._memo: Dict[TypePair, Optional[Tuple[KLFn, TypePair]]] = {}

    def dispatch(self, type_q: type, type_p: type) -> Optional[Tuple[KLFn, TypePair]]:
        """The most specific scoped rule for the pair (memoized), see :func:`dispatch_kl_rules`."""
        if not self.kl_rules:
            return None
        key = type_q, type_p
        try:
            return self._memo[key]
        except KeyError:
            result = self._memo[key] = dispatch_kl_rules(self.kl_rules, type_q, type_p)
            return result

    def __enter__(self) -> KLScope:
        _KL_SCOPES.append(self)
        return self

    def __exit__(self, *args: object) -> None:
        _KL_SCOPES.pop()


def finding_rule() -> bool:
    """
    Whether :func:`~pyro_markov_kl.kl.find_kl_rule` is trying a rule on the
    current instances, to be reused for later ones: composite functions then
    decline matches that hold only for the current values (e.g. equal
    transforms with different learnable parameters).
    """
    return bool(_KL_SCOPES) and _KL_SCOPES[-1].trace is not None


_FOR_COMPILED_GRAPH: List[bool] = []


@contextlib.contextmanager
def for_compiled_graph() -> Iterator[None]:
    """
    Rules found inside are for a compiled graph (a JIT twin's plan), which
    reuses them for every later call of the same argument shapes, whatever the
    values: composite functions then decline matches that hold only for the
    current values of any tensor, not only of learnable ones (e.g. equal
    transforms whose parameters come from a data argument). An eager plan is
    keyed on such value conditions instead
    (:func:`~pyro_markov_kl.plan_cache.structure_key`).
    """
    _FOR_COMPILED_GRAPH.append(True)
    try:
        yield
    finally:
        _FOR_COMPILED_GRAPH.pop()


def for_compiled_graph_active() -> bool:
    """Whether the rules being found are for a compiled graph (:func:`for_compiled_graph`)."""
    return bool(_FOR_COMPILED_GRAPH)


def nested_kl(q: Distribution, p: Distribution) -> Tensor:
    """
    :func:`torch.distributions.kl_divergence` for the parts of a composite KL
    function, with the scoped rules of the active :class:`KLScope` tried first.

    :raises NotImplementedError: if no function is registered for the pair.
    """
    if not _KL_SCOPES:
        return torch_kl.kl_divergence(q, p)
    scope = _KL_SCOPES[-1]
    found = scope.dispatch(type(q), type(p))
    if found is not None:
        fn, pair = found
        if scope.trace is not None:
            scope.trace.append((fn, pair))
        return fn(q, p)
    if scope.trace is None:
        return torch_kl.kl_divergence(q, p)
    fn = torch_kl_function(type(q), type(p))
    if fn is None:
        raise NotImplementedError(
            f"no kl_divergence registered for ({type(q).__name__}, {type(p).__name__})"
        )
    scope.trace.append((fn, None))
    return fn(q, p)
