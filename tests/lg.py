# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

r"""Exact reference for linear-Gaussian DAG models and guides.

This module is test support, independent of any ELBO estimator.  A :class:`LGSpec`
describes

* a **model**: scalar latents in model sampling order,

  .. math:: z_i \sim \mathcal N\Big(\sum_{j \in \mathrm{pa}_p(i)} a_{ij} z_j + b_i,\; s_i\Big),

  where the model parents :math:`\mathrm{pa}_p(i)` are sampled earlier in the model,
  and observations :math:`x_k \sim \mathcal N(\sum_j c_{kj} z_j + d_k, r_k)` with
  fixed observed values;
* a **guide**: the same latents in a (possibly different) guide order,

  .. math:: z_i \sim \mathcal N\Big(\sum_{j \in \mathrm{pa}_q(i)} e_{ij} z_j + f_i,\; g_i\Big),

  where :math:`e_{ij}, f_i, \log g_i` are ``pyro.param`` s;
* optional per-site scale factors (``poutine.scale``) and boolean masks
  (``poutine.mask``), separately on the model side and on the guide side.

With effective weights :math:`w^p_s = \text{scale}_p(s)\,\text{mask}_p(s)` and
:math:`w^q_s = \text{scale}_q(s)\,\text{mask}_q(s)` (a masked-out site contributes 0
on that side), the quantity every unbiased ``Trace_ELBO``-like estimator targets is

.. math::

   \mathcal L = \sum_{i\in\text{latents}} \big(w^p_i\,\mathbb E_q[\log p_i]
               - w^q_i\,\mathbb E_q[\log q_i]\big)
               + \sum_{k\in\text{obs}} w^p_k\,\mathbb E_q[\log p_k].

**Closed form.**  Stack the latents into a vector :math:`z`.  The guide is the
linear system :math:`z = E z + f + G\varepsilon` with :math:`\varepsilon\sim\mathcal N(0, I)`,
:math:`G=\mathrm{diag}(g)` and :math:`E` nilpotent (strictly lower triangular in guide
order), hence

.. math:: z = m + L\varepsilon,\quad m = (I-E)^{-1} f,\quad L = (I-E)^{-1} G,
          \quad S = \mathrm{Cov}_q(z) = L L^\top,\quad \mathbb E_q[z z^\top] = S + m m^\top.

* Guide terms: :math:`z_i - \sum_j e_{ij} z_j - f_i = g_i \varepsilon_i`, so
  :math:`\mathbb E_q[\log q_i] = -\tfrac12\log 2\pi - \log g_i - \tfrac12`
  whatever the guide parents are.
* Model terms are quadratic: with :math:`u = e_i - \sum_j a_{ij} e_j` (so that the
  residual is :math:`u^\top z - b_i`),
  :math:`\mathbb E_q[(u^\top z - b_i)^2] = u^\top S u + (u^\top m - b_i)^2`, hence
  :math:`\mathbb E_q[\log p_i] = -\tfrac12\log 2\pi - \log s_i
  - \tfrac{1}{2 s_i^2}\big(u^\top S u + (u^\top m - b_i)^2\big)`; observations likewise
  with :math:`u = c_k` and residual :math:`x_k - d_k - c_k^\top z`.

:func:`exact_elbo` implements this with torch ops, so autograd gives the exact gradient
w.r.t. the guide parameters :math:`(e, f, \log g)`.

**Analytic-KL rule.**  :func:`analytic_expected` returns the latents :math:`s` with
:math:`\mathrm{pa}_p(s) \cap \mathrm{desc}_q(s) = \emptyset`, where
:math:`\mathrm{desc}_q(s)` is the transitive closure of guide children of :math:`s`.
Only then, conditionally on the sampled values of both parent sets, :math:`z_s` is
still distributed as :math:`q_s(\cdot\mid\mathrm{pa}_q(s))` and
:math:`\mathbb E_q[\log q_s - \log p_s] = \mathbb E_q[\mathrm{KL}(q_s\,\|\,p_s)]`.
All coefficients used here are nonzero, so structural and statistical parents coincide.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

DTYPE = torch.float64
LOG_2PI = math.log(2 * math.pi)


@dataclass
class Latent:
    """Model latent ``z ~ Normal(sum_j parents[j] * z_j + loc, scale)``."""

    name: str
    parents: Dict[str, float] = field(default_factory=dict)
    loc: float = 0.0
    scale: float = 1.0


@dataclass
class GuideSite:
    """Guide site ``z ~ Normal(sum_j e_j z_j + f, exp(log_g))``; values are param inits."""

    name: str
    parents: Dict[str, float] = field(default_factory=dict)
    loc: float = 0.0
    scale: float = 1.0


@dataclass
class Obs:
    """Observation ``x ~ Normal(sum_j parents[j] * z_j + loc, scale)`` observed at ``value``."""

    name: str
    parents: Dict[str, float]
    loc: float = 0.0
    scale: float = 1.0
    value: float = 0.0


@dataclass
class LGSpec:
    """A linear-Gaussian model/guide pair.

    ``model`` is in model sampling order; ``guide`` in guide sampling order (same names).
    Observations are sampled in the model right after the last of their parents.
    ``model_scale``/``model_mask`` apply to latents and observations on the model side,
    ``guide_scale``/``guide_mask`` to latents on the guide side.  ``model_infer`` and
    ``guide_infer`` are passed as ``infer=`` to the corresponding ``pyro.sample`` s.
    ``plate``: if true every site lives in ``pyro.plate("pmkl_unit", 1, dim=-1)``.
    """

    model: List[Latent]
    guide: List[GuideSite]
    obs: List[Obs] = field(default_factory=list)
    model_scale: Dict[str, float] = field(default_factory=dict)
    guide_scale: Dict[str, float] = field(default_factory=dict)
    model_mask: Dict[str, bool] = field(default_factory=dict)
    guide_mask: Dict[str, bool] = field(default_factory=dict)
    model_infer: Dict[str, dict] = field(default_factory=dict)
    guide_infer: Dict[str, dict] = field(default_factory=dict)
    plate: bool = False

    def __post_init__(self):
        names = [lat.name for lat in self.model]
        if sorted(names) != sorted(site.name for site in self.guide):
            raise ValueError("model and guide must have the same latents")
        if len(set(names)) != len(names):
            raise ValueError("duplicate latent names")
        for order in (self.model, self.guide):
            seen = set()
            for site in order:
                if not set(site.parents) <= seen:
                    raise ValueError(f"parents of {site.name} must be sampled earlier")
                if any(c == 0 for c in site.parents.values()):
                    raise ValueError("coefficients must be nonzero")
                seen.add(site.name)
        for ob in self.obs:
            if not set(ob.parents) <= set(names) or ob.name in names:
                raise ValueError(f"bad observation {ob.name}")

    @property
    def latent_names(self) -> List[str]:
        return [lat.name for lat in self.model]

    @property
    def max_plate_nesting(self) -> int:
        return 1 if self.plate else 0


# ---------------------------------------------------------------------------------------
# guide parameters


def param_e(child: str, parent: str) -> str:
    return f"pmkl_e__{child}__{parent}"


def param_f(name: str) -> str:
    return f"pmkl_f__{name}"


def param_logg(name: str) -> str:
    return f"pmkl_logg__{name}"


def init_params(spec: LGSpec) -> Dict[str, torch.Tensor]:
    """Initial (unconstrained) values of all guide params, keyed by param name."""
    out = {}
    for site in spec.guide:
        for parent, coef in site.parents.items():
            out[param_e(site.name, parent)] = torch.tensor(coef, dtype=DTYPE)
        out[param_f(site.name)] = torch.tensor(site.loc, dtype=DTYPE)
        out[param_logg(site.name)] = torch.tensor(math.log(site.scale), dtype=DTYPE)
    return out


def register_params(initial: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Clear the param store, register ``initial`` as params, return the leaf tensors."""
    pyro.clear_param_store()
    for name, value in initial.items():
        pyro.param(name, value.clone())
    store = dict(pyro.get_param_store().named_parameters())
    return {name: store[name] for name in initial}


