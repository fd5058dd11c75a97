# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

r"""Exact reference for DAGs mixing linear-Gaussian and discrete (Bernoulli/Categorical) nodes.

Test support, independent of any ELBO estimator; it extends :mod:`lg` (read that first).

**Model and guide.**  A :class:`MixedSpec` has scalar nodes of three kinds, each in a
model order and a (possibly different) guide order:

* discrete nodes :math:`d_k` (``"bernoulli"``, values :math:`\{0,1\}`, or
  ``"categorical"``, values :math:`\{0,1,2\}`), whose parents (on both sides) are
  *discrete only*, with logits linear in the parents' values,

  .. math:: \mathrm{logits}_k = b_k + \sum_{j\in\mathrm{pa}(k)} c_{kj}\, d_j

  (scalars for a Bernoulli child, 3-vectors for a Categorical child; a Categorical
  parent enters through its value :math:`0,1,2` as a number).  In the guide
  :math:`b_k, c_{kj}` are ``pyro.param`` s;
* Gaussian nodes :math:`z_i` whose parents may be Gaussian or discrete, with means
  linear in the parents' values, exactly as in :mod:`lg`;
* Gaussian observations on Gaussian nodes, optionally shifted by discrete nodes.

Scales and masks (``poutine.scale`` / ``poutine.mask``) are drawn for Gaussian latents
and observations only: a discrete guide site's factor would change which score-function
convention is "the" gradient, which is not what these tests are about.

**Exact ELBO.**  Write :math:`d` for the vector of discrete values.  Because no discrete
node has a Gaussian parent, in either program, the guide factorises as
:math:`q(d)\,q(z\mid d)` whatever the interleaving of the two orders, with
:math:`q(d) = \prod_k q_k(d_k\mid d_{\mathrm{pa}_q(k)})`; likewise
:math:`p(d, z, x) = p(d)\,p(z, x \mid d)`.  Given :math:`d` the Gaussian part is a
linear-Gaussian model/guide pair whose offsets absorb the discrete terms:

.. math:: \tilde b_i(d) = b_i + \sum_{k} a_{ik} d_k, \qquad
          \tilde f_i(d) = f_i + \sum_{k} e_{ik} d_k, \qquad
          \tilde d_o(d) = d_o + \sum_k c_{ok} d_k ,

so that, with :func:`lg.exact_elbo` :math:`=: \mathcal L_{\mathrm{LG}}` evaluated at
these offsets (the guide's :math:`\tilde f(d)` is a differentiable function of the
params),

.. math::

   \mathcal L = \sum_{d} q(d)\Big[\log p(d) - \log q(d)
       + \mathcal L_{\mathrm{LG}}\big(\tilde b(d), \tilde f(d), \tilde d(d)\big)\Big],

a finite sum over at most :math:`3^3 = 27` configurations.  Autograd through it gives
the exact gradient w.r.t. all guide params, discrete logits included (the dependence
of :math:`q(d)` on the logits is what the score-function estimator targets).

**Analytic-KL rule.**  Every latent :math:`s` (discrete or Gaussian) is eligible for the
conditional KL iff no model parent of :math:`s` is a guide descendant of :math:`s`
(:func:`analytic_expected`; Bernoulli/Bernoulli and Categorical/Categorical KLs exist).
Guide descendants cross kinds (a Gaussian with a discrete guide parent is a descendant
of it), but since a discrete node has only discrete parents the rule only ever bites
within a kind.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple, Union

import lg
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from lg import DTYPE, Obs, param_e, param_f, param_logg

KINDS = ("normal", "bernoulli", "categorical")
CARD = {"bernoulli": 2, "categorical": 3}
Coef = Union[float, Tuple[float, ...]]


@dataclass
class Node:
    """One node on one side (model: constants; guide: param inits).

    ``parents`` maps parent name to coefficient and ``loc`` is the bias: floats for
    ``"normal"`` and ``"bernoulli"`` nodes, 3-tuples (logit vectors) for
    ``"categorical"`` ones.  ``scale`` is the standard deviation of a normal node.
    """

    name: str
    kind: str
    parents: Dict[str, Coef] = field(default_factory=dict)
    loc: Coef = 0.0
    scale: float = 1.0


@dataclass
class MixedSpec:
    """A mixed model/guide pair; see the module docstring.

    ``model``/``guide``: the same node names and kinds, in model/guide sampling order.
    ``obs``: :class:`lg.Obs` whose parents must include a normal node and may include
    discrete ones.  Scales/masks as in :class:`lg.LGSpec`, on normal latents and
    observations only.  ``enumerate_guide``: mark the discrete guide sites
    ``infer={"enumerate": "parallel"}``.
    """

    model: List[Node]
    guide: List[Node]
    obs: List[Obs] = field(default_factory=list)
    model_scale: Dict[str, float] = field(default_factory=dict)
    guide_scale: Dict[str, float] = field(default_factory=dict)
    model_mask: Dict[str, bool] = field(default_factory=dict)
    guide_mask: Dict[str, bool] = field(default_factory=dict)
    plate: bool = False
    enumerate_guide: bool = False

    def __post_init__(self):
        kinds = {n.name: n.kind for n in self.model}
        if kinds != {n.name: n.kind for n in self.guide} or len(kinds) != len(self.model):
            raise ValueError("model and guide must have the same nodes and kinds")
        for order in (self.model, self.guide):
            seen = set()
            for node in order:
                if node.kind not in KINDS:
                    raise ValueError(f"unknown kind {node.kind!r}")
                if not set(node.parents) <= seen:
                    raise ValueError(f"parents of {node.name} must be sampled earlier")
                if node.kind != "normal" and any(kinds[p] == "normal" for p in node.parents):
                    raise ValueError(f"discrete node {node.name} has a normal parent")
                seen.add(node.name)
        for ob in self.obs:
            if not any(kinds.get(p) == "normal" for p in ob.parents):
                raise ValueError(f"observation {ob.name} needs a normal parent")
            if not set(ob.parents) <= set(kinds):
                raise ValueError(f"bad observation {ob.name}")
        for sites in (self.model_scale, self.guide_scale, self.model_mask, self.guide_mask):
            if any(kinds.get(s, "normal") != "normal" for s in sites):
                raise ValueError("scales and masks are for normal sites and observations only")

    @property
    def kinds(self) -> Dict[str, str]:
        return {n.name: n.kind for n in self.model}

    @property
    def latent_names(self) -> List[str]:
        return [n.name for n in self.model]

    @property
    def discrete_names(self) -> List[str]:
        return [n.name for n in self.model if n.kind != "normal"]

    @property
    def max_plate_nesting(self) -> int:
        return 1 if self.plate else 0


# ---------------------------------------------------------------------------------------
# guide parameters


def init_params(spec: MixedSpec) -> Dict[str, torch.Tensor]:
    """Initial (unconstrained) guide params: ``e`` coefficients, ``f`` biases, ``log g``."""
    out = {}
    for node in spec.guide:
        for parent, coef in node.parents.items():
            out[param_e(node.name, parent)] = torch.tensor(coef, dtype=DTYPE)
        out[param_f(node.name)] = torch.tensor(node.loc, dtype=DTYPE)
        if node.kind == "normal":
            out[param_logg(node.name)] = torch.tensor(math.log(node.scale), dtype=DTYPE)
    return out


def reset_param_store(spec: MixedSpec) -> Dict[str, torch.Tensor]:
    """Clear the param store, register the initial guide params, return the leaf tensors."""
    return lg.register_params(init_params(spec))


# ---------------------------------------------------------------------------------------
# Pyro callables


def _plate(spec: MixedSpec):
    return pyro.plate("pmkl_unit", 1, dim=-1) if spec.plate else contextlib.nullcontext()


def _context(spec: MixedSpec, side: str, name: str):
    scale = (spec.model_scale if side == "model" else spec.guide_scale).get(name)
    mask = (spec.model_mask if side == "model" else spec.guide_mask).get(name)
    return lg._site_context(scale, mask)


def _linear(kind: str, loc, parents: Dict[str, torch.Tensor], values: Dict[str, torch.Tensor]):
    """``loc + sum_j coef_j * value_j``; for a categorical child the value gets a last dim."""
    out = loc
    for parent, coef in parents.items():
        v = values[parent]
        out = out + coef * (v.unsqueeze(-1) if kind == "categorical" else v)
    return out


def _distribution(kind: str, loc, scale=None):
    if kind == "normal":
        return dist.Normal(loc, scale)
    if kind == "bernoulli":
        return dist.Bernoulli(logits=loc)
    return dist.Categorical(logits=loc)


def _as_number(kind: str, value: torch.Tensor) -> torch.Tensor:
    return value.to(DTYPE) if kind == "categorical" else value


def make_model(spec: MixedSpec) -> Callable[[], None]:
    """The Pyro model of ``spec``; observations right after their last parent."""
    order = {node.name: i for i, node in enumerate(spec.model)}
    obs_after: Dict[int, List[Obs]] = {}
    for ob in spec.obs:
        obs_after.setdefault(max(order[p] for p in ob.parents), []).append(ob)

    def tensor(x):
        return torch.tensor(x, dtype=DTYPE)

    def model():
        values: Dict[str, torch.Tensor] = {}
        with _plate(spec):
            for i, node in enumerate(spec.model):
                coefs = {p: tensor(c) for p, c in node.parents.items()}
                loc = _linear(node.kind, tensor(node.loc), coefs, values)
                d = _distribution(node.kind, loc, tensor(node.scale))
                ctx = _context(spec, "model", node.name) if node.kind == "normal" else None
                with ctx or contextlib.nullcontext():
                    value = pyro.sample(node.name, d)
                values[node.name] = _as_number(node.kind, value)
                for ob in obs_after.get(i, []):
                    loc = _linear(
                        "normal", tensor(ob.loc), {p: c for p, c in ob.parents.items()}, values
                    )
                    obs_value = tensor(ob.value)
                    if spec.plate:
                        obs_value = obs_value.expand(1)
                    with _context(spec, "model", ob.name):
                        pyro.sample(ob.name, dist.Normal(loc, tensor(ob.scale)), obs=obs_value)

    return model


def make_guide(spec: MixedSpec) -> Callable[[], None]:
    """The Pyro guide of ``spec``; params are created from :func:`init_params`."""
    inits = init_params(spec)

    def param(name):
        return pyro.param(name, inits[name].clone())

    def guide():
        values: Dict[str, torch.Tensor] = {}
        with _plate(spec):
            for node in spec.guide:
                coefs = {p: param(param_e(node.name, p)) for p in node.parents}
                loc = _linear(node.kind, param(param_f(node.name)), coefs, values)
                if node.kind == "normal":
                    with _context(spec, "guide", node.name):
                        value = pyro.sample(
                            node.name, dist.Normal(loc, param(param_logg(node.name)).exp())
                        )
                else:
                    infer = {"enumerate": "parallel"} if spec.enumerate_guide else {}
                    value = pyro.sample(node.name, _distribution(node.kind, loc), infer=infer)
                values[node.name] = _as_number(node.kind, value)

    return guide


# ---------------------------------------------------------------------------------------
# exact reference


def _log_prob(kind: str, logits: torch.Tensor, value: int) -> torch.Tensor:
    if kind == "bernoulli":
        return F.logsigmoid(logits if value else -logits)
    return torch.log_softmax(logits, -1)[value]


def configurations(spec: MixedSpec) -> List[Dict[str, int]]:
    """All joint values of the discrete nodes."""
    names = spec.discrete_names
    kinds = spec.kinds
    return [
        dict(zip(names, vals))
        for vals in itertools.product(*(range(CARD[kinds[n]]) for n in names))
    ]


def _conditional_lg(spec: MixedSpec, params: Dict[str, torch.Tensor], d: Dict[str, int]):
    """The linear-Gaussian pair given ``d`` (:class:`lg.LGSpec`) and its params dict."""
    normal = {n for n, k in spec.kinds.items() if k == "normal"}
    model, guide = [], []
    lg_params = {}
    for node in spec.model:
        if node.kind == "normal":
            loc = node.loc + sum(c * d[p] for p, c in node.parents.items() if p not in normal)
            pa = {p: c for p, c in node.parents.items() if p in normal}
            model.append(lg.Latent(node.name, pa, loc, node.scale))
    for node in spec.guide:
        if node.kind == "normal":
            pa = {p: c for p, c in node.parents.items() if p in normal}
            guide.append(lg.GuideSite(node.name, pa, 0.0, 1.0))
            f = params[param_f(node.name)]
            for p in node.parents:
                if p in normal:
                    lg_params[param_e(node.name, p)] = params[param_e(node.name, p)]
                else:
                    f = f + params[param_e(node.name, p)] * d[p]
            lg_params[param_f(node.name)] = f
            lg_params[param_logg(node.name)] = params[param_logg(node.name)]
    obs = []
    for ob in spec.obs:
        loc = ob.loc + sum(c * d[p] for p, c in ob.parents.items() if p not in normal)
        pa = {p: c for p, c in ob.parents.items() if p in normal}
        obs.append(Obs(ob.name, pa, loc, ob.scale, ob.value))
    lg_spec = lg.LGSpec(
        model=model,
        guide=guide,
        obs=obs,
        model_scale=spec.model_scale,
        guide_scale=spec.guide_scale,
        model_mask=spec.model_mask,
        guide_mask=spec.guide_mask,
    )
    return lg_spec, lg_params


def exact_elbo(spec: MixedSpec, params: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``sum_d q(d) [log p(d) - log q(d) + L_LG(d)]`` (see the module docstring)."""
    total = torch.zeros((), dtype=DTYPE)
    for d in configurations(spec):
        log_p = torch.zeros((), dtype=DTYPE)
        for node in spec.model:
            if node.kind != "normal":
                logits = torch.tensor(node.loc, dtype=DTYPE)
                for p, c in node.parents.items():
                    logits = logits + torch.tensor(c, dtype=DTYPE) * d[p]
                log_p = log_p + _log_prob(node.kind, logits, d[node.name])
        log_q = torch.zeros((), dtype=DTYPE)
        for node in spec.guide:
            if node.kind != "normal":
                logits = params[param_f(node.name)]
                for p in node.parents:
                    logits = logits + params[param_e(node.name, p)] * d[p]
                log_q = log_q + _log_prob(node.kind, logits, d[node.name])
        lg_spec, lg_params = _conditional_lg(spec, params, d)
        inner = lg.exact_elbo(lg_spec, lg_params)
        total = total + log_q.exp() * (log_p - log_q + inner)
    return total


