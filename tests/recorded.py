# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

r"""Random programs whose latents reach later sites through recorded values and handler
factors, with exact references where they exist (test support for
``tests/test_property_recorded.py``).

A :class:`Program` is a model (a list of :class:`MNode` in sampling order) and a guide (a
list of :class:`GNode`), interpreted both as Pyro callables (:func:`make_model`,
:func:`make_guide`, vectorised-particle friendly) and, where the program is *exact*
(:meth:`Program.exact`), as a closed-form ELBO (:func:`exact_elbo`). Model nodes:

* ``normal``: ``z ~ Normal(loc + sum_j c_j v_j, scale)``, optionally wrapped in
  ``TransformedDistribution(., [AffineTransform(TLOC, t)])`` (``transform=t``);
* ``bernoulli`` / ``categorical`` (3 values): logits ``loc + sum_j c_j v_j`` over
  discrete-valued parents (for a categorical, ``loc`` and ``c_j`` are 3-vectors);
* ``det``: ``pyro.deterministic(name, fn(v_source))``;
* ``obs``: ``x ~ Normal(loc + sum_j c_j v_j, scale)`` observed at ``fn(v_source)`` (a value
  computed from a latent) or at the constant ``data``; its value feeds later sites.

``v_j`` is the value of an earlier node (a categorical's value as a float). Any latent or
observed model site may carry ``poutine.scale`` (a constant, or ``fn(v_source)`` > 0) and
``poutine.mask`` (a constant, or ``v_source > c``); Gaussian guide sites too. Guide nodes are
the same latents (params: ``loc``, coefficients, log-scale) plus ``det`` values computed in
the guide without a site (Pyro rejects nothing here, but ``TraceMarkovKL_ELBO`` rejects an
observed guide site, so ``pyro.deterministic`` in a guide is checked apart). Guide edges and
guide transforms may depend on the call's keyword arguments (:attr:`GNode.switch`,
:attr:`GNode.transform`).

**Exact reference.** Discrete nodes only have discrete-valued parents on both sides, so the
guide's discrete part can be enumerated; given the discrete values, every Gaussian-valued
quantity is affine in the Gaussian latents if functions of Gaussian sources are affine
(``lin``) and no factor has a Gaussian source, which is what :meth:`Program.exact` checks.
Then (as in :mod:`lg`) the guide is ``z = E z + f + G eps``, every Gaussian term has a
quadratic expectation, and

.. math:: \mathcal L = \sum_k q(k)\,\Big[\sum_{\text{model}} w^p(k)\,\mathbb E[\log p \mid k]
          - \sum_{\text{guide}} w^q(k)\,\mathbb E[\log q \mid k]\Big],

autograd giving the exact gradient.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch.distributions.transforms import AffineTransform

DTYPE = torch.float64
LOG_2PI = math.log(2 * math.pi)
TLOC = 0.2  # the loc of every AffineTransform
DISCRETE = ("bernoulli", "categorical")
LATENT = ("normal",) + DISCRETE


# ---------------------------------------------------------------------------------------
# specification


@dataclass(frozen=True)
class Fn:
    """``lin``: a v + b; ``sq``: a v^2 + b; ``tanh``: a tanh(v) + b; ``exp``: exp(a v);
    ``pos``: b + a v (positive for v >= 0 and a, b > 0)."""

    kind: str
    a: float
    b: float = 0.0

    def __call__(self, v):
        if self.kind == "lin":
            return self.a * v + self.b
        if self.kind == "sq":
            return self.a * v * v + self.b
        if self.kind == "tanh":
            return self.a * torch.tanh(v) + self.b
        if self.kind == "exp":
            return torch.exp(self.a * v) if torch.is_tensor(v) else math.exp(self.a * v)
        if self.kind == "pos":
            return self.b + self.a * v
        raise ValueError(self.kind)


@dataclass(frozen=True)
class Scale:
    """``poutine.scale(scale=c)`` or, with a source, ``scale=fn(v_source)``."""

    source: Optional[str] = None
    fn: Optional[Fn] = None
    c: float = 1.0


@dataclass(frozen=True)
class Mask:
    """``poutine.mask(mask=c)`` (a bool) or, with a source, ``mask=v_source > c``."""

    source: Optional[str] = None
    c: Any = True


@dataclass
class MNode:
    name: str
    kind: str  # normal, bernoulli, categorical, det, obs
    parents: Dict[str, Any] = field(default_factory=dict)
    loc: Any = 0.0
    scale: float = 1.0
    source: Optional[str] = None  # det, obs: value fn(v_source)
    fn: Optional[Fn] = None
    data: float = 0.0  # obs without a source
    transform: Optional[float] = None  # normal: model AffineTransform scale


@dataclass(frozen=True)
class TSwitch:
    """The guide's AffineTransform scale: ``kwargs[key]`` (a float), or ``table[kwargs[key]]``."""

    key: str
    table: Optional[Tuple[Tuple[Any, float], ...]] = None

    def value(self, kwargs: dict) -> float:
        x = kwargs[self.key]
        return float(x) if self.table is None else dict(self.table)[x]


