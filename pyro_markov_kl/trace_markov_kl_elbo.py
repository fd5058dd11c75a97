# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

from __future__ import annotations

import functools
import time
import warnings
import weakref
from typing import Any, Callable, Mapping, Optional, Tuple

import pyro.ops.jit
import torch
from pyro import poutine
from pyro.infer.trace_elbo import JitTrace_ELBO, Trace_ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_if_enumerated, check_model_guide_match, warn_if_nan

from .dependencies import analyse_dependencies, outside_jit_trace
from .guide_messenger import analyse_guide_messenger, guide_messenger_traces, is_guide_messenger
from .kl_rule import for_compiled_graph
from .plan import Plan, SiteRecord, build_plan
from .plan_cache import PlanCache
from .score_function import score_function_terms
from .sites import check_model_guide_sites, check_site_shapes
from .terms import elbo_terms, sum_terms


class TraceMarkovKL_ELBO(Trace_ELBO):
    r"""
    A trace implementation of ELBO-based SVI that uses the analytic KL
    divergence of every latent site, conditioned on the guide's sampled
    parents, wherever that is unbiased, and Monte Carlo everywhere else.

    For each latent site :math:`s` the estimator traces which sampled values
    flow into the guide's distribution :math:`q_s` and into the model's
    :math:`p_s` (the model run on the guide's samples), through any torch
    computation, and replaces the Monte Carlo term
    :math:`\log p_s(z_s) - \log q_s(z_s)` by
    :math:`-\mathrm{KL}(q_s(\cdot \mid \mathrm{pa}_q(s)) \,\|\,
    p_s(\cdot \mid \mathrm{pa}_p(s)))` exactly when no model parent of
    :math:`s` is a descendant of :math:`s` in the guide and a KL is available.
    This covers Markov guides such as :math:`q(z_t \mid z_{t-1}, x_{t:T})` for
    Deep Markov Models, where the per-step KL lowers gradient variance, and it
    falls back to Monte Carlo, never silently biased, on guides that run
    backward in time, sample a global variable from the locals, and the like.
    Unlike :class:`~pyro.infer.trace_mean_field_elbo.TraceMeanField_ELBO` it
    respects a model's and a guide's different scales and masks.

    The dependency analysis runs once per model/guide structure (site names,
    distribution types, shapes, plates, ``infer`` options) and is cached; see
    :meth:`explain` for the plan it produces. Per-site control uses Pyro's
    ``infer`` convention: ``infer={"kl": "mc"}`` forces Monte Carlo,
    ``infer={"kl": "analytic"}`` demands the KL and raises if it is
    unavailable or would be biased, ``"auto"`` (the default) decides.

    Example::

        svi = SVI(model, guide, optim, TraceMarkovKL_ELBO())
        print(TraceMarkovKL_ELBO().explain(model, guide, data))

    The constructor takes the arguments of
    :class:`~pyro.infer.trace_elbo.Trace_ELBO`, and:

    :param dict kl_rules: KL functions ``{(type_q, type_p): fn}`` used by this
        instance only, before torch's registry
        (:func:`torch.distributions.kl.register_kl`), also for the parts of
        ``Independent``, ``ExpandedDistribution`` and ``TransformedDistribution``
        distributions; torch's registry is not changed.
    :param int plan_cache_size: how many plans (one per structure) to keep;
        ``0`` analyses every step.
    :param bool leave_one_out_baseline: give every non-reparameterised site
        without an ``infer={"baseline": ...}`` of its own the leave-one-out
        baseline (the mean cost of the other elements of its plates, including
        the particles of ``vectorize_particles=True``) wherever that is
        unbiased; see :func:`~pyro_markov_kl.score_function.leave_one_out_baseline`.
        ``False`` gives TraceGraph_ELBO's default: no baseline.

    .. note:: The plan is reused for traces of equal structure, so the
        dependency structure must be a function of the trace structure: Python
        control flow on *data* that changes which latent sites feed which
        distributions, with the same sites and shapes, needs
        ``plan_cache_size=0``. Control flow on *sampled values* (``.item()``,
        ``bool()``) is detected and handled conservatively.

    References

    [1] Structured Inference Networks for Nonlinear State Space Models,
        Rahul G. Krishnan, Uri Shalit, David Sontag (AAAI 2017)

    [2] Auto-Encoding Variational Bayes, Diederik P. Kingma, Max Welling (ICLR 2014)
    """

    def __init__(
        self,
        *args: Any,
        kl_rules: Optional[Mapping[Tuple[type, type], Callable]] = None,
        plan_cache_size: int = 256,
        leave_one_out_baseline: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.kl_rules = dict(kl_rules or {})
        self.leave_one_out_baseline = leave_one_out_baseline
        #: The :class:`~pyro_markov_kl.plan_cache.PlanCache` of this instance: one
        #: :class:`~pyro_markov_kl.plan.Plan` per trace structure (``len``, ``clear()``).
        self.plan_cache = PlanCache(plan_cache_size)

    # --- traces ---------------------------------------------------------------
    def _get_unpruned_trace(self, model, guide, args, kwargs) -> Tuple[Trace, Trace]:
        """
        The guide's trace and the model's trace replayed on it, validated as
        :func:`~pyro.infer.enum.get_importance_trace` validates them, but with
        the subsample sites (the plan replays them) and without computing any
        log-density: the plan decides which sites need one.
        """
        if is_guide_messenger(guide):  # the guide runs the model: one run gives both traces
            model_trace, guide_trace = guide_messenger_traces(guide, args, kwargs)
        else:
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
        if is_validation_enabled():
            check_model_guide_sites(model_trace, guide_trace)  # errors that name the site first
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
            check_if_enumerated(guide_trace)
        return model_trace, guide_trace

    def _get_trace(self, model, guide, args, kwargs) -> Tuple[Trace, Trace]:
        """
        Returns a single trace from the guide, and the model that is run
        against it, with subsample sites pruned; the guide trace carries the
        plan of its structure as ``guide_trace.plan``.
        """
        return self._get_planned_trace(model, guide, args, kwargs, vectorized=False)

    def _get_vectorized_trace(self, model, guide, args, kwargs) -> Tuple[Trace, Trace]:
        # ELBO wraps the model and guide afresh on every call: the plan cache is keyed on the
        # caller's model and guide instead
        return self._get_planned_trace(model, guide, args, kwargs, vectorized=True)

    def _get_planned_trace(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, vectorized: bool
    ) -> Tuple[Trace, Trace]:
        traced_model, traced_guide = model, guide
        if vectorized:
            traced_model = self._vectorized_num_particles(model)
            traced_guide = self._vectorized_num_particles(guide)
        model_trace, guide_trace = self._get_unpruned_trace(
            traced_model, traced_guide, args, kwargs
        )
        # everything besides the program and its traces that a plan or the shape check reads
        owner = (
            model,
            guide,
            vectorized,
            self.leave_one_out_baseline,
            tuple(self.kl_rules.items()),
            self.max_plate_nesting,
        )
        build = functools.partial(
            self._build_plan, model, guide, args, kwargs, model_trace, guide_trace, vectorized
        )
        pruned_model_trace = prune_subsample_sites(model_trace)
        pruned_guide_trace = prune_subsample_sites(guide_trace)
        check_shapes = None
        if is_validation_enabled():
            check_shapes = functools.partial(
                check_site_shapes,
                (pruned_model_trace, pruned_guide_trace),
                self.max_plate_nesting,
            )
        plan = self.plan_cache.get_or_build(
            owner, args, kwargs, model_trace, guide_trace, build, check_shapes
        )
        pruned_guide_trace.plan = plan
        return pruned_model_trace, pruned_guide_trace

    # --- plans --------------------------------------------------------------------
    def _build_plan(
        self,
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
        model_trace: Trace,
        guide_trace: Trace,
        vectorized: bool,
    ) -> Plan:
        # Sampled values that reach Python (.item(), bool(), an assert) make every later site
        # depend on every earlier one (ProgramDependencies.unknown), with vectorize_particles=True
        # too: the particles are one trace, so they cannot differ in structure.
        with outside_jit_trace():
            if vectorized:  # a plate of its own, made outside any JIT trace
                model = self._vectorized_num_particles(model)
                guide = self._vectorized_num_particles(guide)
            if is_guide_messenger(guide):  # it runs the model itself
                guide_deps, model_deps = analyse_guide_messenger(guide, guide_trace, args, kwargs)
            else:
                guide_deps, model_deps = analyse_dependencies(
                    model, guide, guide_trace, args, kwargs
                )
        plan = build_plan(
            prune_subsample_sites(model_trace),
            prune_subsample_sites(guide_trace),
            guide_deps,
            model_deps,
            self.kl_rules,
            self.leave_one_out_baseline,
            check_sites=not is_validation_enabled(),  # else checked in _get_unpruned_trace
        )
        if is_validation_enabled():
            warn_guide_order(plan)
        return plan

    def explain(self, model: Callable, guide: Callable, *args, **kwargs) -> Plan:
        """
        Trace the model and guide once and return the estimator plan: for each
        latent site, ``estimator`` (``"analytic"`` or ``"mc"``), ``reason``,
        ``guide_parents``, ``model_parents`` and ``guide_descendants``.
        ``print(plan)`` shows it as a table. The same plan drives the loss.

        :returns: the :class:`~pyro_markov_kl.records.Plan`
        """
        with poutine.block():
            for _, guide_trace in self._get_traces(model, guide, args, kwargs):
                return guide_trace.plan
        raise ValueError("num_particles must be at least 1")

    # --- estimators ----------------------------------------------------------------
    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """
        :returns: an estimate of the negative ELBO
        :rtype: float

        Evaluates the ELBO with an estimator that uses ``num_particles`` samples.
        Like TraceGraph_ELBO's, it leaves the param store alone: no
        score-function term is formed, so no baseline is updated.
        """
        loss = 0.0
        with torch.no_grad():
            for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
                loss_particle, _ = self._differentiable_loss_particle(
                    model_trace, guide_trace, surrogate=False
                )
                loss += loss_particle / self.num_particles
        warn_if_nan(loss, "loss")
        return loss

    def _differentiable_loss_particle(
        self, model_trace: Trace, guide_trace: Trace, surrogate: bool = True
    ) -> Tuple[Any, Any]:
        """
        The loss and the surrogate loss of one particle, following the plan
        that :meth:`_get_trace` attached to ``guide_trace``: one term per site
        (:func:`~pyro_markov_kl.terms.elbo_terms`), summed, plus the
        score-function terms and baselines of the non-reparameterised sites
        (:func:`~pyro_markov_kl.score_function.score_function_terms`). With
        ``surrogate=False`` the surrogate loss is ``None`` and no score-function
        term or baseline is computed (baselines update their state in the
        param store).
        """
        plan = guide_trace.plan
        terms = elbo_terms(plan, model_trace, guide_trace)
        elbo_particle, surrogate_elbo_particle = sum_terms(terms)
        surrogate_loss = None
        if surrogate:
            score_elbo, baseline_loss = score_function_terms(plan, terms, guide_trace)
            surrogate_loss = -(surrogate_elbo_particle + score_elbo) + baseline_loss
        if torch.is_tensor(elbo_particle):
            loss = -(
                elbo_particle.detach()
                if torch._C._get_tracing_state()
                else torch_item(elbo_particle)
            )
        else:
            loss = -elbo_particle
        return loss, surrogate_loss

    # differentiable_loss() and loss_and_grads() are Trace_ELBO's: the particle loops over
    # _get_traces() and _differentiable_loss_particle()


class GuideOrderWarning(UserWarning):
    """
    A latent site uses Monte Carlo instead of the analytic KL because the guide
    samples one of its model parents after it, conditioned on it; see
    :func:`warn_guide_order`.
    """


def warn_guide_order(plan: Plan) -> None:
    """
    Under validation, once per plan: warn (:class:`GuideOrderWarning`) if the
    guide's order keeps a site from the analytic KL, the situation in which
    :class:`~pyro.infer.trace_mean_field_elbo.TraceMeanField_ELBO` warns
    ("Failed to verify mean field restriction on the guide") and is biased.
    The estimate stays unbiased (the site uses Monte Carlo).
    """

    def by_order(rec: SiteRecord) -> bool:
        late_parents = rec.model_parents & rec.guide_descendants
        return bool(late_parents) and not (
            rec.name in plan.model.unknown or any(p in plan.guide.unknown for p in late_parents)
        )  # not where a value reaching Python made the dependencies unknown

    late = [
        name
        for name, rec in plan.sites.items()
        if not rec.auxiliary and rec.estimator == "mc" and rec.override == "auto" and by_order(rec)
    ]
    if late:
        rec = plan.sites[late[0]]
        more = f" (and {len(late) - 1} more site(s))" if len(late) > 1 else ""
        warnings.warn(
            f"Failed to verify mean field restriction on the guide at site '{rec.name}'{more}: "
            f"{rec.reason}, so it uses Monte Carlo, not the analytic KL (unbiased either way). "
            "To eliminate this warning, sample the model's parents of a site before it in the "
            "guide, without conditioning them on it (the model's order), or set "
            "infer={'kl': 'mc'} on the site",
            GuideOrderWarning,
            stacklevel=2,
        )


def _arg_shapes(args: Any) -> tuple:
    """
    The shapes of the tensors in (nested tuples of) ``args``, e.g. a
    ``PackedSequence``, each with the dimensions it is broadcast along (stride
    0, size above 1): a compiled graph bakes in decisions made on both (a mask
    expanded along an event dimension is folded into a per-site factor by its
    strides, which a mask that varies there must not be).
    """
    if torch.is_tensor(args):
        broadcast = ()
        if args.layout == torch.strided:
            broadcast = tuple(
                d for d, (n, st) in enumerate(zip(args.shape, args.stride())) if st == 0 and n > 1
            )
        return tuple(args.shape), broadcast
    if isinstance(args, (tuple, list)):
        return tuple(_arg_shapes(a) for a in args)
    return ()


class CompiledGraphs:
    """
    The compiled graphs of a JIT twin, one :func:`pyro.ops.jit.trace` function
    per model/guide pair, each holding a graph per number of arguments, set of
    ``**kwargs`` and set of tensor argument shapes (with their broadcast
    dimensions); they are dropped on pickling and rebuilt on demand.
    """

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_compiled", None)
        return state

    def _build_plan(self, *args: Any, **kwargs: Any) -> Any:
        # a graph's plan is reused for other values of the same shapes: no rule may hold only
        # for the current values (the eager plan cache keys on such value conditions instead)
        with for_compiled_graph():
            return super()._build_plan(*args, **kwargs)

    @property
    def num_compiled(self) -> int:
        """The number of graphs compiled so far, over all model/guide pairs."""
        return sum(len(f.compiled) for f in self.__dict__.get("_compiled", {}).values())

    @property
    def compile_seconds(self) -> float:
        """
        The wall time of the calls that compiled a graph (each traces the
        program, analyses it on a plan-cache miss, compiles and runs once).
        """
        return self.__dict__.get("_compile_seconds", 0.0)

    def _call_compiled(
        self, model: Callable, guide: Callable, make_compiled: Callable[[], Callable], args, kwargs
    ) -> Any:
        compiled = self.__dict__.setdefault("_compiled", {})
        key = (model, guide)  # bound methods compare equal across attribute lookups
        if key not in compiled:
            compiled[key] = make_compiled()
        # Pyro's compiler keys on len(args) and kwargs; the argument shapes decide the
        # structure (e.g. the sequence length), so a new shape must compile a new graph, and
        # so must a new set of broadcast dimensions
        count = self.num_compiled
        start = time.perf_counter()
        result = compiled[key](*args, _pmkl_arg_shapes=_arg_shapes(args), **kwargs)
        if self.num_compiled > count:
            self._compile_seconds = self.compile_seconds + time.perf_counter() - start
        return result


class JitTraceMarkovKL_ELBO(CompiledGraphs, TraceMarkovKL_ELBO, JitTrace_ELBO):
    """
    Like :class:`TraceMarkovKL_ELBO` but uses :func:`pyro.ops.jit.trace` to
    compile the loss and surrogate loss, as
    :class:`~pyro.infer.trace_elbo.JitTrace_ELBO` does for
    :class:`~pyro.infer.trace_elbo.Trace_ELBO` (whose ``differentiable_loss``
    and ``loss_and_grads`` it inherits), once per model/guide pair and per
    set of non-tensor arguments and tensor argument shapes (with the dimensions
    each is broadcast along).

    The dependency analysis runs eagerly, before compilation, on the first
    call (Pyro's compiler first runs the function once to capture parameters),
    so the compiled graph contains only the ELBO's own computation; the plan
    is then fixed for that graph. ``loss()`` is :class:`TraceMarkovKL_ELBO`'s,
    eager, as JitTrace_ELBO's is Trace_ELBO's. The restrictions of
    JitTrace_ELBO apply:

    -   Models must have static structure given the shapes of their tensor
        arguments: a graph is compiled for each model/guide pair, number of
        arguments, set of ``**kwargs`` and set of argument shapes (so a new
        sequence length compiles a new graph, with its own plan) and of the
        dimensions each argument is broadcast along (an expanded mask is not a
        mask that varies), and reused for every call that matches
        (:attr:`num_compiled` counts them).
    -   Arguments must be tensors or (nested) tuples of tensors for
        :func:`torch.jit.trace`: a ``PackedSequence`` whose index fields are
        ``None`` (as the DMM example passes) cannot be traced.
    -   Models must not depend on any global data (except the param store).
    -   All model inputs that are tensors must be passed in via ``*args``.
    -   All model inputs that are *not* tensors must be passed in via
        ``**kwargs``, and compilation will be triggered once per unique
        ``**kwargs`` (so a KL annealing factor that changes every step should
        be passed as a tensor in ``*args``).
    """

    def loss_and_surrogate_loss(self, model: Callable, guide: Callable, *args, **kwargs):
        """:returns: the loss and the surrogate loss, as tensors"""

        def make_compiled() -> Callable:
            weakself = weakref.ref(self)

            @pyro.ops.jit.trace(
                ignore_warnings=self.ignore_jit_warnings, jit_options=self.jit_options
            )
            def loss_and_surrogate_loss(*args, **kwargs):
                kwargs.pop("_pmkl_arg_shapes")
                self = weakself()
                loss = 0.0
                surrogate_loss = 0.0
                for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
                    loss_particle, surrogate_particle = self._differentiable_loss_particle(
                        model_trace, guide_trace
                    )
                    loss = loss + loss_particle / self.num_particles
                    surrogate_loss = surrogate_loss + surrogate_particle / self.num_particles
                return loss, surrogate_loss

            return loss_and_surrogate_loss

        return self._call_compiled(model, guide, make_compiled, args, kwargs)

    # loss() is TraceMarkovKL_ELBO's, eager, as JitTrace_ELBO's is Trace_ELBO's: it forms no
    # score-function terms, so it updates no baseline in the param store


__all__ = ["CompiledGraphs", "GuideOrderWarning", "JitTraceMarkovKL_ELBO", "TraceMarkovKL_ELBO"]