def reset_param_store(spec: LGSpec) -> Dict[str, torch.Tensor]:
    """Clear the param store, register the initial guide params, return the leaf tensors."""
    return register_params(init_params(spec))


# ---------------------------------------------------------------------------------------
# Pyro callables


def _site_context(scale: Optional[float], mask: Optional[bool]) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    if scale is not None:
        stack.enter_context(poutine.scale(scale=scale))
    if mask is not None:
        stack.enter_context(poutine.mask(mask=mask))
    return stack


def _plate(spec: LGSpec):
    if spec.plate:
        return pyro.plate("pmkl_unit", 1, dim=-1)
    return contextlib.nullcontext()


def make_model(spec: LGSpec) -> Callable[[], None]:
    """The Pyro model of ``spec`` (no arguments)."""
    order = {lat.name: i for i, lat in enumerate(spec.model)}
    obs_after: Dict[int, List[Obs]] = {}
    for ob in spec.obs:
        pos = max((order[p] for p in ob.parents), default=-1)
        obs_after.setdefault(pos, []).append(ob)

    def lin(parents, loc, z):
        out = torch.tensor(loc, dtype=DTYPE)
        for parent, coef in parents.items():
            out = out + coef * z[parent]
        return out

    def model():
        z = {}
        with _plate(spec):
            for i in range(-1, len(spec.model)):
                if i >= 0:
                    lat = spec.model[i]
                    d = dist.Normal(
                        lin(lat.parents, lat.loc, z), torch.tensor(lat.scale, dtype=DTYPE)
                    )
                    with _site_context(
                        spec.model_scale.get(lat.name), spec.model_mask.get(lat.name)
                    ):
                        z[lat.name] = pyro.sample(
                            lat.name, d, infer=dict(spec.model_infer.get(lat.name, {}))
                        )
                for ob in obs_after.get(i, []):
                    d = dist.Normal(lin(ob.parents, ob.loc, z), torch.tensor(ob.scale, dtype=DTYPE))
                    value = torch.tensor(ob.value, dtype=DTYPE)
                    if spec.plate:
                        value = value.expand(1)
                    with _site_context(spec.model_scale.get(ob.name), spec.model_mask.get(ob.name)):
                        pyro.sample(ob.name, d, obs=value)

    return model


