# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""Dependency-aware per-step analytic KL for Pyro's ELBO family."""

__version__ = "0.1.0"

from .compare import ELBOComparison, compare_elbos
from .kl import KLDivergenceError, KLRule, compute_kl, find_kl_rule
from .records import Plan, SiteRecord
from .trace_enum_markov_kl_elbo import EnumPlan, JitTraceEnumMarkovKL_ELBO, TraceEnumMarkovKL_ELBO
from .trace_markov_kl_elbo import GuideOrderWarning, JitTraceMarkovKL_ELBO, TraceMarkovKL_ELBO

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
