# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""Dependency-aware per-step analytic KL for Pyro's ELBO family."""

__version__ = "0.1.0"

from .kl import (
    KLDivergenceError,
    KLRule,
    compute_kl,
    find_kl_rule,
    isolated_kl_registry,
    kl_divergence,
    register_kl,
)
from .plan import Plan, SiteRecord
from .trace_markov_kl_elbo import JitTraceMarkovKL_ELBO, TraceMarkovKL_ELBO

__all__ = [
    "JitTraceMarkovKL_ELBO",
    "KLDivergenceError",
    "KLRule",
    "Plan",
    "SiteRecord",
    "TraceMarkovKL_ELBO",
    "compute_kl",
    "find_kl_rule",
    "isolated_kl_registry",
    "kl_divergence",
    "register_kl",
]