@dataclass
class GNode:
    name: str
    kind: str  # normal, bernoulli, categorical, det (a value, no site)
    parents: Dict[str, Any] = field(default_factory=dict)  # param inits
    loc: Any = 0.0
    scale: float = 1.0
    source: Optional[str] = None
    fn: Optional[Fn] = None
    # parent -> (kwarg, value): the edge is used only when kwargs[kwarg] == value
    switch: Dict[str, Tuple[str, Any]] = field(default_factory=dict)
    transform: Optional[TSwitch] = None


@dataclass
class Program:
    seed: int
    focus: str
    model: List[MNode]
    guide: List[GNode]
    model_scale: Dict[str, Scale] = field(default_factory=dict)
    model_mask: Dict[str, Mask] = field(default_factory=dict)
    guide_scale: Dict[str, Scale] = field(default_factory=dict)
    guide_mask: Dict[str, Mask] = field(default_factory=dict)
    settings: List[dict] = field(default_factory=lambda: [{}])

    def __post_init__(self):
        self.mnodes = {n.name: n for n in self.model}
        self.gnodes = {n.name: n for n in self.guide}
        self.kinds = {n.name: n.kind for n in self.model}
        self.kinds.update({n.name: "gdet" for n in self.guide if n.kind == "det"})
        latents = [n.name for n in self.model if n.kind in LATENT]
        assert sorted(latents) == sorted(n.name for n in self.guide if n.kind in LATENT)

    @property
    def latents(self) -> List[str]:
        return [n.name for n in self.model if n.kind in LATENT]

    @property
    def gaussians(self) -> List[str]:
        return [n.name for n in self.model if n.kind == "normal"]

    @property
    def discretes(self) -> List[str]:
        return [n.name for n in self.model if n.kind in DISCRETE]

    def root(self, name: str) -> str:
        """The latent a value comes from (itself for a latent or a constant observation)."""
        node = self.mnodes.get(name) or self.gnodes[name]
        return node.source if node.kind in ("det", "obs") and node.source else name

    def gaussian_valued(self, name: str) -> bool:
        return self.kinds.get(self.root(name)) == "normal" or (
            self.kinds.get(name) == "obs" and self.mnodes[name].source is None
        )

    def exact(self) -> bool:
        """Whether :func:`exact_elbo` applies (see the module docstring)."""
        for node in self.model + self.guide:
            if node.kind in ("det", "obs") and node.source is not None:
                if self.kinds[node.source] == "normal" and node.fn.kind != "lin":
                    return False
        for factors in (self.model_scale, self.model_mask, self.guide_scale, self.guide_mask):
            for f in factors.values():
                if f.source is not None and self.kinds[f.source] == "normal":
                    return False
        return True

    def describe(self) -> str:
        lines = [f"Program(seed={self.seed}, focus={self.focus!r}, settings={self.settings})"]
        for side, nodes in (("model", self.model), ("guide", self.guide)):
            lines.append(f"  {side}:")
            for n in nodes:
                extra = {k: v for k, v in vars(n).items() if k not in ("name", "kind") and v}
                lines.append(f"    {n.name} [{n.kind}] {extra}")
        for what in ("model_scale", "model_mask", "guide_scale", "guide_mask"):
            if getattr(self, what):
                lines.append(f"  {what}: {getattr(self, what)}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# guide parameters


def p_loc(name):
    return f"loc__{name}"


def p_logscale(name):
    return f"logscale__{name}"


def p_coef(child, parent):
    return f"coef__{child}__{parent}"


def _t(x):
    return torch.tensor(x, dtype=DTYPE)


def init_params(prog: Program) -> Dict[str, torch.Tensor]:
    out = {}
    for n in prog.guide:
        if n.kind == "det":
            continue
        out[p_loc(n.name)] = _t(n.loc)
        for parent, c in n.parents.items():
            out[p_coef(n.name, parent)] = _t(c)
        if n.kind == "normal":
            out[p_logscale(n.name)] = _t(math.log(n.scale))
    return out


def register_params(prog: Program) -> Dict[str, torch.Tensor]:
    pyro.clear_param_store()
    init = init_params(prog)
    for k, v in init.items():
        pyro.param(k, v.clone())
    store = dict(pyro.get_param_store().named_parameters())
    return {k: store[k] for k in init}


# ---------------------------------------------------------------------------------------
# Pyro callables


def _val(values, name):
    return values[name].to(DTYPE)


def _linear(values, parents, loc, categorical):
    """``loc + sum_j c_j v_j``; for a categorical, a 3-vector per particle."""
    out = loc if torch.is_tensor(loc) else _t(loc)
    for parent, c in parents.items():
        c = c if torch.is_tensor(c) else _t(c)
        v = _val(values, parent)
        out = out + (c * v.unsqueeze(-1) if categorical else c * v)
    return out


def _factors(scale: Optional[Scale], mask: Optional[Mask], values) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    if scale is not None:
        s = scale.c if scale.source is None else scale.fn(_val(values, scale.source))
        stack.enter_context(poutine.scale(scale=s))
    if mask is not None:
        m = mask.c if mask.source is None else _val(values, mask.source) > mask.c
        stack.enter_context(poutine.mask(mask=m))
    return stack


def _latent_dist(kind, loc, scale, transform):
    if kind == "normal":
        d = dist.Normal(loc, scale)
        if transform is not None:
            d = dist.TransformedDistribution(d, [AffineTransform(TLOC, transform)])
        return d
    if kind == "bernoulli":
        return dist.Bernoulli(logits=loc)
    return dist.Categorical(logits=loc)


def make_model(prog: Program):
    def model(**kwargs):
        values = {}
        for n in prog.model:
            if n.kind == "det":
                values[n.name] = pyro.deterministic(n.name, n.fn(_val(values, n.source)))
                continue
            with _factors(prog.model_scale.get(n.name), prog.model_mask.get(n.name), values):
                loc = _linear(values, n.parents, n.loc, n.kind == "categorical")
                if n.kind == "obs":
                    if n.source is None:
                        value = _t(n.data)
                    else:
                        value = n.fn(_val(values, n.source))
                    values[n.name] = pyro.sample(n.name, dist.Normal(loc, _t(n.scale)), obs=value)
                else:
                    d = _latent_dist(n.kind, loc, _t(n.scale), n.transform)
                    values[n.name] = pyro.sample(n.name, d)

    return model


def edge_active(node: GNode, parent: str, kwargs: dict) -> bool:
    sw = node.switch.get(parent)
    return sw is None or kwargs.get(sw[0]) == sw[1]


def make_guide(prog: Program):
    inits = init_params(prog)

    def param(name):
        return pyro.param(name, inits[name].clone())

    def guide(**kwargs):
        values = {}
        for n in prog.guide:
            if n.kind == "det":
                values[n.name] = n.fn(_val(values, n.source))  # a value without a site
                continue
            coefs = {p: param(p_coef(n.name, p)) for p in n.parents}  # every param, always
            active = {p: c for p, c in coefs.items() if edge_active(n, p, kwargs)}
            loc = _linear(values, active, param(p_loc(n.name)), n.kind == "categorical")
            with _factors(prog.guide_scale.get(n.name), prog.guide_mask.get(n.name), values):
                scale = param(p_logscale(n.name)).exp() if n.kind == "normal" else None
                t = None if n.transform is None else n.transform.value(kwargs)
                values[n.name] = pyro.sample(n.name, _latent_dist(n.kind, loc, scale, t))

    return guide


# ---------------------------------------------------------------------------------------
# exact reference


def _domain(kind):
    return (0, 1) if kind == "bernoulli" else (0, 1, 2)


def _log_pmf(kind, logits, k):
    if kind == "bernoulli":
        return (
            -torch.nn.functional.softplus(-logits) if k else -torch.nn.functional.softplus(logits)
        )
    return torch.log_softmax(logits, -1)[k]


def exact_elbo(prog: Program, params: Dict[str, torch.Tensor], kwargs: dict) -> torch.Tensor:
    """The exact ELBO of an exact program at ``params`` for the call ``**kwargs``."""
    assert prog.exact()
    gs = prog.gaussians
    idx = {g: i for i, g in enumerate(gs)}
    n = len(gs)
    zero = torch.zeros(n, dtype=DTYPE)
    total = torch.zeros((), dtype=DTYPE)
    discretes = prog.discretes
    for config in itertools.product(*(_domain(prog.kinds[d]) for d in discretes)):
        k = dict(zip(discretes, config))
        # affine values (u, c): value = u . z + c
        vals: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        for d in discretes:
            vals[d] = (zero, _t(float(k[d])))
        for g in gs:
            e = zero.clone()
            e[idx[g]] = 1.0
            vals[g] = (e, _t(0.0))

        def apply(fn, src, vals=vals):
            u, c = vals[src]
            if prog.kinds[src] == "normal":  # affine (lin) by exactness
                return fn.a * u, fn.a * c + fn.b
            return zero, fn(c)

        def const(x):  # a factor value, constant given the config
            return x if torch.is_tensor(x) else _t(float(x))

        def weight(scale, mask, vals=vals):
            w = _t(1.0)
            if scale is not None:
                w = w * const(scale.c if scale.source is None else scale.fn(vals[scale.source][1]))
            if mask is not None:
                on = mask.c if mask.source is None else bool(vals[mask.source][1] > mask.c)
                w = w * float(on)
            return w

        # guide: discrete probability and the Gaussian linear system
        log_qk = _t(0.0)
        rows, fvec, gvec = [], [None] * n, [None] * n
        E = torch.zeros(n, n, dtype=DTYPE)
        guide_terms = _t(0.0)
        for node in prog.guide:
            if node.kind == "det":
                vals[node.name] = apply(node.fn, node.source)
                continue
            active = [p for p in node.parents if edge_active(node, p, kwargs)]
            if node.kind in DISCRETE:
                logits = params[p_loc(node.name)]
                for p in active:
                    logits = logits + params[p_coef(node.name, p)] * vals[p][1]
                log_qk = log_qk + _log_pmf(node.kind, logits, k[node.name])
                continue
            u, c = zero, params[p_loc(node.name)]
            for p in active:
                coef = params[p_coef(node.name, p)]
                u, c = u + coef * vals[p][0], c + coef * vals[p][1]
            lg = params[p_logscale(node.name)]
            if node.transform is not None:
                t = node.transform.value(kwargs)
                u, c, lg = t * u, TLOC + t * c, lg + math.log(abs(t))
            rows.append((idx[node.name], u))
            fvec[idx[node.name]], gvec[idx[node.name]] = c, lg.exp()
            w = weight(prog.guide_scale.get(node.name), prog.guide_mask.get(node.name))
            guide_terms = guide_terms + w * (-0.5 * LOG_2PI - lg - 0.5)
        if n:
            E = torch.stack([dict(rows)[i] for i in range(n)])
            A = torch.eye(n, dtype=DTYPE) - E
            m = torch.linalg.solve(A, torch.stack(fvec))
            L = torch.linalg.solve(A, torch.diag(torch.stack(gvec)))
            S = L @ L.T
        else:
            m, S = zero, torch.zeros(0, 0, dtype=DTYPE)

        def gauss_logp(ru, rc, s, m=m, S=S):  # E log N(r; 0, s) for r = ru . z + rc
            sq = ru @ S @ ru + (ru @ m + rc) ** 2
            return -0.5 * LOG_2PI - math.log(s) - 0.5 * sq / s**2

        model_terms = _t(0.0)
        for node in prog.model:
            if node.kind == "det":
                vals[node.name] = apply(node.fn, node.source)
                continue
            w = weight(prog.model_scale.get(node.name), prog.model_mask.get(node.name))
            if node.kind in DISCRETE:
                logits = _t(node.loc)
                for p, coef in node.parents.items():
                    logits = logits + _t(coef) * vals[p][1]
                model_terms = model_terms + w * _log_pmf(node.kind, logits, k[node.name])
                continue
            mu, mc = zero, _t(node.loc)
            for p, coef in node.parents.items():
                mu, mc = mu + coef * vals[p][0], mc + coef * vals[p][1]
            s = node.scale
            if node.kind == "normal":
                if node.transform is not None:
                    t = node.transform
                    mu, mc, s = t * mu, TLOC + t * mc, abs(t) * s
                vu, vc = vals[node.name]
            else:  # obs
                vu, vc = (
                    (zero, _t(node.data)) if node.source is None else apply(node.fn, node.source)
                )
                vals[node.name] = (vu, vc)
            model_terms = model_terms + w * gauss_logp(vu - mu, vc - mc, s)
        total = total + log_qk.exp() * (model_terms - guide_terms - log_qk)
    return total


def exact_loss_and_grad(prog: Program, kwargs: dict) -> Tuple[float, Dict[str, torch.Tensor]]:
    params = {k: v.clone().requires_grad_() for k, v in init_params(prog).items()}
    loss = -exact_elbo(prog, params, kwargs)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return loss.item(), {
        k: torch.zeros_like(params[k]) if g is None else g for k, g in zip(params, grads)
    }


# ---------------------------------------------------------------------------------------
# structure: what the plan must say


def _guide_inputs(prog: Program, node: GNode, kwargs: dict, with_factors: bool) -> set:
    """Latents flowing into a guide site's distribution (and factors), through guide values."""
    out = set()
    for p in node.parents:
        if edge_active(node, p, kwargs):
            out.add(prog.gnodes[p].source if prog.gnodes[p].kind == "det" else p)
    if with_factors:
        for f in (prog.guide_scale.get(node.name), prog.guide_mask.get(node.name)):
            if f is not None and f.source is not None:
                out.add(f.source)
    return out


def guide_descendants(prog: Program, kwargs: dict) -> Dict[str, frozenset]:
    """Latents whose sampled value depends on each latent in the guide, transitively."""
    children = {name: set() for name in prog.latents}
    for node in prog.guide:
        if node.kind in LATENT:
            for p in _guide_inputs(prog, node, kwargs, with_factors=False):
                children[p].add(node.name)
    out: Dict[str, frozenset] = {}
    order = [n.name for n in prog.guide if n.kind in LATENT]
    for name in reversed(order):
        desc = set(children[name])
        for c in children[name]:
            desc |= out[c]
        out[name] = frozenset(desc)
    return out


def model_inputs(prog: Program, name: str) -> frozenset:
    """Latents whose values flow into a model site's term (distribution, observed value or
    factor), through recorded values: what the plan's ``model_parents`` must contain."""
    node = prog.mnodes[name]
    out = set()
    for p in node.parents:
        if prog.kinds[prog.root(p)] in LATENT:
            out.add(prog.root(p))
    if node.kind == "obs" and node.source is not None:
        out.add(node.source)
    for f in (prog.model_scale.get(name), prog.model_mask.get(name)):
        if f is not None and f.source is not None:
            out.add(f.source)
    out.discard(name)
    return frozenset(out)


def must_be_mc(prog: Program, kwargs: dict) -> Dict[str, frozenset]:
    """Latents whose model term has an input that is a guide descendant: ``{site: culprits}``."""
    desc = guide_descendants(prog, kwargs)
    out = {}
    for name in prog.latents:
        bad = model_inputs(prog, name) & desc[name]
        if bad:
            out[name] = bad
    return out


def required_downstream(prog: Program, site: str, kwargs: dict) -> frozenset:
    """Terms whose value depends on a guide site's sample: what its score-function cost must
    hold (model terms of latents and observations, guide terms of other latents)."""
    affected = {site} | guide_descendants(prog, kwargs)[site]
    out = set()
    for node in prog.model:
        if node.kind == "det":
            continue
        own = {node.name} if node.kind in LATENT else set()
        if (model_inputs(prog, node.name) | own) & affected:
            out.add(node.name)
    for node in prog.guide:
        if node.kind in LATENT:
            if (_guide_inputs(prog, node, kwargs, with_factors=True) | {node.name}) & affected:
                out.add(node.name)
    out.discard(site)
    return frozenset(out)


def plan_failures(plan, prog: Program, kwargs: dict) -> List[str]:
    failures = []
    mc = must_be_mc(prog, kwargs)
    for name in prog.latents:
        rec = plan.sites.get(name)
        if rec is None:
            failures.append(f"{name}: missing from the plan")
            continue
        if name in mc and rec.estimator != "mc":
            failures.append(
                f"{name}: estimator {rec.estimator!r} but model input(s) {sorted(mc[name])} "
                f"are guide descendants; model_parents={sorted(rec.model_parents)}"
            )
        missing = model_inputs(prog, name) - set(rec.model_parents)
        if missing:
            failures.append(
                f"{name}: model_parents {sorted(rec.model_parents)} lack {sorted(missing)}"
            )
        gnode = prog.gnodes[name]
        if gnode.transform is not None:
            equal = gnode.transform.value(kwargs) == prog.mnodes[name].transform
            rule = getattr(rec.kl_rule, "description", "") or ""
            if not equal and "equal transforms" in rule:
                failures.append(f"{name}: unequal transforms {kwargs} but the KL rule is {rule!r}")
            clash = set(rec.model_parents) & set(rec.guide_descendants)
            if equal and not clash and name not in mc and rec.estimator != "analytic":
                failures.append(f"{name}: equal transforms {kwargs} but {rec.reason!r}")
        if prog.kinds[name] in DISCRETE:
            missing = required_downstream(prog, name, kwargs) - set(rec.downstream)
            if missing:
                failures.append(
                    f"{name}: downstream {list(rec.downstream)} lacks {sorted(missing)}"
                )
    return failures


# ---------------------------------------------------------------------------------------
# estimation and comparison


@dataclass
class Batches:
    """Per-batch loss and flattened gradient, ``losses[b]``, ``grads[b, j]``."""

    losses: List[torch.Tensor] = field(default_factory=list)
    grads: List[torch.Tensor] = field(default_factory=list)

    def stats(self):
        L, G = torch.stack(self.losses), torch.stack(self.grads)
        r = math.sqrt(L.numel())
        return L.mean(), L.std() / r, G.mean(0), G.std(0) / r


def coordinates(prog: Program) -> List[str]:
    out = []
    for k, v in init_params(prog).items():
        out += [k] if v.dim() == 0 else [f"{k}[{i}]" for i in range(v.numel())]
    return out


def run_batches(
    elbo, prog: Program, settings: List[dict], num_batches: int, seed: int, model=None, guide=None
):
    """``num_batches`` calls of ``elbo.differentiable_loss`` per setting, the settings
    alternating call by call on the same ``elbo`` and callables (so a plan built for one
    setting is offered to the next)."""
    model = make_model(prog) if model is None else model
    guide = make_guide(prog) if guide is None else guide
    pyro.set_rng_seed(seed)
    params = register_params(prog)
    leaves = list(params.values())
    out = [Batches() for _ in settings]
    for _ in range(num_batches):
        for i, kwargs in enumerate(settings):
            loss = elbo.differentiable_loss(model, guide, **kwargs)
            gs = torch.autograd.grad(loss, leaves, allow_unused=True)
            out[i].losses.append(loss.detach().reshape(()))
            out[i].grads.append(
                torch.cat(
                    [
                        (torch.zeros_like(p) if g is None else g).reshape(-1)
                        for p, g in zip(leaves, gs)
                    ]
                )
            )
    return out


def compare(label, coords, a, b=None, exact=None, n_se=5.0, abs_tol=1e-7):
    """z-scores of batches ``a`` against batches ``b`` (SE of the difference) or against exact
    values ``(loss, flat_grad)``; returns ``(failures, max |z|)``."""
    la, sla, ga, sga = a.stats()
    if b is not None:
        lb, slb, gb, sgb = b.stats()
        se_l, se_g = (sla**2 + slb**2).sqrt(), (sga**2 + sgb**2).sqrt()
    else:
        lb, gb = _t(exact[0]), exact[1]
        se_l, se_g = sla, sga
    failures, zmax = [], 0.0
    for what, m, ref, se in [("loss", la, lb, se_l)] + [
        (f"grad[{c}]", ga[j], gb[j], se_g[j]) for j, c in enumerate(coords)
    ]:
        diff = abs((m - ref).item())
        tol_extra = abs_tol * (1 + abs(ref.item()))
        z = 0.0 if diff <= tol_extra else diff / max(se.item(), 1e-300)
        zmax = max(zmax, z)
        if z > n_se:
            failures.append(
                f"{label} {what}: {m.item():.6g} vs {ref.item():.6g} "
                f"(SE {se.item():.3g}, z={z:.1f})"
            )
    return failures, zmax


# ---------------------------------------------------------------------------------------
# the generator

FOCI = ("det", "obs", "factor", "flag", "transform")


def _sign(rng, lo, hi):
    mag = rng.uniform(lo, hi)
    return -mag if rng.random() < 0.5 else mag


def random_program(seed: int) -> Program:
    """A random program; ``FOCI[seed % 5]`` decides which family it stresses."""
    rng = random.Random(seed)
    focus = FOCI[seed % len(FOCI)]
    exact = rng.random() < 0.7
    kinds = {
        f"r{i}": rng.choice(["bernoulli", "bernoulli", "categorical"])
        for i in range(rng.randint(1, 2))
    }
    kinds.update({f"z{i}": "normal" for i in range(rng.randint(2, 3))})
    latents = list(kinds)
    rng.shuffle(latents)
    p_det = 0.7 if focus == "det" else 0.25
    p_obs = 0.7 if focus == "obs" else 0.25
    p_factor = 0.5 if focus == "factor" else 0.15
    p_gdet = 0.5 if focus == "det" else 0.2
    if focus in ("flag", "transform") and (seed // 5) % 2:
        # switches alone: no recorded values or latent factors, so that on a plan cache that
        # ignores the switch nothing but the stale plan can fail
        p_det = p_obs = p_gdet = 0.0
        exact = True
    no_latent_factors = p_det == 0.0

    def fn_for(src, positive=False):
        gauss = kinds[src] == "normal"
        if positive:
            if gauss:
                return Fn("exp", _sign(rng, 0.1, 0.4))
            return rng.choice(
                [
                    Fn("exp", _sign(rng, 0.2, 0.7)),
                    Fn("pos", rng.uniform(0.3, 1.5), rng.uniform(0.3, 1.0)),
                ]
            )
        if gauss and (exact or rng.random() < 0.5):
            return Fn("lin", _sign(rng, 0.5, 1.5), rng.uniform(-0.5, 0.5))
        if gauss:
            return Fn("tanh", _sign(rng, 0.8, 2.0), rng.uniform(-0.5, 0.5))
        return rng.choice(
            [
                Fn("lin", _sign(rng, 0.5, 1.5), rng.uniform(-0.5, 0.5)),
                Fn("sq", _sign(rng, 0.5, 1.2), rng.uniform(-0.5, 0.5)),
            ]
        )

    # model order: latents interleaved with recorded values of them
    order: List[Tuple[str, str, Optional[str]]] = []  # (name, kind, source)
    for u in latents:
        order.append((u, kinds[u], None))
        if rng.random() < p_det:
            order.append((f"d_{u}", "det", u))
        if rng.random() < p_obs:
            order.append((f"x_{u}", "obs", u))
    model: List[MNode] = []
    discrete_valued: set = set()
    earlier: List[str] = []
    for name, kind, src in order:
        if kind == "det":
            model.append(MNode(name, "det", source=src, fn=fn_for(src)))
        else:
            cat = kind == "categorical"
            allowed = [
                p for p in earlier if kind == "normal" or kind == "obs" or p in discrete_valued
            ]
            chosen = [p for p in allowed if rng.random() < 0.5][:3]
            if kind in DISCRETE:
                coef = {
                    p: (
                        tuple(_sign(rng, 0.5, 1.5) for _ in range(3))
                        if cat
                        else _sign(rng, 0.5, 1.5)
                    )
                    for p in chosen
                }
                loc = tuple(rng.uniform(-1, 1) for _ in range(3)) if cat else rng.uniform(-1, 1)
            else:
                coef = {p: _sign(rng, 0.3, 1.2) for p in chosen}
                loc = rng.uniform(-1, 1)
            node = MNode(name, kind, coef, loc, rng.uniform(0.6, 1.5), source=src)
            if kind == "obs":
                node.fn = fn_for(src)
            if kind == "normal" and focus == "transform" and rng.random() < 0.7:
                node.transform = 1.5
            model.append(node)
        if kind in DISCRETE or (src is not None and kinds[src] in DISCRETE):
            discrete_valued.add(name)
        earlier.append(name)
    # data: every latent reaches some observation
    for u in latents:
        if rng.random() < 0.8 or kinds[u] in DISCRETE:
            pa = {u: _sign(rng, 0.5, 1.5)}
            other = rng.choice(earlier)
            if other != u and rng.random() < 0.5:
                pa[other] = _sign(rng, 0.3, 1.0)
            model.append(
                MNode(
                    f"y_{u}",
                    "obs",
                    pa,
                    rng.uniform(-0.5, 0.5),
                    rng.uniform(0.6, 1.5),
                    data=rng.uniform(-2, 2),
                )
            )
    if focus == "transform" and not any(n.transform for n in model):
        next(n for n in model if n.kind == "normal").transform = 1.5

    # factors on model latents and observations, from latents sampled earlier in the model
    model_scale, model_mask = {}, {}
    seen: List[str] = []
    for node in model:
        if node.kind != "det":
            sources = [s for s in seen if exact is False or kinds[s] in DISCRETE]
            sources = [] if no_latent_factors else sources
            if rng.random() < p_factor:
                if sources and rng.random() < 0.75:
                    src = rng.choice(sources)
                    model_scale[node.name] = Scale(src, fn_for(src, positive=True))
                else:
                    model_scale[node.name] = Scale(c=rng.choice([0.5, 2.0]))
            if rng.random() < p_factor:
                if sources and rng.random() < 0.8:
                    src = rng.choice(sources)
                    c = (
                        rng.uniform(-0.5, 0.5)
                        if kinds[src] == "normal"
                        else (0.5 if kinds[src] == "bernoulli" else rng.choice([0.5, 1.5]))
                    )
                    model_mask[node.name] = Mask(src, c)
                else:
                    model_mask[node.name] = Mask(c=rng.random() < 0.5)
        if node.kind in LATENT:
            seen.append(node.name)

    # guide order
    how = rng.choice(["reverse", "reverse", "model", "random"])
    gorder = [n.name for n in model if n.kind in LATENT]
    if how == "reverse":
        gorder.reverse()
    elif how == "random":
        rng.shuffle(gorder)
    guide: List[GNode] = []
    gvals: List[str] = []
    gdiscrete: set = set()
    mby = {n.name: n for n in model}
    for name in gorder:
        kind = kinds[name]
        cat = kind == "categorical"
        allowed = [p for p in gvals if kind == "normal" or p in gdiscrete]
        chosen = [p for p in allowed if rng.random() < 0.5][:2]
        if kind in DISCRETE:
            coef = {
                p: (tuple(_sign(rng, 0.3, 1.0) for _ in range(3)) if cat else _sign(rng, 0.3, 1.0))
                for p in chosen
            }
            loc = tuple(rng.uniform(-1, 1) for _ in range(3)) if cat else rng.uniform(-1, 1)
        else:
            coef = {p: _sign(rng, 0.2, 0.9) for p in chosen}
            loc = rng.uniform(-1, 1)
        node = GNode(name, kind, coef, loc, rng.uniform(0.4, 1.2))
        if mby[name].transform is not None:
            node.transform = (
                TSwitch("tq") if seed % 2 else TSwitch("wide", ((False, 1.5), (True, 2.5)))
            )
        guide.append(node)
        gvals.append(name)
        if kind in DISCRETE:
            gdiscrete.add(name)
        if rng.random() < p_gdet:
            dname = f"g_{name}"
            guide.append(GNode(dname, "det", source=name, fn=fn_for(name)))
            gvals.append(dname)
            if kind in DISCRETE:
                gdiscrete.add(dname)

    prog_settings: List[dict] = [{}]
    if focus == "transform":
        t = next(n.transform for n in guide if n.transform is not None)
        prog_settings = (
            [{"tq": 1.5}, {"tq": 2.5}] if t.key == "tq" else [{"wide": False}, {"wide": True}]
        )
    elif focus == "flag":
        # a guide edge parent -> child used only under the second setting, chosen among those
        # that change what the plan must say (a site that must become Monte Carlo, or a
        # discrete site's cost), if any
        key, values = rng.choice([("flag", (False, True)), ("wiring", ("plain", "rewired"))])
        prog_settings = [{key: values[0]}, {key: values[1]}]
        pos = {n.name: i for i, n in enumerate(guide)}
        cands = []
        for child in guide:
            if child.kind == "det":
                continue
            for parent in guide[: pos[child.name]]:
                if child.kind in DISCRETE and parent.name not in gdiscrete:
                    continue
                cands.append((child, parent))
        if cands:
            good = []
            for child, parent in cands:
                trial = Program(seed, focus, model, guide, model_scale, model_mask)
                old = dict(child.parents), dict(child.switch)
                child.parents.setdefault(parent.name, 0.5)
                child.switch[parent.name] = (key, values[1])
                a, b = prog_settings
                if must_be_mc(trial, a) != must_be_mc(trial, b) or any(
                    required_downstream(trial, r, a) != required_downstream(trial, r, b)
                    for r in trial.discretes
                ):
                    good.append((child, parent))
                child.parents, child.switch = old
            child, parent = rng.choice(good or cands)
            if parent.name not in child.parents:
                child.parents[parent.name] = (
                    tuple(_sign(rng, 0.3, 1.0) for _ in range(3))
                    if child.kind == "categorical"
                    else _sign(rng, 0.5, 1.0)
                )
            child.switch[parent.name] = (key, values[1])

    # guide factors on Gaussian sites, from latents sampled earlier in the guide
    guide_scale, guide_mask = {}, {}
    gseen: List[str] = []
    for node in guide:
        if node.kind == "normal":
            sources = [s for s in gseen if exact is False or kinds[s] in DISCRETE]
            sources = [] if no_latent_factors else sources
            if sources and rng.random() < p_factor:
                src = rng.choice(sources)
                guide_scale[node.name] = Scale(src, fn_for(src, positive=True))
            if sources and rng.random() < p_factor:
                src = rng.choice(sources)
                c = rng.uniform(-0.5, 0.5) if kinds[src] == "normal" else 0.5
                guide_mask[node.name] = Mask(src, c)
        if node.kind in LATENT:
            gseen.append(node.name)
    return Program(
        seed, focus, model, guide, model_scale, model_mask, guide_scale, guide_mask, prog_settings
    )
