# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

r"""
Compare ELBO estimators on one model and guide at fixed parameters.

:func:`compare_elbos` evaluates each estimator ``num_draws`` times, independently, at the current
parameters, and reports how noisy its ELBO estimate and its gradient are and how long one step
takes. It answers "why does this estimator train better": at equal expected gradient (for the
unbiased estimators), the one with the smaller gradient variance takes the less noisy steps.

Let :math:`\hat{\mathcal{L}}_1, \dots, \hat{\mathcal{L}}_N` be the ELBO estimates of
:math:`N` = ``num_draws`` independent draws (each averaging the estimator's own
``num_particles`` samples) and :math:`g_1, \dots, g_N \in \mathbb{R}^D` the corresponding gradient
estimates of the loss :math:`-\hat{\mathcal{L}}` with respect to the :math:`D` unconstrained
parameter coordinates (those an optimiser updates). The table reports

.. math::

    \bar{\mathcal{L}} = \frac{1}{N} \sum_{i=1}^N \hat{\mathcal{L}}_i, \qquad
    s = \Big(\frac{1}{N-1} \sum_{i=1}^N (\hat{\mathcal{L}}_i - \bar{\mathcal{L}})^2\Big)^{1/2},
    \qquad \mathrm{SE} = \frac{s}{\sqrt{N}},

the mean, the standard deviation of one estimate and the standard error of the mean (the
standard deviation of :math:`\bar{\mathcal{L}}` itself), and the total gradient variance

.. math::

    V = \sum_{d=1}^D \frac{1}{N-1} \sum_{i=1}^N (g_{i,d} - \bar{g}_d)^2
      = \operatorname{tr} \widehat{\operatorname{Cov}}(g), \qquad
    V_m = \sum_{d \in m} \frac{1}{N-1} \sum_{i=1}^N (g_{i,d} - \bar{g}_d)^2,

summed over all coordinates (:math:`V`) or over the coordinates of one group :math:`m` of
parameters (:math:`V_m`, a module of a :func:`pyro.module` or a parameter of its own). Both are
variances of a single draw's gradient; averaging :math:`K` draws divides them by :math:`K`. For
two unbiased estimators the means agree in expectation, so a difference
:math:`|\bar{\mathcal{L}}_a - \bar{\mathcal{L}}_b|` well beyond
:math:`(\mathrm{SE}_a^2 + \mathrm{SE}_b^2)^{1/2}` points to a bias (e.g. of
:class:`~pyro.infer.TraceMeanField_ELBO` with a guide whose dependency structure is not the
model's).

Each estimator is also marked valid, biased (naming the sites) or unchecked for the model and
guide (see :class:`ELBOComparison`).

``python -m pyro_markov_kl.examples.dmm_gradient_variance`` runs the comparison on the Deep Markov
Model of :mod:`pyro_markov_kl.examples.dmm` on a JSB Chorales mini-batch (see ``--help``).
"""

import math
import statistics
import textwrap
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.elbo import ELBO
from torch.distributions import kl_divergence

from .plan import bias_reason
from .trace_markov_kl_elbo import TraceMarkovKL_ELBO

__all__ = ["ELBOComparison", "compare_elbos", "param_group"]

#: The keys of each dict of :meth:`ELBOComparison.to_dicts`.
ROW_KEYS = (
    "name",
    "estimator",
    "num_draws",
    "elbo_mean",
    "elbo_se",
    "elbo_std",
    "grad_var",
    "grad_var_by_module",
    "grad_mean_norm",
    "num_params",
    "step_time",
    "validity",
    "biased_sites",
    "validity_reason",
)