def make_guide(spec: LGSpec) -> Callable[[], None]:
    """The Pyro guide of ``spec`` (no arguments); params are created from ``init_params``."""
    inits = init_params(spec)

    def guide():
        z = {}
        with _plate(spec):
            for site in spec.guide:
                loc = pyro.param(param_f(site.name), inits[param_f(site.name)].clone())
                for parent in site.parents:
                    name = param_e(site.name, parent)
                    loc = loc + pyro.param(name, inits[name].clone()) * z[parent]
                logg = pyro.param(param_logg(site.name), inits[param_logg(site.name)].clone())
                with _site_context(spec.guide_scale.get(site.name), spec.guide_mask.get(site.name)):
                    z[site.name] = pyro.sample(
                        site.name,
                        dist.Normal(loc, logg.exp()),
                        infer=dict(spec.guide_infer.get(site.name, {})),
                    )

    return guide


# ---------------------------------------------------------------------------------------
# exact reference


def _weight(scale: Optional[float], mask: Optional[bool]) -> float:
    w = 1.0 if scale is None else float(scale)
    return 0.0 if mask is False else w


def guide_moments(spec: LGSpec, params: Dict[str, torch.Tensor]):
    """Mean ``m`` and covariance ``S`` of the latents under the guide (model-order index)."""
    idx = {name: i for i, name in enumerate(spec.latent_names)}
    n = len(idx)
    E = torch.zeros(n, n, dtype=DTYPE)
    f = torch.zeros(n, dtype=DTYPE)
    g = torch.zeros(n, dtype=DTYPE)
    # Build with index_put-style out-of-place ops to keep autograd happy.
    rows, cols, vals = [], [], []
    for site in spec.guide:
        for parent in site.parents:
            rows.append(idx[site.name])
            cols.append(idx[parent])
            vals.append(params[param_e(site.name, parent)])
    if vals:
        E = E.index_put((torch.tensor(rows), torch.tensor(cols)), torch.stack(vals))
    order = torch.tensor([idx[site.name] for site in spec.guide])
    f = f.index_put((order,), torch.stack([params[param_f(s.name)] for s in spec.guide]))
    g = g.index_put((order,), torch.stack([params[param_logg(s.name)] for s in spec.guide]).exp())
    A = torch.eye(n, dtype=DTYPE) - E
    m = torch.linalg.solve(A, f)
    L = torch.linalg.solve(A, torch.diag(g))
    return m, L @ L.T