def flat_names(params: Dict[str, torch.Tensor]) -> List[str]:
    """Coordinate names: ``name`` for scalars, ``name[i]`` for vector params."""
    out = []
    for name, value in params.items():
        out += [name] if value.dim() == 0 else [f"{name}[{i}]" for i in range(value.numel())]
    return out


def _flatten(grads: Sequence, params: Dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat(
        [
            torch.zeros(p.numel(), dtype=DTYPE) if g is None else g.reshape(-1).to(DTYPE)
            for g, p in zip(grads, params.values())
        ]
    )


def exact_loss_and_grad(spec: MixedSpec) -> Tuple[float, torch.Tensor]:
    """``-exact_elbo`` and its exact gradient (flattened, :func:`flat_names` order)."""
    params = {k: v.clone().requires_grad_() for k, v in init_params(spec).items()}
    loss = -exact_elbo(spec, params)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return loss.item(), _flatten(grads, params)


# ---------------------------------------------------------------------------------------
# estimation


def estimate(elbo, spec: MixedSpec, num_batches: int, seed: int = 0) -> torch.Tensor:
    """Rows ``[loss, flattened gradient]`` of ``num_batches`` calls of ``differentiable_loss``.

    Each row averages ``elbo.num_particles`` vectorized particles; rows are i.i.d.
    """
    model, guide = make_model(spec), make_guide(spec)
    pyro.set_rng_seed(seed)
    params = reset_param_store(spec)
    rows = []
    for _ in range(num_batches):
        loss = elbo.differentiable_loss(model, guide)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        rows.append(torch.cat([loss.detach().reshape(1).to(DTYPE), _flatten(grads, params)]))
    return torch.stack(rows)


def check_unbiased(rows: torch.Tensor, spec: MixedSpec, n_se: float = 5.0) -> List[str]:
    """Compare the batch means of ``rows`` with the exact loss/gradient; list failures."""
    loss, grad = exact_loss_and_grad(spec)
    exact = torch.cat([torch.tensor([loss], dtype=DTYPE), grad])
    names = ["loss"] + [f"grad[{n}]" for n in flat_names(init_params(spec))]
    mean = rows.mean(0)
    se = rows.std(0) / math.sqrt(rows.shape[0])
    failures = []
    for name, m, s, x in zip(names, mean.tolist(), se.tolist(), exact.tolist()):
        tol = n_se * s + 1e-7 * (1.0 + abs(x))
        if not abs(m - x) <= tol:
            failures.append(
                f"{name}: estimate {m:.6g} +- {s:.3g} (SE) vs exact {x:.6g} "
                f"({(m - x) / max(s, 1e-300):.2f} SE)"
            )
    return failures


# ---------------------------------------------------------------------------------------
# structure


# the structural helpers of the Gaussian reference work on any spec with name/parents nodes
guide_descendants = lg.guide_descendants
analytic_expected = lg.analytic_expected


def check_plan(plan, spec: MixedSpec, enumerated: bool = False) -> List[str]:
    """Compare a plan with the rule and the spec's structure.

    Normal sites: ``"analytic"`` iff :func:`analytic_expected`, else ``"mc"``.  Discrete
    sites: the same rule for :class:`~pyro_markov_kl.TraceMarkovKL_ELBO`, ``"enum"`` when
    enumerated in the guide.  Parent and descendant sets must be the structural ones.
    """
    failures = []
    expected = analytic_expected(spec)
    desc = guide_descendants(spec)
    model_pa = {n.name: frozenset(n.parents) for n in spec.model}
    guide_pa = {n.name: frozenset(n.parents) for n in spec.guide}
    for name, kind in spec.kinds.items():
        if name not in plan.sites:
            failures.append(f"{name}: missing from plan.sites")
            continue
        site = plan.sites[name]
        if kind != "normal" and enumerated:
            want = "enum"
        else:
            want = "analytic" if name in expected else "mc"
        failures += lg.site_failures(name, f"{name} ({kind})", site, want, model_pa, guide_pa, desc)
        if site.reparameterized != (kind == "normal"):
            failures.append(f"{name} ({kind}): reparameterized={site.reparameterized}")
    return failures