#: Estimator classes whose ELBO estimate and gradient are unbiased for any model and guide they
#: run on (checked by exact class: a subclass may change the estimator).
UNBIASED_ELBOS = (
    "pyro.infer.trace_elbo.Trace_ELBO",
    "pyro.infer.trace_elbo.JitTrace_ELBO",
    "pyro.infer.tracegraph_elbo.TraceGraph_ELBO",
    "pyro.infer.tracegraph_elbo.JitTraceGraph_ELBO",
    "pyro_markov_kl.trace_markov_kl_elbo.TraceMarkovKL_ELBO",
    "pyro_markov_kl.trace_markov_kl_elbo.JitTraceMarkovKL_ELBO",
    "pyro_markov_kl.trace_enum_markov_kl_elbo.TraceEnumMarkovKL_ELBO",
    "pyro_markov_kl.trace_enum_markov_kl_elbo.JitTraceEnumMarkovKL_ELBO",
)

#: Estimator classes that use the analytic KL at every latent site that has one, unconditionally
#: (Pyro's mean-field estimators): biased where a model parent of the site is a guide descendant.
ALWAYS_ANALYTIC_ELBOS = (
    "pyro.infer.trace_mean_field_elbo.TraceMeanField_ELBO",
    "pyro.infer.trace_mean_field_elbo.JitTraceMeanField_ELBO",
)

_BIAS_NOTE = "model parent sampled after it in the guide"

ELBOsArg = Union[None, ELBO, Mapping[str, ELBO], Sequence[ELBO]]


def param_group(name: str) -> str:
    """
    The group of a parameter in the per-module gradient variance: the module of its name.

    ``"dmm$$$emitter.lin_z_to_hidden.weight"`` (a parameter of :func:`pyro.module` ``"dmm"``)
    goes to ``"emitter"``, the submodule under the registered module; a parameter of the
    registered module itself (``"dmm$$$z_0"``) and a plain :func:`pyro.param` (``"loc"``) go by
    their own name, a :class:`~pyro.nn.PyroModule` parameter (``"encoder.fc.weight"``) by its
    top-level submodule (``"encoder"``).

    :param str name: the parameter's name in the param store.
    :return: the group name.
    :rtype: str
    """
    local = name.rsplit("$$$", 1)[-1]
    return local.partition(".")[0]


def _default_elbos() -> "OrderedDict[str, ELBO]":
    return OrderedDict(
        [
            ("Trace_ELBO", Trace_ELBO()),
            ("TraceMeanField_ELBO", TraceMeanField_ELBO()),
            ("TraceMarkovKL_ELBO", TraceMarkovKL_ELBO()),
        ]
    )


def _named_elbos(elbos: ELBOsArg) -> "OrderedDict[str, ELBO]":
    if elbos is None:
        return _default_elbos()
    if isinstance(elbos, Mapping):
        named = OrderedDict((str(k), v) for k, v in elbos.items())
    else:
        if isinstance(elbos, ELBO) or hasattr(elbos, "loss"):
            elbos = [elbos]  # type: ignore[list-item]
        named = OrderedDict()
        for elbo in elbos:  # type: ignore[union-attr]
            base = type(elbo).__name__
            name, k = base, 1
            while name in named:
                k += 1
                name = f"{base}[{k}]"
            named[name] = elbo
    if not named:
        raise ValueError("compare_elbos needs at least one ELBO")
    for name, elbo in named.items():
        if not callable(getattr(elbo, "differentiable_loss", None)) and not callable(
            getattr(elbo, "loss_and_grads", None)
        ):
            raise TypeError(
                f"{name!r} is not an ELBO: it has neither differentiable_loss nor loss_and_grads"
            )
    return named


def _class_path(elbo: Any) -> str:
    cls = type(elbo)
    return f"{cls.__module__}.{cls.__qualname__}"


def _plan_elbo(named: Mapping[str, ELBO]) -> Any:
    """A :class:`~pyro_markov_kl.TraceMarkovKL_ELBO` to make the plan with: one of the compared
    estimators if there is one (its plan cache then serves its draws), else a new one."""
    for elbo in named.values():
        if type(elbo) is TraceMarkovKL_ELBO:
            return elbo
    nesting = min(
        (getattr(e, "max_plate_nesting", math.inf) for e in named.values()), default=math.inf
    )
    return TraceMarkovKL_ELBO(max_plate_nesting=nesting)


