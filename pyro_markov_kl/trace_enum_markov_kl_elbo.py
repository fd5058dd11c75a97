# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

r"""
Discrete enumeration alongside the analytic KL.

:class:`~pyro.infer.traceenum_elbo.TraceEnum_ELBO` computes, for one sample
:math:`z \sim q` of the guide's non-enumerated sites,

.. math::

    \mathcal{L} = \sum_t \mathbb{E}_{\hat q}\Big[\sum_{c \in \mathrm{costs}_t} c\Big],
    \qquad \mathrm{costs} = \{\log \textstyle\sum_{k} p(k, \cdot)\} \cup
    \{f_p \log p_s\}_{s} \cup \{-f_q \log q_s\}_{s},

where the sites :math:`k` enumerated in the model are summed out inside the
logarithm of the factors that involve them (a sum-product contraction), every
other model site contributes :math:`f_p \log p_s` and every guide site
:math:`-f_q \log q_s`, and :math:`\mathbb{E}_{\hat q}` weights each cost by the
exact probabilities of the sites enumerated in the guide and by DiCE factors
of the non-reparameterised sampled guide sites (:class:`pyro.infer.util.Dice`).

For a latent site :math:`s` sampled (not enumerated) in the guide whose model
factor :math:`p_s` involves no site enumerated in the model, the two costs
:math:`f_p \log p_s(z_s) - f_q \log q_s(z_s)` are linear terms of the ELBO, and
by the argument of :mod:`pyro_markov_kl.plan` (no model parent of :math:`s` is
a guide descendant of :math:`s`) their expectation given the guide's parents of
:math:`s`, whether those were sampled or enumerated, is

.. math::

    -f_p\,\mathrm{KL}\big(q_s(\cdot \mid \mathrm{pa}_q(s)) \,\|\,
    p_s(\cdot \mid \mathrm{pa}_p(s))\big) - (f_p - f_q)\,\mathrm{H}(q_s)

(:mod:`pyro_markov_kl.terms`). :class:`TraceEnumMarkovKL_ELBO` substitutes it
inside TraceEnum_ELBO's own computation: the model site's packed ``log_prob``
becomes :math:`-f_p(\mathrm{KL} + \mathrm{H})` (or :math:`-f_p\,\mathrm{KL}`
where the factors agree) and the guide site's becomes
:math:`-f_q\,\mathrm{H}` (or zero), with the sites' own plate and enumeration
dimensions. Where :math:`q_s` depends on a site enumerated in the guide the
KL carries that enumeration dimension, and the weighting by the guide's
enumerated probabilities makes its expectation exact. Everything else (the
enumerated sums, the DiCE weights, plates, ``pyro.markov`` contraction, which
stays linear in the length of the chain) is TraceEnum_ELBO's.

A site whose model factor carries the dimension of a model-enumerated site
:math:`k` enters the sum-product as :math:`\log \sum_k p(k)\,p_s(z_s \mid k)`,
which no KL of :math:`q_s` replaces: it keeps the Monte Carlo term.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

import pyro.ops.jit
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask, sum_rightmost
from pyro.infer.traceenum_elbo import TraceEnum_ELBO, _compute_dice_elbo
from pyro.ops import packed
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from pyro.util import warn_if_nan

from .dependencies import analyse_dependencies, outside_jit_trace
from .enum_plan import EnumPlan, build_enum_plan
from .kl import KLRule, compute_kl
from .plan import Plan
from .plan_cache import PlanCache
from .sites import has_mask, same_factor, site_factors
from .trace_markov_kl_elbo import CompiledGraphs

__all__ = [
    "EnumPlan",
    "JitTraceEnumMarkovKL_ELBO",
    "TraceEnumMarkovKL_ELBO",
    "build_enum_plan",
    "enum_analytic_parts",
]


# --- the substitution ---------------------------------------------------------------------------
_KEEP = object()


def enum_analytic_parts(
    name: str, model_site: Dict[str, Any], guide_site: Dict[str, Any], rule: KLRule
) -> Optional[Tuple[torch.Tensor, Any]]:
    r"""
    The replacements of one analytic site's two costs, unpacked and not summed:
    the model's :math:`-f_p(\mathrm{KL} + \mathrm{H})` and the guide's
    ``log_prob`` slot :math:`-f_q\,\mathrm{H}` (TraceEnum_ELBO's guide cost is
    minus that slot), so that their sum is
    :math:`-f_p\,\mathrm{KL} - (f_p - f_q)\,\mathrm{H}`. Where the factors and
    shapes agree they are :math:`-f_p\,\mathrm{KL}` and ``None`` (zero). Where
    ``q.entropy()`` is not implemented :math:`\mathrm{H}` is estimated by
    :math:`-\log q(z)` at the sample and the guide's slot is kept (returned as
    a sentinel, ``_KEEP``).

    :returns: ``(model_value, guide_value)``, or ``None`` where a ``.mask()``
        varies inside the event in this trace (the plan was made on a mask
        that did not): the site then keeps TraceEnum_ELBO's Monte Carlo costs
    """
    q, p, scale_q, mask_q, scale_p, mask_p, k = site_factors(model_site, guide_site)
    if has_mask(q) or has_mask(p):
        return None
    kl = compute_kl(name, q, p, rule)
    if kl.shape == q.batch_shape and same_factor(scale_p, mask_p, scale_q, mask_q):
        return sum_rightmost(-scale_and_mask(kl, scale_p, mask_p), k), None
    guide_value: Any
    try:
        entropy = q.entropy()
        guide_value = sum_rightmost(-scale_and_mask(entropy, scale_q, mask_q), k)
    except NotImplementedError:
        entropy = -q.log_prob(guide_site["value"])
        guide_value = _KEEP
    return sum_rightmost(-scale_and_mask(kl + entropy, scale_p, mask_p), k), guide_value


def _pack_like(value: torch.Tensor, site: Dict[str, Any], name: str) -> torch.Tensor:
    """
    Pack ``value`` with the symbols of ``site``'s packed ``log_prob`` (read off
    its unpacked and packed forms), then of its ``_dim_to_symbol``.
    """
    ref, ref_packed = site["log_prob"], site["packed"]["log_prob"]
    dim_to_symbol = dict(site["infer"].get("_dim_to_symbol", {}))
    if torch.is_tensor(ref):
        symbols = iter(getattr(ref_packed, "_pyro_dims", ""))
        n = ref.dim()
        for i, size in enumerate(ref.shape):
            if size > 1:
                dim_to_symbol[i - n] = next(symbols)
    try:
        return packed.pack(value, dim_to_symbol)
    except ValueError as e:
        raise ValueError(
            f"site '{name}': the analytic term of shape {tuple(value.shape)} does not fit the "
            f"site's log_prob of shape {tuple(getattr(ref, 'shape', ()))}"
        ) from e


def _zeros_like_packed(x: Any) -> torch.Tensor:
    if not torch.is_tensor(x):
        zero = torch.zeros(())
        zero._pyro_dims = ""  # type: ignore[attr-defined]
        return zero
    zero = x.new_zeros(()).expand(x.shape)
    zero._pyro_dims = x._pyro_dims  # type: ignore[attr-defined]
    return zero


def apply_plan(plan: Plan, model_trace: Trace, guide_trace: Trace) -> None:
    """
    Substitute the analytic terms of ``plan`` into a pair of packed traces
    in place (see the module docstring).
    """
    for name in plan.analytic_sites():
        rule = plan.sites[name].kl_rule
        model_site, guide_site = model_trace.nodes[name], guide_trace.nodes[name]
        parts = enum_analytic_parts(name, model_site, guide_site, rule)
        if parts is None:
            continue
        model_value, guide_value = parts
        model_site["packed"]["log_prob"] = _pack_like(model_value, model_site, name)
        if guide_value is _KEEP:
            continue
        gpacked = guide_site["packed"]
        if guide_value is None:
            new = _zeros_like_packed(gpacked["log_prob"])
        else:
            new = _pack_like(guide_value, guide_site, name)
        gpacked["log_prob"] = new
        if "score_parts" in gpacked:
            gpacked["score_parts"] = gpacked["score_parts"]._replace(log_prob=new)


# --- the ELBO -----------------------------------------------------------------------------------
class _SubsampleRecorder(Messenger):
    """
    Keeps the subsample sites of the latest run of the guide it wraps, which
    TraceEnum_ELBO's traces no longer have, so that the dependency analysis can
    replay the guide's subsamples in the model (a plate the guide subsamples
    and the model declares in full).
    """

    def __init__(self) -> None:
        super().__init__()
        self.sites: Dict[str, dict] = {}

    def __enter__(self) -> _SubsampleRecorder:
        self.sites = {}  # a new run of the guide
        return super().__enter__()

    def _pyro_post_sample(self, msg: dict) -> None:
        if site_is_subsample(msg):
            self.sites[msg["name"]] = dict(msg, infer=dict(msg["infer"]))


class TraceEnumMarkovKL_ELBO(TraceEnum_ELBO):
    r"""
    :class:`~pyro.infer.traceenum_elbo.TraceEnum_ELBO` with the per-site
    analytic KL of :class:`~pyro_markov_kl.TraceMarkovKL_ELBO`.

    Sites marked ``infer={"enumerate": "parallel"}`` (or ``"sequential"`` in
    the guide) are marginalised exactly as TraceEnum_ELBO does, in the model
    and in the guide, with ``max_plate_nesting`` and ``pyro.markov``. For a
    latent site :math:`s` sampled in the guide, the Monte Carlo term
    :math:`f_p \log p_s - f_q \log q_s` is replaced by

    .. math::

        -f_p\,\mathrm{KL}\big(q_s(\cdot \mid \mathrm{pa}_q(s)) \,\|\,
        p_s(\cdot \mid \mathrm{pa}_p(s))\big) - (f_p - f_q)\,\mathrm{H}(q_s)

    iff its model factor involves no site enumerated in the model, the guide
    reparameterises it, no model parent of :math:`s` is a guide descendant of
    :math:`s`, and a KL rule applies; see
    :func:`~pyro_markov_kl.enum_plan.build_enum_plan` and
    :meth:`explain`. A KL that depends on a site enumerated in the guide keeps
    that enumeration dimension and is averaged under the guide's enumerated
    probabilities, which is exact. The dependency analysis runs once per
    model/guide structure and is cached.

    The constructor takes the arguments of TraceEnum_ELBO, and:

    :param dict kl_rules: KL functions ``{(type_q, type_p): fn}`` used by this
        instance only, before torch's registry
        (:func:`torch.distributions.kl.register_kl`), also for the parts of
        ``Independent``, ``ExpandedDistribution`` and ``TransformedDistribution``
        distributions; torch's registry is not changed.
    :param int plan_cache_size: how many plans (one per structure) to keep;
        ``0`` analyses every step.

    Example::

        elbo = TraceEnumMarkovKL_ELBO(max_plate_nesting=1)
        print(elbo.explain(model, guide, data))
        svi = SVI(model, guide, optim, elbo)
    """

    def __init__(
        self,
        *args: Any,
        kl_rules: Optional[Mapping[Tuple[type, type], Callable]] = None,
        plan_cache_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.kl_rules = dict(kl_rules or {})
        #: The :class:`~pyro_markov_kl.plan_cache.PlanCache` of this instance.
        self.plan_cache = PlanCache(plan_cache_size)

    def _get_traces_and_plans(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> Iterator[Tuple[Trace, Trace, EnumPlan]]:
        # TraceEnum_ELBO prunes the subsample sites, which the analysis must replay
        subsamples = _SubsampleRecorder()
        traces = super()._get_traces(model, subsamples(guide), args, kwargs)
        for model_trace, guide_trace in traces:
            owner = (
                model,
                guide,
                self.vectorize_particles,
                self.num_particles,
                self.max_plate_nesting,
                tuple(self.kl_rules.items()),
            )
            plan = self.plan_cache.get_or_build(
                owner,
                args,
                kwargs,
                model_trace,
                guide_trace,
                functools.partial(
                    self._build_plan,
                    model,
                    guide,
                    args,
                    kwargs,
                    model_trace,
                    guide_trace,
                    subsamples.sites,
                ),
            )
            apply_plan(plan, model_trace, guide_trace)
            yield model_trace, guide_trace, plan

    def _get_traces(self, model, guide, args, kwargs):
        for model_trace, guide_trace, _ in self._get_traces_and_plans(model, guide, args, kwargs):
            yield model_trace, guide_trace

    def _build_plan(
        self,
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
        model_trace: Trace,
        guide_trace: Trace,
        subsample_sites: Mapping[str, dict],
    ) -> EnumPlan:
        # the same enumeration as TraceEnum_ELBO._get_traces, on a private copy of the
        # guide trace (replay shares the guide's infer dicts with the model)
        replay_trace = Trace()
        for name, site in subsample_sites.items():  # the guide's subsamples of this trace
            replay_trace.add_node(name, **site)
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample":
                replay_trace.add_node(name, **dict(site, infer=dict(site["infer"])))
        with outside_jit_trace():  # handlers of its own, made outside any JIT trace
            if self.vectorize_particles:
                model = self._vectorized_num_particles(model)
                guide = self._vectorized_num_particles(guide)
            guide = EnumMessenger(first_available_dim=-1 - self.max_plate_nesting)(guide)
            model = EnumMessenger()(model)
            guide_deps, model_deps = analyse_dependencies(model, guide, replay_trace, args, kwargs)
        return build_enum_plan(model_trace, guide_trace, guide_deps, model_deps, self.kl_rules)

    def explain(self, model: Callable, guide: Callable, *args, **kwargs) -> EnumPlan:
        """
        Trace the model and guide once and return the estimator plan: for each
        latent site, ``estimator`` (``"analytic"``, ``"mc"`` or ``"enum"``),
        ``reason``, ``guide_parents``, ``model_parents`` (including sites
        enumerated in the model) and ``guide_descendants``; ``print(plan)``
        shows it as a table. The same plan drives the loss.

        :returns: the :class:`~pyro_markov_kl.enum_plan.EnumPlan`
        """
        with poutine.block():
            for _, _, plan in self._get_traces_and_plans(model, guide, args, kwargs):
                return plan
        raise ValueError("num_particles must be at least 1")


class JitTraceEnumMarkovKL_ELBO(CompiledGraphs, TraceEnumMarkovKL_ELBO):
    """
    Like :class:`TraceEnumMarkovKL_ELBO` but uses :func:`pyro.ops.jit.trace`
    to compile the loss, as :class:`~pyro.infer.traceenum_elbo.JitTraceEnum_ELBO`
    does for :class:`~pyro.infer.traceenum_elbo.TraceEnum_ELBO` (e.g. for
    Pyro's ``examples/hmm.py --jit``).

    As for :class:`~pyro_markov_kl.JitTraceMarkovKL_ELBO`, the dependency
    analysis runs eagerly on the first call (Pyro's compiler first runs the
    function once to capture parameters) and its plan is found again by the
    traced run, so the compiled graph holds only the ELBO's own computation.
    A graph is compiled once per model/guide pair, number of arguments, set of
    ``**kwargs`` and set of tensor argument shapes (with their broadcast
    dimensions), and reused for every call that matches. The restrictions of
    JitTraceEnum_ELBO apply: static model structure given those, no global
    data except the param store, tensors in ``*args``, everything else in
    ``**kwargs``.
    """

    def _compiled_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        def make_compiled() -> Callable:
            weakself = weakref.ref(self)

            @pyro.ops.jit.trace(
                ignore_warnings=self.ignore_jit_warnings, jit_options=self.jit_options
            )
            def differentiable_loss(*args, **kwargs):
                kwargs.pop("_pmkl_arg_shapes")
                self = weakself()
                elbo = 0.0
                for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
                    elbo = elbo + _compute_dice_elbo(model_trace, guide_trace)
                return elbo * (-1.0 / self.num_particles)

            return differentiable_loss

        return self._call_compiled(model, guide, make_compiled, args, kwargs)

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs):
        """:returns: a differentiable estimate of the negative ELBO, from the compiled graph"""
        loss = self._compiled_loss(model, guide, *args, **kwargs)
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """:returns: an estimate of the negative ELBO; backpropagates its surrogate"""
        differentiable_loss = self.differentiable_loss(model, guide, *args, **kwargs)
        differentiable_loss.backward()
        loss = differentiable_loss.item()
        warn_if_nan(loss, "loss")
        return loss

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """:returns: an estimate of the negative ELBO, from the compiled graph"""
        with torch.no_grad():
            loss = self._compiled_loss(model, guide, *args, **kwargs).item()
        warn_if_nan(loss, "loss")
        return loss
