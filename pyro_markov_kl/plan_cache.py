# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
The per-ELBO cache of estimator plans, one per model/guide structure: the plan
key (:func:`structure_key` of the traces, :func:`argument_key` of the call) and
:class:`PlanCache`, with its checks against a fresh analysis.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, Hashable, List, Optional

import numpy as np
import torch
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.poutine.trace_struct import Trace
from pyro.util import ignore_jit_warnings
from torch.distributions import Independent, TransformedDistribution

from .kl import registry_version
from .sites import outside_jit_trace


# --- the key of a step's structure -----------------------------------------------------------
def fn_signature(fn: Any, shape: Optional[Callable[[Any], Any]] = None) -> tuple:
    """
    A hashable summary of a distribution's structure through its wrappers: each
    wrapper's type, batch and event shapes, and what a wrapper adds (an
    ``Independent``'s reinterpreted dimensions, a ``TransformedDistribution``'s
    transform types, the shape and broadcast dimensions of a ``.mask()``).

    :param shape: how a shape is made hashable (default: as plain ints under a
        JIT trace, where sizes are traced tensors, else as it is)
    """
    if shape is None:
        shape = _traced_shape if torch._C._get_tracing_state() else _shape
    sig: list = []
    while fn is not None:
        entry: tuple = (
            type(fn),
            shape(getattr(fn, "batch_shape", None)),
            shape(getattr(fn, "event_shape", None)),
        )
        if isinstance(fn, Independent):
            entry += (fn.reinterpreted_batch_ndims,)
        elif isinstance(fn, TransformedDistribution):
            entry += (tuple(type(t) for t in fn.transforms),)
        elif isinstance(fn, MaskedDistribution):
            mask = fn._mask
            if torch.is_tensor(mask):  # broadcast dimensions decide whether it can be folded
                mask = shape(mask.shape), tuple(st == 0 for st in mask.stride())
            entry += (mask,)
        sig.append(entry)
        fn = getattr(fn, "base_dist", None)
    return tuple(sig)


def _shape(shape: Any) -> Any:
    # a torch.Size is a tuple of ints, equal to (and hashing as) the tuple
    return shape if type(shape) is torch.Size else _traced_shape(shape)


def _traced_shape(shape: Any) -> Any:
    # plain ints: under Pyro's JIT, sizes hash by identity although they compare equal
    return None if shape is None else tuple(int(d) for d in shape)


def _factor_signature(x: Any, shape: Callable[[Any], Any] = _shape) -> Any:
    # a 0-dim tensor scale is a number to the plan (Pyro's JIT turns numbers into tensors)
    if torch.is_tensor(x) and (x.dim() or x.dtype == torch.bool):
        return shape(x.shape), x.dtype
    return x if x is None or x is True or x is False else float


class StructureKey:
    """A tuple key whose hash is computed once (plan keys are large and looked up twice)."""

    __slots__ = ("key", "_hash")

    def __init__(self, key: tuple) -> None:
        self.key = key
        self._hash = hash(key)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, StructureKey) and self._hash == other._hash and self.key == other.key
        )


def structure_key(model_trace: Trace, guide_trace: Trace) -> StructureKey:
    """
    A hashable summary of everything the plan depends on besides the program
    text: site names, types and order, distribution types (through their
    wrappers), shapes, plate stacks, observation status, ``infer`` options and
    the kinds of scale and mask. A plan is reused only for an equal key.
    """
    # under a JIT trace, sizes are traced tensors (also those of distributions made in the
    # trace): made plain ints with the trace suspended, so that keying records nothing
    shape = _traced_shape if torch._C._get_tracing_state() else _shape
    with outside_jit_trace():
        return _structure_key(model_trace, guide_trace, shape)


def _structure_key(model_trace: Trace, guide_trace: Trace, shape: Callable) -> StructureKey:
    key = []

    def frame_key(f: Any) -> tuple:
        # a plate makes a new frame at every site; CondIndepStackFrame._key() enters
        # ignore_jit_warnings every time, needed only for the tensor sizes of Pyro's JIT
        if torch.is_tensor(f.size):
            return f._key()
        return f.name, f.dim, f.size, f.counter

    for trace in (guide_trace, model_trace):
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            value = site["value"]
            infer = site["infer"]
            key.append(
                (
                    name,
                    site["is_observed"],
                    fn_signature(site["fn"], shape),
                    shape(value.shape) if torch.is_tensor(value) else type(value),
                    tuple(frame_key(f) for f in site["cond_indep_stack"]),
                    infer.get("kl"),
                    infer.get("is_auxiliary"),
                    infer.get("enumerate"),
                    bool(infer.get("baseline")),
                    _factor_signature(site["scale"], shape),
                    _factor_signature(site["mask"], shape),
                )
            )
        key.append(None)
    model_nodes = model_trace.nodes
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and name in model_nodes:
            equal = _transform_equalities(site["fn"], model_nodes[name]["fn"])
            if equal:
                key.append((name, equal))
    return StructureKey(tuple(key))


