# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""Dependency-aware per-step analytic KL for Pyro's ELBO family."""

__version__ = "0.1.0"

from .kl import KLDivergenceError, KLRule, compute_kl, find_kl_rule
from .plan import Plan, SiteRecord
from .trace_enum_markov_kl_elbo import EnumPlan, JitTraceEnumMarkovKL_ELBO, TraceEnumMarkovKL_ELBO
from .trace_markov_kl_elbo import GuideOrderWarning, JitTraceMarkovKL_ELBO, TraceMarkovKL_ELBO


def __getattr__(name: str):
    # compare is imported lazily: ``python -m pyro_markov_kl.compare`` runs it as __main__
    if name in ("compare_elbos", "ELBOComparison"):
        from . import compare

        return getattr(compare, name)
    raise AttributeError(f"module 'pyro_markov_kl' has no attribute {name!r}")


__all__ = [
    "ELBOComparison",
    "EnumPlan",
    "GuideOrderWarning",
    "JitTraceEnumMarkovKL_ELBO",
    "JitTraceMarkovKL_ELBO",
    "KLDivergenceError",
    "KLRule",
    "Plan",
    "SiteRecord",
    "TraceEnumMarkovKL_ELBO",
    "TraceMarkovKL_ELBO",
    "compare_elbos",
    "compute_kl",
    "find_kl_rule",
]