def _kl_sites(
    model: Callable, guide: Callable, names: Sequence[str], args: tuple, kwargs: dict
) -> List[str]:
    """The sites among ``names`` for which :func:`torch.distributions.kl_divergence` of the
    guide's and the model's distributions exists (where ``TraceMeanField_ELBO`` uses it)."""
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    found = []
    for name in names:
        if name not in guide_trace.nodes or name not in model_trace.nodes:
            continue
        try:
            with torch.no_grad():
                kl_divergence(guide_trace.nodes[name]["fn"], model_trace.nodes[name]["fn"])
        except Exception:  # NotImplementedError, or a KL that does not apply to these shapes
            continue
        found.append(name)
    return found


def _biased_sites(
    named: Mapping[str, ELBO], model: Callable, guide: Callable, args: tuple, kwargs: dict
) -> Tuple[List[str], str]:
    """
    The sites where an always-analytic estimator is biased on this model and guide, in guide
    order, and an error message if the dependency analysis failed (then the list is empty).
    """
    try:
        plan = _plan_elbo(named).explain(model, guide, *args, **kwargs)
    except Exception as e:  # the analysis does not support this program: say so
        return [], f"dependency analysis failed: {type(e).__name__}: {e}"
    candidates = [
        name
        for name, rec in plan.sites.items()
        if not rec.auxiliary
        and bias_reason(name, rec.model_parents, rec.guide_descendants, plan.guide, plan.model)
        is not None
    ]
    if not candidates:
        return [], ""
    try:
        biased = _kl_sites(model, guide, candidates, args, kwargs)
    except Exception as e:
        return [], f"could not trace the model and guide: {type(e).__name__}: {e}"
    order = plan.guide.order
    biased.sort(key=lambda n: order.index(n) if n in order else len(order))
    return biased, ""


def _validity(
    named: Mapping[str, ELBO], model: Callable, guide: Callable, args: tuple, kwargs: dict
) -> Dict[str, Tuple[str, List[str], str]]:
    """``{name: (validity, biased_sites, validity_reason)}`` of each compared estimator."""
    out: Dict[str, Tuple[str, List[str], str]] = {}
    checks = [n for n, e in named.items() if _class_path(e) in ALWAYS_ANALYTIC_ELBOS]
    biased: List[str] = []
    failure = ""
    if checks:
        # the check draws samples: leave the random state as it was, so that the draws below
        # are the ones they would be without it
        state = pyro.util.get_rng_state()
        try:
            biased, failure = _biased_sites(named, model, guide, args, kwargs)
        finally:
            pyro.util.set_rng_state(state)
    for name, elbo in named.items():
        path = _class_path(elbo)
        if path in UNBIASED_ELBOS:
            out[name] = ("valid", [], "unbiased for any model and guide")
        elif name not in checks:
            out[name] = (
                "unchecked",
                [],
                f"{type(elbo).__name__} is not an estimator pyro_markov_kl can vouch for",
            )
        elif failure:
            out[name] = ("unchecked", [], failure)
        elif biased:
            out[name] = (
                "biased",
                list(biased),
                f"analytic KL at {_site_list(biased)} ({_BIAS_NOTE}): its conditional KL "
                "is not the expected log-ratio there",
            )
        else:
            out[name] = (
                "valid",
                [],
                "no model parent of a KL site is sampled after it in the guide",
            )
    return out


def _site_list(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit})" if len(names) > limit else "")


def _captured_params(trace: Any) -> "OrderedDict[str, torch.Tensor]":
    # the unconstrained tensors, which are the leaves an optimiser updates (as in pyro.infer.SVI)
    params: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, site in trace.nodes.items():
        if site["type"] != "param":
            continue
        value = site["value"]
        unconstrained = getattr(value, "unconstrained", None)
        params[name] = unconstrained() if callable(unconstrained) else value
    return params