def _transform_equalities(q: Any, p: Any) -> tuple:
    """
    Whether each pair of transforms of ``q`` and ``p`` (the guide's and the
    model's distribution of a site, through their wrappers) is equal, for the
    ``TransformedDistribution`` pairs whose KL rule requires equal transforms:
    a value condition that a plan depends on, so it belongs in the key. Empty,
    at the cost of a walk along the wrappers, for every other site.
    """
    equal: list = []
    while q is not None and p is not None:
        if isinstance(q, TransformedDistribution) and isinstance(p, TransformedDistribution):
            equal.extend(_same_transform(a, b) for a, b in zip(q.transforms, p.transforms))
        q, p = getattr(q, "base_dist", None), getattr(p, "base_dist", None)
    return tuple(equal)


def _same_transform(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    try:
        with torch.no_grad():
            return bool(a == b)
    except (RuntimeError, TypeError, ValueError):
        return False


# --- the key of a step's arguments ---------------------------------------------------------
# non-tensor arguments whose value may steer the program's control flow, keyed by value
_SWITCHES = (bool, int, str, bytes, type(None), enum.Enum, type)


def argument_key(args: tuple, kwargs: dict) -> tuple:
    """
    A hashable summary of the non-tensor arguments of a model/guide call that
    may change its dependency structure without changing its trace structure
    (``guide(data, backward=True)``): flags, integers, strings, enums and types
    by value, through tuples, lists, dicts and configuration objects (an
    ``argparse.Namespace``, a dataclass, any plain object with at most 64
    attributes, which are keyed one by one, so a flag flipped on the same object
    is seen). Tensors and numpy arrays count by dimension and shape only (their
    shapes are also in the traces), floats by type only (a float argument is
    taken to be a number the program computes with, such as a KL annealing
    factor, not a switch), modules by identity and training mode, other objects
    (functions, ...) by identity. What the key misses, :class:`PlanCache`'s
    checks against a fresh analysis find.
    """
    key: List[Hashable] = []
    stack: List[Any] = [args, kwargs]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            key.append(("tensor", x.dim()))
        elif isinstance(x, _SWITCHES):
            key.append((type(x), x))
        elif isinstance(x, float):
            key.append(float)
        elif isinstance(x, np.ndarray):
            key.append(("ndarray", x.shape, x.dtype.str))
        elif isinstance(x, (tuple, list)):
            key.append((type(x), len(x)))
            stack.extend(reversed(x))
        elif isinstance(x, dict):
            key.append((dict, tuple(x)))
            stack.extend(reversed(list(x.values())))
        elif isinstance(x, torch.nn.Module):
            key.append((type(x), id(x), x.training))
        elif _is_plain_object(x):
            fields = vars(x) if hasattr(x, "__dict__") else dataclasses.asdict(x)
            key.append((type(x), tuple(fields)))
            stack.extend(reversed(list(fields.values())))
        else:
            key.append((type(x), id(x)))
    return tuple(key)


def _is_plain_object(x: Any) -> bool:
    """A configuration-like object whose attributes are keyed one by one."""
    if isinstance(x, (argparse.Namespace, types.SimpleNamespace)):
        return True
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return True
    return (
        type(x).__module__ != "builtins"
        and not callable(x)
        and isinstance(getattr(x, "__dict__", None), dict)
        and len(x.__dict__) <= _MAX_FIELDS
    )


_MAX_FIELDS = 64

# --- the cache --------------------------------------------------------------------------------
#: the uses of a cached plan at which it is checked against a fresh analysis, and the period
#: after the last of them
CHECK_AT = (2, 16, 128)
CHECK_EVERY = 256


def _decisions(plan: Any) -> Any:
    """What a plan decides about each site, without the parents it shows for them."""
    records = {
        name: dataclasses.replace(
            rec,
            guide_parents=frozenset(),
            model_parents=frozenset(),
            guide_descendants=frozenset(),
            reason="",
        )
        for name, rec in plan.sites.items()
    }
    return records, plan.kl_groups


class StalePlanWarning(RuntimeWarning):
    """A cached plan was found stale by a check against a fresh analysis."""


class PlanCache(OrderedDict):
    """
    A least-recently-used mapping from structure keys to plans, holding at most
    ``maxsize`` plans (``0``: none, every step is analysed). It belongs to one
    ELBO instance, so each process of a distributed run has its own. It is not
    pickled with the ELBO: plans hold KL rules that need not pickle, and are
    rebuilt on demand.

    A plan is reused only for a step whose key is equal to the one it was built
    for: the model/guide pair and the ELBO's settings that a plan reads (the
    ``owner``), the KL registries' version, the non-tensor arguments
    (:func:`argument_key`) and the structure of the traces
    (:func:`structure_key`, which also holds the value
    conditions a KL rule was chosen on, such as equal transforms).

    What a key cannot see (a float argument used as a switch, global state, a
    data value in Python control flow) is caught by checks: at a plan's uses
    ``CHECK_AT`` (2, 16, 128) and every ``CHECK_EVERY`` (256) after, the step
    is analysed afresh and the decisions compared (:meth:`_check`). A
    difference means the plan was stale since the last check; it is replaced,
    the model and guide are analysed every step from then on, and a
    :class:`StalePlanWarning` says so. The checks cost one analysis (about a
    step without the cache) per check: a fraction of a percent of the steps.

    :param int maxsize: the most plans kept
    """

    def __init__(self, maxsize: int = 256) -> None:
        super().__init__()
        self.maxsize = maxsize
        #: the uses of a plan at which it is checked, and the period after (``0``: never)
        self.check_at, self.check_every = CHECK_AT, CHECK_EVERY
        self._uses: Dict[StructureKey, int] = {}
        #: owners whose dependencies changed under an equal key: analysed every step
        self._volatile: set = set()
        #: kept keys whose traces passed the shape validation
        self._shapes_checked: set = set()

    def get_or_build(
        self,
        owner: Hashable,
        args: tuple,
        kwargs: dict,
        model_trace: Trace,
        guide_trace: Trace,
        build: Callable[[], Any],
        check_shapes: Optional[Callable[[], None]] = None,
    ) -> Any:
        """
        The plan for this step, built by ``build()`` (and kept) if there is none.

        :param owner: the model/guide pair and every ELBO setting the plan or
            ``check_shapes`` reads
        :param args: the positional arguments of the step
        :param kwargs: the keyword arguments of the step
        :param check_shapes: the validation of the traces' shapes, which raises
            on bad shapes. It reads only what the key holds (shapes, plate
            stacks, kinds of scale and mask), so it runs once per kept key, not
            every step.
        """
        # under Pyro's JIT sizes are traced tensors; the key reads them with the trace
        # suspended, the shape check and a plan's checks read them traced: that is intended
        # (a compiled graph has one structure) and must not warn (a TracerWarning raised as
        # an error inside torch's __int__ surfaces as SystemError)
        with ignore_jit_warnings():
            key = StructureKey(
                (
                    owner,
                    registry_version(),
                    argument_key(args, kwargs),
                    structure_key(model_trace, guide_trace),
                )
            )
            unchecked = check_shapes is not None and key not in self._shapes_checked
            if unchecked:
                check_shapes()
            plan = self._lookup(key, owner, build)
            if unchecked and key in self:
                self._shapes_checked.add(key)
            return plan

    def _lookup(self, key: StructureKey, owner: Hashable, build: Callable[[], Any]) -> Any:
        if owner in self._volatile:
            return build()
        plan = self.get(key)
        if plan is None:
            plan = build()
            if self.maxsize > 0:
                self[key] = plan
                self._uses[key] = 1
                while len(self) > self.maxsize:
                    evicted = self.popitem(last=False)[0]
                    self._uses.pop(evicted, None)
                    self._shapes_checked.discard(evicted)
            return plan
        self.move_to_end(key)
        if torch._C._get_tracing_state():
            # Pyro's JIT traces the step right after running it once on the same arguments
            # (to capture the parameters), which built or checked this plan; the compiled
            # graph never looks it up again, so a check here would be a second analysis of
            # the same program for nothing
            return plan
        uses = self._uses[key] = self._uses.get(key, 1) + 1
        if uses in self.check_at or (self.check_every and uses % self.check_every == 0):
            return self._check(key, owner, plan, build(), uses)
        return plan

    def _check(self, key: StructureKey, owner: Hashable, plan: Any, fresh: Any, uses: int) -> Any:
        """
        Compare a cached plan with a fresh analysis of this step. Equal decisions:
        the fresh plan is kept (its parents may be newer). Different decisions:
        something the key cannot see (a float used as a switch, state outside the
        arguments, data values in Python control flow) rewired the program, so
        the plan is stale; this model and guide are analysed every step from
        now on, and a :class:`StalePlanWarning` says so, since the steps since
        the last check may have used the stale plan.
        """
        self[key] = fresh
        (old, old_groups), (new, new_groups) = _decisions(plan), _decisions(fresh)
        if old == new and old_groups == new_groups:
            return fresh
        changed = sorted(n for n in set(old) | set(new) if old.get(n) != new.get(n))
        self._volatile.add(owner)
        last = max([c for c in self.check_at if c < uses] + [uses - self.check_every, 1])
        warnings.warn(
            f"the dependency structure changed between steps with an equal plan key "
            f"(the same sites, shapes and non-tensor arguments): the plan of site(s) "
            f"{', '.join(repr(n) for n in changed[:5])} changed, so the cached plan was stale "
            f"for up to {uses - last} step(s) since the last check. Something the key cannot "
            "see decides which sites feed which distributions: a float argument used as a "
            "switch, a mutable object or global state, or data values in Python control flow. "
            "From now on every step of this model and guide is analysed (slower). To keep the "
            "cache, pass the switch as a bool, int or str argument; to analyse every step "
            "without this warning, use plan_cache_size=0.",
            StalePlanWarning,
            stacklevel=2,
        )
        return fresh

    def clear(self) -> None:
        super().clear()
        self._uses.clear()
        self._volatile.clear()
        self._shapes_checked.clear()

    def __reduce__(self) -> tuple:
        return (type(self), (self.maxsize,))
