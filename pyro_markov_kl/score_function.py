# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

r"""
Score-function (REINFORCE) terms for non-reparameterised guide sites, with
analytic KL terms among the costs.

For a non-reparameterised guide site :math:`k` the surrogate ELBO gains

.. math::

    \log q_k(z_k)\,\big(C_k - b_k\big)_{\text{detached}},
    \qquad C_k = \sum_{t \in \mathrm{downstream}(k)} \ell_t,

where :math:`\ell_t` is either :math:`\log p_t - \log q_t` at the sample or,
where the plan allows it, :math:`-\mathrm{KL}_t` conditioned on the sampled
parents, and :math:`b_k` an optional baseline. By the tower property the
score term only needs :math:`\mathbb{E}[C_k \mid z_k, \text{ancestors}]`, and
where the substitution is valid
:math:`-\mathrm{KL}_t(\mathrm{pa}) = \mathbb{E}[\log p_t - \log q_t \mid \mathrm{pa}]`,
so the analytic term may stand in :math:`C_k`, with less variance. Terms that
do not depend on :math:`z_k` are left out (Rao-Blackwellisation), and terms in
plates are summed down to :math:`k`'s plates, as in
:class:`~pyro.infer.tracegraph_elbo.TraceGraph_ELBO`, whose baseline options
(``infer={"baseline": {...}}``) are accepted unchanged.

References

[1] Gradient Estimation Using Stochastic Computation Graphs,
    John Schulman, Nicolas Heess, Theophane Weber, Pieter Abbeel (NeurIPS 2015)

[2] Neural Variational Inference and Learning in Belief Networks,
    Andriy Mnih, Karol Gregor (ICML 2014)
"""

from __future__ import annotations

from typing import Any, List, Tuple

from pyro.infer.tracegraph_elbo import _construct_baseline
from pyro.infer.util import MultiFrameTensor
from pyro.poutine.trace_struct import Trace

from .plan import Plan
from .terms import Term


def score_function_terms(plan: Plan, terms: List[Term], guide_trace: Trace) -> Tuple[Any, Any]:
    """
    :returns: the score-function part of the surrogate ELBO and the baselines'
        loss, both ``0.0`` when every guide site is reparameterised
    """
    surrogate_elbo: Any = 0.0
    baseline_loss: Any = 0.0
    names = plan.score_function_sites()
    if not names:
        return surrogate_elbo, baseline_loss
    by_name = {term.name: term for term in terms}
    for name in names:
        downstream = plan.sites[name].downstream
        if not downstream:
            continue  # nothing depends on z_k: its score term is zero
        site = guide_trace.nodes[name]
        cost = MultiFrameTensor(
            *((by_name[t].frames, by_name[t].value) for t in downstream)
        ).sum_to(site["cond_indep_stack"])
        use_baseline, baseline_loss_term, baseline = _construct_baseline(name, site, cost)
        if use_baseline:
            cost = cost - baseline
            baseline_loss = baseline_loss + baseline_loss_term
        score_function = site["fn"].log_prob(site["value"])
        surrogate_elbo = surrogate_elbo + (score_function * cost.detach()).sum()
    return surrogate_elbo, baseline_loss