def _draw(
    elbo: ELBO, model: Callable, guide: Callable, args: tuple, kwargs: dict
) -> Tuple[float, Dict[str, torch.Tensor], float]:
    """One loss + gradient evaluation: ``(elbo_estimate, {param name: gradient}, seconds)``."""
    differentiable_loss = getattr(elbo, "differentiable_loss", None)
    if callable(differentiable_loss):
        start = time.perf_counter()
        with poutine.trace(param_only=True) as capture:
            loss = differentiable_loss(model, guide, *args, **kwargs)
        params = _captured_params(capture.trace)
        names = [n for n, p in params.items() if p.requires_grad]
        grads: Sequence[Optional[torch.Tensor]] = [None] * len(names)
        if names and torch.is_tensor(loss) and loss.requires_grad:
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        seconds = time.perf_counter() - start
        value = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
        result = {
            n: (torch.zeros_like(params[n]) if g is None else g.detach())
            for n, g in zip(names, grads)
        }
        return -value, result, seconds

    # loss_and_grads accumulates into .grad: clear it first and restore it afterwards
    store = pyro.get_param_store()
    saved = [(p, p.grad) for _, p in store.named_parameters()]
    for p, _ in saved:
        p.grad = None
    captured: OrderedDict[str, torch.Tensor] = OrderedDict()
    try:
        start = time.perf_counter()
        with poutine.trace(param_only=True) as capture:
            value = elbo.loss_and_grads(model, guide, *args, **kwargs)
        seconds = time.perf_counter() - start
        captured = _captured_params(capture.trace)
        result = {
            n: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
            for n, p in captured.items()
            if p.requires_grad
        }
    finally:
        for p in captured.values():
            p.grad = None
        for p, grad in saved:
            p.grad = grad
    value = float(value.detach()) if torch.is_tensor(value) else float(value)
    return -value, result, seconds