def exact_elbo(spec: LGSpec, params: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Exact (scaled/masked) ELBO of ``spec`` at guide params ``params`` (see module doc)."""
    idx = {name: i for i, name in enumerate(spec.latent_names)}
    n = len(idx)
    m, S = guide_moments(spec, params)

    def expected_sq(u: torch.Tensor, const: float) -> torch.Tensor:
        # E_q[(u^T z - const)^2]
        return u @ S @ u + (u @ m - const) ** 2

    total = torch.zeros((), dtype=DTYPE)
    for lat in spec.model:
        u = torch.zeros(n, dtype=DTYPE)
        u[idx[lat.name]] = 1.0
        for parent, coef in lat.parents.items():
            u[idx[parent]] -= coef
        logp = -0.5 * LOG_2PI - math.log(lat.scale) - 0.5 * expected_sq(u, lat.loc) / lat.scale**2
        total = (
            total + _weight(spec.model_scale.get(lat.name), spec.model_mask.get(lat.name)) * logp
        )
    for site in spec.guide:
        logq = -0.5 * LOG_2PI - params[param_logg(site.name)] - 0.5
        w = _weight(spec.guide_scale.get(site.name), spec.guide_mask.get(site.name))
        total = total - w * logq
    for ob in spec.obs:
        u = torch.zeros(n, dtype=DTYPE)
        for parent, coef in ob.parents.items():
            u[idx[parent]] += coef
        logp = (
            -0.5 * LOG_2PI
            - math.log(ob.scale)
            - 0.5 * expected_sq(u, ob.value - ob.loc) / ob.scale**2
        )
        total = total + _weight(spec.model_scale.get(ob.name), spec.model_mask.get(ob.name)) * logp
    return total


def exact_site_terms(spec: LGSpec, params: Dict[str, torch.Tensor], name: str):
    r"""``(E_q[log q_s - log p_s], E_q[KL(q_s(.|pa_q(s)) || p_s(.|pa_p(s)))])`` unweighted.

    The second is the expectation over the guide of the Gaussian KL

    .. math:: \mathrm{KL} = \log\frac{s}{g} + \frac{g^2 + (\mu_q - \mu_p)^2}{2 s^2}
              - \tfrac12,

    with :math:`\mu_q - \mu_p = v^\top z + f - b` linear in the latents, so
    :math:`\mathbb E_q[(\mu_q-\mu_p)^2] = v^\top S v + (v^\top m + f - b)^2`.
    The two agree whenever the rule of :func:`analytic_expected` allows the KL.
    """
    idx = {n: i for i, n in enumerate(spec.latent_names)}
    n = len(idx)
    m, S = guide_moments(spec, params)
    lat = next(x for x in spec.model if x.name == name)
    site = next(x for x in spec.guide if x.name == name)
    u = torch.zeros(n, dtype=DTYPE)
    u[idx[name]] = 1.0
    for parent, coef in lat.parents.items():
        u[idx[parent]] -= coef
    logp = (
        -0.5 * LOG_2PI
        - math.log(lat.scale)
        - 0.5 * (u @ S @ u + (u @ m - lat.loc) ** 2) / lat.scale**2
    )
    logg = params[param_logg(name)]
    logq = -0.5 * LOG_2PI - logg - 0.5
    v = torch.zeros(n, dtype=DTYPE)  # mu_q - mu_p = v^T z + f - b
    for parent, coef in lat.parents.items():
        v[idx[parent]] -= coef
    for parent in site.parents:
        onehot = torch.zeros(n, dtype=DTYPE)
        onehot[idx[parent]] = 1.0
        v = v + params[param_e(name, parent)] * onehot
    f = params[param_f(name)]
    sq = v @ S @ v + (v @ m + f - lat.loc) ** 2
    kl = math.log(lat.scale) - logg + (torch.exp(2 * logg) + sq) / (2 * lat.scale**2) - 0.5
    return logq - logp, kl


def exact_loss_and_grad(spec: LGSpec) -> Tuple[float, Dict[str, float]]:
    """``-exact_elbo`` and its exact gradient w.r.t. every guide param, at the inits."""
    params = {k: v.clone().requires_grad_() for k, v in init_params(spec).items()}
    loss = -exact_elbo(spec, params)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return loss.item(), {k: 0.0 if gr is None else gr.item() for k, gr in zip(params.keys(), grads)}


# ---------------------------------------------------------------------------------------
# structure


def guide_descendants(spec: LGSpec) -> Dict[str, frozenset]:
    """Transitive guide children of each latent (any spec whose ``guide`` nodes, in guide
    order, have ``name`` and ``parents``)."""
    children: Dict[str, set] = {site.name: set() for site in spec.guide}
    for site in spec.guide:
        for parent in site.parents:
            children[parent].add(site.name)
    out: Dict[str, frozenset] = {}
    for site in reversed(spec.guide):  # children come later in guide order
        desc = set(children[site.name])
        for child in children[site.name]:
            desc |= out[child]
        out[site.name] = frozenset(desc)
    return out


def analytic_expected(spec: LGSpec) -> set:
    """Latents whose model parents contain none of their guide descendants."""
    desc = guide_descendants(spec)
    return {lat.name for lat in spec.model if not (set(lat.parents) & desc[lat.name])}


# ---------------------------------------------------------------------------------------
# estimation helpers


@dataclass
class Estimate:
    """Batch means of an estimator: ``losses[b]``, ``grads[name][b]`` for ``b < M``."""

    losses: torch.Tensor
    grads: Dict[str, torch.Tensor]

    @staticmethod
    def _mean_se(x: torch.Tensor) -> Tuple[float, float]:
        return x.mean().item(), (x.std() / math.sqrt(x.numel())).item()

    def loss_mean_se(self) -> Tuple[float, float]:
        return self._mean_se(self.losses)

    def grad_mean_se(self, name: str) -> Tuple[float, float]:
        return self._mean_se(self.grads[name])


def estimate(
    elbo, spec: LGSpec, num_batches: int, model=None, guide=None, seed: int = 0
) -> Estimate:
    """Run ``elbo.differentiable_loss`` ``num_batches`` times at the initial params.

    Each batch is one vectorized call (``elbo.num_particles`` particles); the batch
    means are i.i.d., so their spread gives standard errors.
    """
    model = make_model(spec) if model is None else model
    guide = make_guide(spec) if guide is None else guide
    pyro.set_rng_seed(seed)
    params = reset_param_store(spec)
    names = list(params)
    losses, grads = [], {name: [] for name in names}
    for _ in range(num_batches):
        loss = elbo.differentiable_loss(model, guide)
        gs = torch.autograd.grad(loss, [params[k] for k in names], allow_unused=True)
        losses.append(loss.detach().reshape(()))
        for k, gr in zip(names, gs):
            grads[k].append(torch.zeros((), dtype=DTYPE) if gr is None else gr.reshape(()))
    return Estimate(torch.stack(losses), {k: torch.stack(v) for k, v in grads.items()})


def check_unbiased(est: Estimate, spec: LGSpec, n_se: float = 5.0) -> List[str]:
    """Compare batch means with the exact loss/gradient; return a list of failures."""
    loss, grad = exact_loss_and_grad(spec)
    failures = []

    def check(what: str, mean: float, se: float, exact: float) -> None:
        tol = n_se * se + 1e-7 * (1.0 + abs(exact))
        if not abs(mean - exact) <= tol:
            failures.append(
                f"{what}: estimate {mean:.6g} +- {se:.3g} (SE) vs exact {exact:.6g} "
                f"({(mean - exact) / max(se, 1e-300):.2f} SE)"
            )

    check("loss", *est.loss_mean_se(), loss)
    for name, exact in grad.items():
        check(f"grad[{name}]", *est.grad_mean_se(name), exact)
    return failures


def chain_names(prefix: str, n: int) -> Sequence[str]:
    return [f"{prefix}{t}" for t in range(1, n + 1)]


# ---------------------------------------------------------------------------------------
# estimators under test

ESTIMATORS = ("trace", "markov_kl")


def markov_kl_class():
    """``TraceMarkovKL_ELBO`` or ``None`` while the core does not import."""
    try:
        from pyro_markov_kl import TraceMarkovKL_ELBO
    except ImportError:
        return None
    return TraceMarkovKL_ELBO


def make_elbo(kind: str, num_particles: int, spec: LGSpec):
    """``kind`` is ``"trace"`` (Pyro's unbiased ``Trace_ELBO``) or ``"markov_kl"``."""
    kwargs = dict(
        num_particles=num_particles,
        vectorize_particles=True,
        max_plate_nesting=spec.max_plate_nesting,
    )
    if kind == "trace":
        return pyro.infer.Trace_ELBO(**kwargs)
    cls = markov_kl_class()
    if cls is None:
        import pytest

        pytest.skip("pyro_markov_kl.TraceMarkovKL_ELBO is not importable yet")
    return cls(**kwargs)


def check_plan(plan, spec: LGSpec) -> List[str]:
    """Compare ``elbo.explain(...)`` with the spec's structure and the analytic-KL rule."""
    failures = []
    expected = analytic_expected(spec)
    desc = guide_descendants(spec)
    model_pa = {lat.name: frozenset(lat.parents) for lat in spec.model}
    guide_pa = {site.name: frozenset(site.parents) for site in spec.guide}
    for name in spec.latent_names:
        if name not in plan.sites:
            failures.append(f"{name}: missing from plan.sites")
            continue
        want = "analytic" if name in expected else "mc"
        failures += site_failures(name, name, plan.sites[name], want, model_pa, guide_pa, desc)
    return failures


def site_failures(
    name: str, label: str, site, want: str, model_pa: dict, guide_pa: dict, desc: dict
) -> List[str]:
    """A plan's site against the expected estimator and the structural parent and
    descendant sets (``label`` names the site in the estimator message)."""
    failures = []
    if site.estimator != want:
        failures.append(
            f"{label}: estimator {site.estimator!r}, rule says {want!r} "
            f"(model parents {sorted(model_pa[name])}, guide descendants "
            f"{sorted(desc[name])}); reason={site.reason!r}"
        )
    for attr, truth in (
        ("model_parents", model_pa[name]),
        ("guide_parents", guide_pa[name]),
        ("guide_descendants", desc[name]),
    ):
        got = frozenset(getattr(site, attr))
        if got != truth:
            failures.append(f"{name}: {attr} {sorted(got)} != {sorted(truth)}")
    return failures
