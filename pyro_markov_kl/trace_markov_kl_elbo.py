# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

from __future__ import annotations

import functools
import warnings
import weakref
from typing import Any, Callable, Iterator, Mapping, Optional, Tuple

import pyro.ops.jit
import torch
from pyro import poutine
from pyro.infer.elbo import ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_if_enumerated, check_model_guide_match, check_site_shape, warn_if_nan

from .dependencies import analyse_dependencies, outside_jit_trace
from .guide_messenger import analyse_guide_messenger, guide_messenger_traces, is_guide_messenger
from .plan import Plan, SiteRecord, build_plan, check_model_guide_sites
from .plan_cache import PlanCache
from .score_function import score_function_terms
from .terms import elbo_terms, sum_terms


class TraceMarkovKL_ELBO(ELBO):
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
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        max_iarange_nesting: Optional[int] = None,
        vectorize_particles: bool = False,
        strict_enumeration_warning: bool = True,
        ignore_jit_warnings: bool = False,
        jit_options: Optional[dict] = None,
        retain_graph: Optional[bool] = None,
        tail_adaptive_beta: float = -1.0,
        *,
        kl_rules: Optional[Mapping[Tuple[type, type], Callable]] = None,
        plan_cache_size: int = 256,
        leave_one_out_baseline: bool = True,
    ) -> None:
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            max_iarange_nesting=max_iarange_nesting,
            vectorize_particles=vectorize_particles,
            strict_enumeration_warning=strict_enumeration_warning,
            ignore_jit_warnings=ignore_jit_warnings,
            jit_options=jit_options,
            retain_graph=retain_graph,
            tail_adaptive_beta=tail_adaptive_beta,
        )
        self.kl_rules = dict(kl_rules or {})
        self.leave_one_out_baseline = leave_one_out_baseline
        self._plans = PlanCache(plan_cache_size)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_compiled", None)  # compiled graphs are rebuilt on demand
        return state

    # --- traces ---------------------------------------------------------------
    def _get_unpruned_trace(self, model, guide, args, kwargs) -> Tuple[Trace, Trace]:
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
        against it, with subsample sites pruned.
        """
        model_trace, guide_trace = self._get_unpruned_trace(model, guide, args, kwargs)
        return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)

    def _get_traces_and_plans(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> Iterator[Tuple[Trace, Trace, Plan]]:
        # everything besides the program and its traces that a plan reads
        owner = (
            model,
            guide,
            self.vectorize_particles,
            self.leave_one_out_baseline,
            tuple(self.kl_rules.items()),
        )
        build = functools.partial(self._build_plan, model, guide, args, kwargs)
        if self.vectorize_particles:
            if self.max_plate_nesting == float("inf"):
                self._guess_max_plate_nesting(model, guide, args, kwargs)
            model = self._vectorized_num_particles(model)
            guide = self._vectorized_num_particles(guide)
            num_traces = 1
        else:
            num_traces = self.num_particles
        for _ in range(num_traces):
            model_trace, guide_trace = self._get_unpruned_trace(model, guide, args, kwargs)
            plan = self._plans.get_or_build(
                owner,
                args,
                kwargs,
                model_trace,
                guide_trace,
                functools.partial(build, model_trace, guide_trace),
            )
            model_trace = prune_subsample_sites(model_trace)
            guide_trace = prune_subsample_sites(guide_trace)
            if is_validation_enabled():
                for trace in (model_trace, guide_trace):
                    check_site_shapes(trace, self.max_plate_nesting)
            yield model_trace, guide_trace, plan

    # --- plans --------------------------------------------------------------------
    def _build_plan(
        self,
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
        model_trace: Trace,
        guide_trace: Trace,
    ) -> Plan:
        # Sampled values that reach Python (.item(), bool(), an assert) make every later site
        # depend on every earlier one (ProgramDependencies.unknown), with vectorize_particles=True
        # too: the particles are one trace, so they cannot differ in structure.
        with outside_jit_trace():
            if self.vectorize_particles:  # a plate of its own, made outside any JIT trace
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

        :returns: the :class:`~pyro_markov_kl.plan.Plan`
        """
        with poutine.block():
            for _, _, plan in self._get_traces_and_plans(model, guide, args, kwargs):
                return plan
        raise ValueError("num_particles must be at least 1")

    # --- estimators ----------------------------------------------------------------
    def _differentiable_loss_particle(
        self, model_trace: Trace, guide_trace: Trace, plan: Plan, surrogate: bool = True
    ) -> Tuple[Any, Any]:
        """
        The loss and the surrogate loss of one particle; with ``surrogate=False``
        the surrogate loss is ``None`` and no score-function term or baseline is
        computed (baselines update their state in the param store).
        """
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
            for model_trace, guide_trace, plan in self._get_traces_and_plans(
                model, guide, args, kwargs
            ):
                loss_particle, _ = self._differentiable_loss_particle(
                    model_trace, guide_trace, plan, surrogate=False
                )
                loss += loss_particle / self.num_particles
        warn_if_nan(loss, "loss")
        return loss

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs):
        """
        Computes the surrogate loss that can be differentiated with autograd
        to produce gradient estimates for the model and guide parameters.
        """
        loss, surrogate_loss = self._loss_and_surrogate_loss(model, guide, args, kwargs)
        warn_if_nan(surrogate_loss, "loss")
        return loss + (surrogate_loss - torch_item(surrogate_loss))

    def _loss_and_surrogate_loss(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> Tuple[Any, Any]:
        """The loss and the surrogate loss, averaged over particles."""
        loss = 0.0
        surrogate_loss = 0.0
        for model_trace, guide_trace, plan in self._get_traces_and_plans(
            model, guide, args, kwargs
        ):
            loss_particle, surrogate_particle = self._differentiable_loss_particle(
                model_trace, guide_trace, plan
            )
            loss = loss + loss_particle / self.num_particles
            surrogate_loss = surrogate_loss + surrogate_particle / self.num_particles
        return loss, surrogate_loss

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """
        :returns: an estimate of the negative ELBO
        :rtype: float

        Computes the ELBO and the surrogate ELBO used to form the gradient
        estimator, and performs backward on the latter.
        """
        loss = 0.0
        for model_trace, guide_trace, plan in self._get_traces_and_plans(
            model, guide, args, kwargs
        ):
            loss_particle, surrogate_particle = self._differentiable_loss_particle(
                model_trace, guide_trace, plan
            )
            loss += loss_particle / self.num_particles
            trainable_params = any(
                site["type"] == "param"
                for trace in (model_trace, guide_trace)
                for site in trace.nodes.values()
            )
            if trainable_params and getattr(surrogate_particle, "requires_grad", False):
                surrogate_particle = surrogate_particle / self.num_particles
                surrogate_particle.backward(retain_graph=self.retain_graph)
        warn_if_nan(loss, "loss")
        return loss


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


def check_site_shapes(trace: Trace, max_plate_nesting: float) -> None:
    """
    Pyro's :func:`~pyro.util.check_site_shape` at every sample site, as
    :func:`pyro.infer.enum.get_importance_trace` runs it for Trace_ELBO under
    validation, from the shape of each site's ``log_prob`` (broadcast from the
    batch shape and the value's shape; computed only where that fails, to
    raise the distribution's own error), without computing it.

    :raises ValueError: Pyro's errors (``invalid log_prob shape``, ``plate stack
        overflow``, ``dim collision``)
    """
    for site in trace.nodes.values():
        if site["type"] != "sample":
            continue
        log_prob = site.get("log_prob")
        if log_prob is None:
            fn, value = site["fn"], site["value"]
            try:
                batch = value.shape[: value.dim() - len(fn.event_shape)]
                shape = torch.broadcast_shapes(fn.batch_shape, batch)
            except (AttributeError, RuntimeError):
                shape = fn.log_prob(value).shape
            site = dict(site, log_prob=torch.empty(shape, device="meta"))
        check_site_shape(site, max_plate_nesting)


def _arg_shapes(args: Any) -> tuple:
    """The shapes of the tensors in (nested tuples of) ``args``, e.g. a ``PackedSequence``."""
    if torch.is_tensor(args):
        return tuple(args.shape)
    if isinstance(args, (tuple, list)):
        return tuple(_arg_shapes(a) for a in args)
    return ()


class JitTraceMarkovKL_ELBO(TraceMarkovKL_ELBO):
    """
    Like :class:`TraceMarkovKL_ELBO` but uses :func:`pyro.ops.jit.trace` to
    compile the loss and surrogate loss, once per model/guide pair and per
    set of non-tensor arguments.

    The dependency analysis runs eagerly, before compilation, on the first
    call (Pyro's compiler first runs the function once to capture parameters),
    so the compiled graph contains only the ELBO's own computation. The
    restrictions of Pyro's :class:`~pyro.infer.trace_elbo.JitTrace_ELBO`
    apply:

    -   Models must have static structure given the shapes of their tensor
        arguments: a graph is compiled for each model/guide pair, number of
        arguments, set of ``**kwargs`` and set of argument shapes (so a new
        sequence length compiles a new graph, with its own plan), and reused
        for every call that matches.
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
        compiled = getattr(self, "_compiled", None)
        if compiled is None:
            compiled = self._compiled = {}
        key = (model, guide)  # bound methods compare equal across attribute lookups
        if key not in compiled:
            weakself = weakref.ref(self)

            @pyro.ops.jit.trace(
                ignore_warnings=self.ignore_jit_warnings, jit_options=self.jit_options
            )
            def loss_and_surrogate_loss(*args, **kwargs):
                kwargs.pop("_pmkl_arg_shapes")
                return weakself()._loss_and_surrogate_loss(model, guide, args, kwargs)

            compiled[key] = loss_and_surrogate_loss
        # Pyro's compiler keys on len(args) and kwargs; the argument shapes decide the
        # structure (e.g. the sequence length), so a new shape must compile a new graph
        return compiled[key](*args, _pmkl_arg_shapes=_arg_shapes(args), **kwargs)

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs):
        loss, surrogate_loss = self.loss_and_surrogate_loss(model, guide, *args, **kwargs)
        warn_if_nan(loss, "loss")
        return loss + (surrogate_loss - surrogate_loss.detach())

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        loss, surrogate_loss = self.loss_and_surrogate_loss(model, guide, *args, **kwargs)
        surrogate_loss.backward(retain_graph=self.retain_graph)
        loss = loss.item()
        warn_if_nan(loss, "loss")
        return loss

    # loss() is TraceMarkovKL_ELBO's, eager, as JitTrace_ELBO's is Trace_ELBO's: it forms no
    # score-function terms, so it updates no baseline in the param store


__all__ = ["GuideOrderWarning", "JitTraceMarkovKL_ELBO", "TraceMarkovKL_ELBO"]