class _Welford:
    """Running mean and sum of squared deviations per coordinate, in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Dict[str, torch.Tensor] = {}
        self.m2: Dict[str, torch.Tensor] = {}

    def update(self, grads: Mapping[str, torch.Tensor]) -> None:
        self.count += 1
        for name in set(self.mean) | set(grads):
            if name in grads:
                x = grads[name].detach().to(torch.float64).reshape(-1)
            else:
                x = torch.zeros_like(self.mean[name])
            if name not in self.mean:
                # earlier draws did not touch this parameter: zero gradients so far
                self.mean[name] = torch.zeros_like(x)
                self.m2[name] = torch.zeros_like(x)
            delta = x - self.mean[name]
            self.mean[name] += delta / self.count
            self.m2[name] += delta * (x - self.mean[name])

    def variance(self, name: str) -> float:
        return float(self.m2[name].sum()) / (self.count - 1)


def compare_elbos(
    model: Callable,
    guide: Callable,
    *args: Any,
    elbos: ELBOsArg = None,
    num_draws: int = 50,
    **kwargs: Any,
) -> "ELBOComparison":
    r"""
    Compare ELBO estimators on ``model`` and ``guide`` at the current parameters.

    Each estimator is evaluated ``num_draws`` times, independently (one call of its
    ``differentiable_loss`` followed by :func:`torch.autograd.grad`, or, for estimators without
    ``differentiable_loss`` such as :class:`~pyro.infer.TraceGraph_ELBO`, one call of
    ``loss_and_grads`` with the parameters' ``.grad`` saved before and restored after). Nothing
    is optimised: the parameters and their ``.grad`` are left as they were (parameters created by
    the first run of a model or guide stay in the param store, as after any first evaluation).

    With :math:`\hat{\mathcal{L}}_i` the ELBO estimate of draw :math:`i` and :math:`g_i` its
    gradient of :math:`-\hat{\mathcal{L}}_i` with respect to the unconstrained parameters, the
    reported figures are the mean :math:`\bar{\mathcal{L}}`, the standard deviation
    :math:`s = (\sum_i (\hat{\mathcal{L}}_i - \bar{\mathcal{L}})^2 / (N - 1))^{1/2}` of one
    estimate, the standard error :math:`s / \sqrt{N}` of the mean, the total gradient variance
    :math:`\sum_d \widehat{\operatorname{Var}}(g_{\cdot, d})` (the trace of the gradient's
    sample covariance), the same sum over each parameter group (see :func:`param_group`), the
    norm :math:`\|\bar{g}\|` of the mean gradient and the median time of one evaluation (the
    first evaluation carries one-off costs, such as the dependency analysis of
    :class:`~pyro_markov_kl.TraceMarkovKL_ELBO`, which the median discounts from three draws
    on). See :mod:`pyro_markov_kl.compare` for the formulas.

    Example::

        table = compare_elbos(dmm.model, dmm.guide, *batch, num_draws=20)
        print(table)
        table.plot("elbos.png")

    :param callable model: the model.
    :param callable guide: the guide.
    :param args: positional arguments of the model and guide.
    :param elbos: the estimators: ``None`` for ``Trace_ELBO``, ``TraceMeanField_ELBO`` and
        :class:`~pyro_markov_kl.TraceMarkovKL_ELBO` (default constructor arguments), a dict
        ``{name: elbo}``, or a list of ELBO instances named by their class (``"Trace_ELBO"``,
        ``"Trace_ELBO[2]"`` for a second one, ...).
    :param int num_draws: the number :math:`N \ge 2` of independent draws per estimator.
    :param kwargs: keyword arguments of the model and guide.
    :return: the comparison table, one row per estimator.
    :rtype: ELBOComparison
    :raises ValueError: if ``num_draws < 2`` or no estimator is given.
    """
    if num_draws < 2:
        raise ValueError(f"num_draws must be at least 2 to estimate a variance, got {num_draws}")
    named = _named_elbos(elbos)
    validity = _validity(named, model, guide, args, kwargs)
    rows: List[Dict[str, Any]] = []
    for name, elbo in named.items():
        values: List[float] = []
        times: List[float] = []
        acc = _Welford()
        for _ in range(num_draws):
            value, grads, seconds = _draw(elbo, model, guide, args, kwargs)
            values.append(value)
            times.append(seconds)
            acc.update(grads)
        mean = statistics.fmean(values)
        std = statistics.stdev(values, xbar=mean) if all(map(math.isfinite, values)) else math.nan
        by_module: Dict[str, float] = {}
        for pname in sorted(acc.mean):
            group = param_group(pname)
            by_module[group] = by_module.get(group, 0.0) + acc.variance(pname)
        mean_sq = sum(float(m.square().sum()) for m in acc.mean.values())
        rows.append(
            {
                "name": name,
                "estimator": type(elbo).__name__,
                "num_draws": num_draws,
                "elbo_mean": mean,
                "elbo_se": std / math.sqrt(num_draws),
                "elbo_std": std,
                "grad_var": sum(by_module.values()),
                "grad_var_by_module": dict(sorted(by_module.items())),
                "grad_mean_norm": math.sqrt(mean_sq),
                "num_params": sum(m.numel() for m in acc.mean.values()),
                "step_time": statistics.median(times),
                "validity": validity[name][0],
                "biased_sites": validity[name][1],
                "validity_reason": validity[name][2],
            }
        )
    return ELBOComparison(rows)


def _valid_cell(row: Mapping[str, Any]) -> str:
    validity = row.get("validity", "unchecked")
    if validity == "biased":
        return f"biased at {_site_list(row['biased_sites'])} ({_BIAS_NOTE})"
    return "yes" if validity == "valid" else validity


def _fmt(x: float, width: int, sci: bool = False) -> str:
    if not math.isfinite(x):
        return f"{x!s:>{width}}"
    if x == 0:
        return f"{'0':>{width}}"
    if sci or abs(x) >= 1e7 or abs(x) < 1e-3:
        return f"{x:>{width}.3e}"
    if abs(x) >= 100:
        return f"{x:>{width}.1f}"
    if abs(x) >= 1:
        return f"{x:>{width}.3f}"
    return f"{x:>{width}.4g}"


class ELBOComparison:
    """
    The result of :func:`compare_elbos`: one row per estimator.

    ``print(table)`` shows an aligned text table, :meth:`to_dicts` returns the rows as plain
    dicts, :meth:`plot` draws them with matplotlib. ``table[name]`` is the row of one estimator,
    iteration yields the rows in order.

    Each row holds

    * ``name``: the estimator's name in the comparison, and ``estimator`` its class name;
    * ``num_draws``: the number :math:`N` of draws;
    * ``elbo_mean``, ``elbo_se``, ``elbo_std``: the mean ELBO estimate, its standard error
      :math:`s/\\sqrt{N}` and the standard deviation :math:`s` of one estimate;
    * ``grad_var``: the total gradient variance (the sum over coordinates of the per-coordinate
      sample variance of one draw's gradient), and ``grad_var_by_module``: a dict
      ``{group: variance}`` of the same sum within each parameter group (:func:`param_group`);
    * ``grad_mean_norm``: the Euclidean norm of the mean gradient (the signal the variance is
      noise on), and ``num_params``: the number of parameter coordinates;
    * ``step_time``: the median wall-clock time in seconds of one loss + gradient evaluation;
    * ``validity``: whether the estimator is unbiased for this model and guide, as far as
      :func:`compare_elbos` can tell: ``"valid"`` (``Trace_ELBO``, ``TraceGraph_ELBO``,
      :class:`~pyro_markov_kl.TraceMarkovKL_ELBO` and their JIT versions, see
      :data:`UNBIASED_ELBOS`; or a ``TraceMeanField_ELBO`` whose analytic KLs are all
      unbiased here), ``"biased"`` (a ``TraceMeanField_ELBO`` that uses the analytic KL at a
      site where the plan of :meth:`~pyro_markov_kl.TraceMarkovKL_ELBO.explain` finds it
      biased: a model parent of the site is sampled after it in the guide and depends on it,
      :func:`pyro_markov_kl.plan.bias_reason`) or ``"unchecked"`` (any other estimator class,
      or the dependency analysis failed). The ELBO mean and the gradient variance of a biased
      estimator are those of a different objective: a low variance does not recommend it;
    * ``biased_sites``: the list of those biased sites, in guide order (empty unless
      ``validity`` is ``"biased"``), and ``validity_reason``: a sentence saying why.

    :param rows: the rows, dicts with the keys above (rows without the ``validity`` keys, as
        made before they existed, are shown as ``"unchecked"``).
    """

    def __init__(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self._rows: List[Dict[str, Any]] = [dict(row) for row in rows]

    @property
    def names(self) -> List[str]:
        """The estimators' names, in order."""
        return [row["name"] for row in self._rows]

    @property
    def modules(self) -> List[str]:
        """The parameter groups of the per-module gradient variance, sorted."""
        groups = set()
        for row in self._rows:
            groups.update(row["grad_var_by_module"])
        return sorted(groups)

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return iter(self.to_dicts())

    def __getitem__(self, name: str) -> Dict[str, Any]:
        for row in self._rows:
            if row["name"] == name:
                return self._copy(row)
        raise KeyError(name)

    @staticmethod
    def _copy(row: Mapping[str, Any]) -> Dict[str, Any]:
        out = dict(row)
        out["grad_var_by_module"] = dict(row["grad_var_by_module"])
        out.setdefault("validity", "unchecked")
        out["biased_sites"] = list(row.get("biased_sites", ()))
        out.setdefault("validity_reason", "not checked")
        return out

    @property
    def biased(self) -> List[str]:
        """The names of the estimators found biased for this model and guide."""
        return [row["name"] for row in self._rows if row.get("validity") == "biased"]

    def to_dicts(self) -> List[Dict[str, Any]]:
        """
        The rows as plain dicts (copies), with the keys listed in the class documentation:
        ``name``, ``estimator``, ``num_draws``, ``elbo_mean``, ``elbo_se``, ``elbo_std``,
        ``grad_var``, ``grad_var_by_module``, ``grad_mean_norm``, ``num_params``,
        ``step_time``, ``validity``, ``biased_sites``, ``validity_reason``.

        :rtype: list
        """
        return [self._copy(row) for row in self._rows]

    def __repr__(self) -> str:
        return f"ELBOComparison({self.names!r})"

    def __str__(self) -> str:
        if not self._rows:
            return "ELBOComparison (empty)"
        name_w = max(9, *(len(n) for n in self.names))
        num_draws = self._rows[0]["num_draws"]
        num_params = self._rows[0]["num_params"]
        lines = [
            f"ELBO estimators over {num_draws} independent draws at fixed parameters "
            f"({num_params} parameter coordinates)",
        ]
        cols = [
            ("ELBO mean", "elbo_mean", 12),
            ("SE", "elbo_se", 10),
            ("std", "elbo_std", 10),
            ("grad var", "grad_var", 10),
            ("|mean grad|", "grad_mean_norm", 11),
            ("ms/step", "step_time", 9),
        ]
        valid = [_valid_cell(row) for row in self._rows]
        valid_w = max(len("valid"), *(len(v) for v in valid))
        lines.append(
            f"{'estimator':<{name_w}}"
            + "".join(f" {h:>{w}}" for h, _, w in cols)
            + f"  {'valid':<{valid_w}}"
        )
        for row, cell in zip(self._rows, valid):
            cells = []
            for _, key, w in cols:
                x = row[key] * 1000.0 if key == "step_time" else row[key]
                if key == "step_time":
                    cells.append(f" {x:>{w}.1f}")
                else:
                    cells.append(" " + _fmt(x, w, sci=key.startswith("grad")))
            lines.append(f"{row['name']:<{name_w}}" + "".join(cells) + f"  {cell:<{valid_w}}")
        modules = self.modules
        if len(modules) > 1:
            lines.append("")
            lines.append("gradient variance by module")
            widths = [max(10, len(m)) for m in modules]
            lines.append(
                f"{'estimator':<{name_w}}" + "".join(f" {m:>{w}}" for m, w in zip(modules, widths))
            )
            for row in self._rows:
                by = row["grad_var_by_module"]
                lines.append(
                    f"{row['name']:<{name_w}}"
                    + "".join(
                        " " + _fmt(by.get(m, math.nan), w, sci=True)
                        for m, w in zip(modules, widths)
                    )
                )
        lines.append("")
        lines.append(
            "std: of one ELBO estimate; SE = std / sqrt(draws): of the mean. grad var: sum over "
            "coordinates of the variance of one draw's gradient."
        )
        for row in self._rows:
            validity = row.get("validity", "unchecked")
            if validity == "biased":
                sites = row["biased_sites"]
                lines.extend(
                    textwrap.wrap(
                        f"BIASED: {row['name']} uses the analytic KL at {len(sites)} "
                        f"site(s) ({_site_list(sites)}) whose model parent is sampled after "
                        "the site in the guide and depends on it; there the KL conditioned on "
                        "the sampled parents is not the expected log-ratio, so its ELBO mean "
                        "and gradient are those of another objective (a low gradient variance "
                        "does not recommend it; the bias may be small at initialisation and "
                        "grow as the guide moves away from the prior). Use an estimator marked "
                        "valid.",
                        width=100,
                        subsequent_indent="  ",
                    )
                )
            elif validity == "unchecked":
                lines.append(
                    f"unchecked: {row['name']}: "
                    f"{row.get('validity_reason', 'not checked')}; its bias is not known."
                )
        return "\n".join(lines)

    def plot(self, path: Optional[str] = None) -> Any:
        """
        Draw the comparison: bars of the gradient variance per estimator, in total and per
        parameter group (log scale; a zero variance is marked ``0`` at the bottom), and the mean
        ELBO of each estimator with its standard-error bar.

        Needs matplotlib (the ``plot`` extra: ``pip install 'pyro-markov-kl[plot]'``).

        :param str path: if given, save the figure there (the format follows the extension) and
            close it; otherwise the figure is created with :mod:`matplotlib.pyplot`, for display.
        :return: the :class:`matplotlib.figure.Figure`.
        :raises ImportError: if matplotlib is not installed.
        """
        try:
            import matplotlib
            from matplotlib.figure import Figure
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "ELBOComparison.plot needs matplotlib; install it with "
                "pip install 'pyro-markov-kl[plot]' (or pip install matplotlib)"
            ) from e
        del matplotlib
        groups = ["total"] + self.modules
        if path is None:
            import matplotlib.pyplot as plt

            fig = plt.figure(figsize=(max(8.0, 1.0 + 0.9 * len(groups) + 3.0), 4.5))
        else:
            fig = Figure(figsize=(max(8.0, 1.0 + 0.9 * len(groups) + 3.0), 4.5))
        grid = fig.add_gridspec(1, 2, width_ratios=[max(2.0, 0.6 * len(groups)), 1.4])
        ax_var = fig.add_subplot(grid[0])
        ax_elbo = fig.add_subplot(grid[1])

        num = len(self._rows)
        width = 0.8 / max(num, 1)
        positive = [
            v
            for row in self._rows
            for v in [row["grad_var"], *row["grad_var_by_module"].values()]
            if math.isfinite(v) and v > 0
        ]
        floor = min(positive) / 10.0 if positive else 1e-12
        for i, row in enumerate(self._rows):
            values = [row["grad_var"]] + [row["grad_var_by_module"].get(m, 0.0) for m in groups[1:]]
            xs = [j + (i - (num - 1) / 2.0) * width for j in range(len(groups))]
            heights = [v if math.isfinite(v) and v > 0 else math.nan for v in values]
            validity = row.get("validity", "unchecked")
            label = row["name"] if validity == "valid" else f"{row['name']} ({validity.upper()})"
            bars = ax_var.bar(
                xs,
                heights,
                width=width,
                label=label,
                bottom=0,
                hatch="//" if validity == "biased" else (".." if validity != "valid" else None),
                edgecolor="black" if validity != "valid" else None,
            )
            color = bars.patches[0].get_facecolor() if bars.patches else None
            for x, v in zip(xs, values):
                if v == 0:
                    ax_var.annotate(
                        "0", (x, floor), ha="center", va="bottom", fontsize=8, color=color
                    )
        ax_var.set_yscale("log")
        ax_var.set_ylim(bottom=floor)
        ax_var.set_xticks(range(len(groups)))
        ax_var.set_xticklabels(groups, rotation=30, ha="right")
        ax_var.set_ylabel("gradient variance (sum over coordinates)")
        ax_var.set_title("gradient variance of one draw")
        ax_var.legend(fontsize=8)

        xs = list(range(num))
        for i, row in enumerate(self._rows):
            validity = row.get("validity", "unchecked")
            ax_elbo.errorbar(
                [xs[i]],
                [row["elbo_mean"]],
                yerr=[row["elbo_se"]],
                fmt="X" if validity == "biased" else ("o" if validity == "valid" else "s"),
                markersize=9 if validity == "biased" else 6,
                capsize=5,
                color=f"C{i % 10}",
            )
            if validity != "valid":
                ax_elbo.annotate(
                    validity.upper(),
                    (xs[i], row["elbo_mean"]),
                    xytext=(6, 6),
                    textcoords="offset points",
                    fontsize=8,
                    color="red" if validity == "biased" else "gray",
                    fontweight="bold" if validity == "biased" else "normal",
                )
        ax_elbo.set_xticks(xs)
        labels = []
        for row in self._rows:
            validity = row.get("validity", "unchecked")
            labels.append(row["name"] if validity == "valid" else f"{row['name']} ({validity})")
        ax_elbo.set_xticklabels(labels, rotation=30, ha="right")
        ax_elbo.set_xlim(-0.5, num - 0.5)
        ax_elbo.set_ylabel("ELBO")
        num_draws = self._rows[0]["num_draws"] if self._rows else 0
        ax_elbo.set_title(f"mean ELBO ± SE ({num_draws} draws)")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig
