# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""The per-ELBO cache of estimator plans, one per model/guide structure."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import types
from collections import OrderedDict
from typing import Any, Callable, Hashable, List

import numpy as np
import torch
from pyro.poutine.trace_struct import Trace
from pyro.util import ignore_jit_warnings

from .kl import registry_version
from .plan import StructureKey, structure_key

# non-tensor arguments whose value may steer the program's control flow, keyed by value
_SWITCHES = (bool, int, str, bytes, type(None), enum.Enum, type)


def argument_key(args: tuple, kwargs: dict) -> tuple:
    """
    A hashable summary of the non-tensor arguments of a model/guide call that
    may change its dependency structure without changing its trace structure
    (``guide(data, backward=True)``): flags, integers, strings, enums and types
    by value, through tuples, lists, dicts and simple namespaces (including
    ``argparse.Namespace`` and dataclasses). Tensors and numpy arrays count by
    shape only (their shapes are also in the traces), floats by type only (a
    float argument is taken to be a number the program computes with, such as
    a KL annealing factor, not a switch), other objects by identity.
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
        elif isinstance(x, (argparse.Namespace, types.SimpleNamespace)) or (
            dataclasses.is_dataclass(x) and not isinstance(x, type)
        ):
            fields = vars(x) if hasattr(x, "__dict__") else dataclasses.asdict(x)
            key.append((type(x), tuple(fields)))
            stack.extend(reversed(list(fields.values())))
        else:
            key.append((type(x), id(x)))
    return tuple(key)


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
    (:func:`~pyro_markov_kl.plan.structure_key`, which also holds the value
    conditions a KL rule was chosen on, such as equal transforms).

    :param int maxsize: the most plans kept
    """

    def __init__(self, maxsize: int = 256) -> None:
        super().__init__()
        self.maxsize = maxsize

    def get_or_build(
        self,
        owner: Hashable,
        args: tuple,
        kwargs: dict,
        model_trace: Trace,
        guide_trace: Trace,
        build: Callable[[], Any],
    ) -> Any:
        """
        The plan for this step, built by ``build()`` (and kept) if there is none.

        :param owner: the model/guide pair and every ELBO setting the plan reads
        :param args: the positional arguments of the step
        :param kwargs: the keyword arguments of the step
        """
        # under Pyro's JIT sizes are traced tensors; reading them is intended (a compiled
        # graph has one structure) and must not warn: a TracerWarning raised as an error
        # inside torch's __int__ surfaces as SystemError
        with ignore_jit_warnings():
            key = StructureKey(
                (
                    owner,
                    registry_version(),
                    argument_key(args, kwargs),
                    structure_key(model_trace, guide_trace),
                )
            )
        plan = self.get(key)
        if plan is not None:
            self.move_to_end(key)
            return plan
        plan = build()
        if self.maxsize > 0:
            self[key] = plan
            while len(self) > self.maxsize:
                self.popitem(last=False)
        return plan

    def __reduce__(self) -> tuple:
        return (type(self), (self.maxsize,))
