# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""The per-ELBO cache of estimator plans, one per model/guide structure."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

from pyro.poutine.trace_struct import Trace
from pyro.util import ignore_jit_warnings

from .kl import registry_version
from .plan import StructureKey, structure_key


class PlanCache(OrderedDict):
    """
    A least-recently-used mapping from structure keys to plans, holding at most
    ``maxsize`` plans (``0``: none, every step is analysed). It belongs to one
    ELBO instance, so each process of a distributed run has its own. It is not
    pickled with the ELBO: plans hold KL rules that need not pickle, and are
    rebuilt on demand.

    :param int maxsize: the most plans kept
    """

    def __init__(self, maxsize: int = 256) -> None:
        super().__init__()
        self.maxsize = maxsize

    def get_or_build(
        self, owner: Any, model_trace: Trace, guide_trace: Trace, build: Callable[[], Any]
    ) -> Any:
        """
        The plan for the structure of ``model_trace`` and ``guide_trace`` under
        ``owner`` (the model/guide pair and the options that change traces),
        built by ``build()`` (and kept) if there is none. The key also holds
        the KL registries' version, so a new registration is seen.
        """
        # under Pyro's JIT sizes are traced tensors; reading them is intended (a compiled
        # graph has one structure) and must not warn: a TracerWarning raised as an error
        # inside torch's __int__ surfaces as SystemError
        with ignore_jit_warnings():
            skey = structure_key(model_trace, guide_trace)
        key = StructureKey((owner, registry_version(), skey))
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
