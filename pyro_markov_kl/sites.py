# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
Sample sites: which sites of a model/guide pair count and how, read off the traces.

The per-site options (``infer={"kl": ...}``), whether the guide reparameterises a
site, the model/guide consistency checks, and the factor helpers that take a
site's distributions apart into a bare distribution and its scale and mask
(:func:`site_factors`), which both the plan (:mod:`pyro_markov_kl.plan`, to
choose a KL rule) and the terms (:mod:`pyro_markov_kl.terms`, to compute them)
need.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any, Dict, Iterable, Iterator, Mapping, NamedTuple, Optional, Tuple

import torch
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.distributions.util import broadcast_shape
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from pyro.util import check_site_shape
from torch.distributions import Distribution, Independent, TransformedDistribution

__all__ = [
    "KL_OPTIONS",
    "SiteFactors",
    "check_model_guide_sites",
    "check_site_shapes",
    "has_mask",
    "is_model_latent",
    "is_reparameterized",
    "kl_option",
    "observed_site_factors",
    "outside_jit_trace",
    "same_factor",
    "sample_sites",
    "shape_within",
    "site_factors",
    "site_log_prob_of_value",
    "unwrap_mask",
]

# --- site options and checks --------------------------------------------------------------------
KL_OPTIONS = ("auto", "mc", "analytic")


def site_log_prob_of_value(site: Mapping) -> torch.Tensor:
    """
    ``site["fn"].log_prob(site["value"])``, with a ``ValueError`` (an invalid
    value under validation, a value that does not fit the distribution) worded
    as Pyro's :meth:`~pyro.poutine.trace_struct.Trace.compute_log_prob` words
    it for Trace_ELBO: naming the site.
    """
    try:
        return site["fn"].log_prob(site["value"])
    except ValueError as e:
        raise ValueError(f"Error while computing log_prob at site '{site['name']}':\n{e}") from e


def kl_option(name: str, guide_site: Mapping) -> str:
    """
    The site's ``infer["kl"]``. As for every ``infer`` option in Pyro, the
    guide's setting is the one that counts: replaying the model on the guide
    trace gives each shared model site the guide site's ``infer`` dict.
    """
    option = guide_site["infer"].get("kl", "auto")
    if option not in KL_OPTIONS:
        raise ValueError(
            f"site '{name}': unknown infer={{'kl': {option!r}}}; "
            f"expected one of {', '.join(repr(o) for o in KL_OPTIONS)}"
        )
    return option


def is_reparameterized(site: Mapping) -> bool:
    """Whether a guide site's sample is a differentiable function of its parameters."""
    return bool(getattr(site["fn"], "has_rsample", False))


def sample_sites(trace: Trace) -> Dict[str, dict]:
    """The sample sites of ``trace`` without subsample sites, in order."""
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    }


def check_model_guide_sites(model_trace: Trace, guide_trace: Trace, strict: bool = False) -> None:
    """
    The model/guide consistency checks that hold whatever Pyro's validation
    setting, with errors that name the site. Guide sites that are not latents
    of the model (observed in the guide or the model, or missing from the
    model) are auxiliary, as in Trace_ELBO, which under validation warns about
    the last (:func:`pyro.util.check_model_guide_match`).

    A model latent without a guide site is drawn by the model and counts as
    ``log p`` at that draw, as in Trace_ELBO (which warns under validation).

    :param strict: also reject those guide sites and such model latents (for
        :class:`~pyro_markov_kl.trace_enum_markov_kl_elbo.TraceEnumMarkovKL_ELBO`)
    :raises ValueError: naming the site, if the model's and the guide's event
        shapes differ (with the words of Pyro's error for the same situation,
        "Model and guide event_dims disagree" or "Model and guide shapes
        disagree"); with ``strict``, if a guide site is observed, observed in
        the model, or neither in the model nor auxiliary, or a model latent has
        no guide site
    """
    model_sites = sample_sites(model_trace)
    guide_sites = sample_sites(guide_trace)
    if strict:
        for name, site in model_sites.items():
            if not site["is_observed"] and name not in guide_sites:
                raise ValueError(
                    f"site '{name}' is a latent sample site of the model but the guide has no "
                    "site of that name; add it to the guide, or observe it in the model "
                    "(obs=...)"
                )
    for name, site in guide_sites.items():
        if strict:
            _check_strict(name, site, model_sites)
        if name not in model_sites or site["is_observed"] or model_sites[name]["is_observed"]:
            continue
        q_event = site["fn"].event_shape
        p_event = model_sites[name]["fn"].event_shape
        if q_event != p_event:
            if len(q_event) != len(p_event):
                pyro_words = (
                    f"Model and guide event_dims disagree at site '{name}': "
                    f"{len(p_event)} vs {len(q_event)}"
                )
            else:
                pyro_words = (
                    f"Model and guide shapes disagree at site '{name}': "
                    f"{tuple(p_event)} vs {tuple(q_event)} (event shapes)"
                )
            raise ValueError(
                f"{pyro_words}. The guide's distribution has event shape {tuple(q_event)} but "
                f"the model's has {tuple(p_event)}; make them agree (declare the same "
                "dimensions as event dimensions on both sides, e.g. .to_event(1) in both)"
            )


def _check_strict(name: str, site: Mapping, model_sites: Mapping[str, Mapping]) -> None:
    if site["is_observed"]:
        raise ValueError(
            f"guide site '{name}' is observed (obs=...); observations belong in the model"
        )
    if name not in model_sites and not site["infer"].get("is_auxiliary"):
        raise ValueError(
            f"guide site '{name}' does not appear in the model; mark it "
            "infer={'is_auxiliary': True} if it is an auxiliary variable of the guide"
        )
    if name in model_sites and model_sites[name]["is_observed"]:
        raise ValueError(
            f"site '{name}' is observed in the model but sampled in the guide; "
            "remove it from the guide"
        )


def check_site_shapes(traces: Iterable[Trace], max_plate_nesting: float) -> None:
    """
    Pyro's :func:`~pyro.util.check_site_shape` at every sample site of the
    traces, as :func:`pyro.infer.enum.get_importance_trace` runs it for
    Trace_ELBO under validation: first the shape of every site's scaled and
    masked ``log_prob`` (which raises where a scale or mask does not broadcast),
    then the check of each. The shapes are read off the distributions (the
    batch shape broadcast with the value's; a tensor ``scale`` and ``mask``
    broadcast as :func:`~pyro.distributions.util.scale_and_mask` broadcasts
    them), without computing the log-densities, except for a distribution
    whose log-density shape cannot be trusted to follow from its shapes (a
    class, or a transform, from outside torch and Pyro), or where reading them
    fails (to raise the distribution's own error).

    :raises ValueError: Pyro's errors (``invalid log_prob shape``, ``plate stack
        overflow``, ``dim collision``)
    :raises RuntimeError: a scale or mask that does not broadcast
    """
    shapes = [
        (site, _log_prob_shape(site))
        for trace in traces
        for site in trace.nodes.values()
        if site["type"] == "sample"
    ]
    for site, shape in shapes:
        # check_site_shape reads only the shape of the log-density
        check_site_shape(dict(site, log_prob=SimpleNamespace(shape=shape)), max_plate_nesting)


def _log_prob_shape(site: Mapping) -> torch.Size:
    """The shape of ``scale_and_mask(fn.log_prob(value), scale, mask)`` at a site."""
    log_prob = site.get("log_prob")
    if log_prob is not None:
        return log_prob.shape
    fn, value = site["fn"], site["value"]
    shape = None
    if _shapes_follow_from_types(fn):
        try:
            batch = value.shape[: value.dim() - len(fn.event_shape)]
            shape = torch.Size(broadcast_shape(fn.batch_shape, batch))
        except (AttributeError, ValueError):
            pass
    if shape is None:
        shape = site_log_prob_of_value(site).shape
    mask = site["mask"]
    if mask is False:  # scale_and_mask returns zeros_like(log_prob)
        return shape
    for kind in ("scale", "mask"):
        factor = site[kind]
        if torch.is_tensor(factor):
            try:
                shape = torch.Size(broadcast_shape(shape, factor.shape))
            except ValueError as e:  # the error type of Trace_ELBO's scale_and_mask
                raise RuntimeError(
                    f"at site {site['name']!r}: the {kind} of shape {tuple(factor.shape)} does "
                    f"not broadcast with the log_prob shape {tuple(shape)}"
                ) from e
    return shape


_TRUSTED_MODULES = ("torch.distributions", "pyro.distributions")


def _shapes_follow_from_types(fn: Any) -> bool:
    """
    Whether every distribution along ``fn``'s wrappers, and every transform of
    a ``TransformedDistribution`` among them, comes from torch or Pyro, whose
    ``log_prob`` has the shape of the batch shape broadcast with the value's.
    A user's class may get it wrong, which Pyro's shape check is there to catch.
    """
    while fn is not None:
        if not type(fn).__module__.startswith(_TRUSTED_MODULES):
            return False
        if isinstance(fn, TransformedDistribution) and not all(
            type(t).__module__.startswith(_TRUSTED_MODULES) for t in fn.transforms
        ):
            return False
        fn = getattr(fn, "base_dist", None)
    return True


def is_model_latent(name: str, guide_site: Mapping, model_sites: Mapping[str, Mapping]) -> bool:
    """Whether a guide site is a latent of the model: sampled in both, observed in neither."""
    model_site = model_sites.get(name)
    return (
        model_site is not None and not model_site["is_observed"] and not guide_site["is_observed"]
    )


# --- factors: a site's distribution without .mask() wrappers, and its scale and mask ----------
def _and(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    return a & b


def unwrap_mask(fn: Distribution, by_value: bool = True) -> Tuple[Distribution, Any]:
    """
    Strip :class:`~pyro.distributions.torch_distribution.MaskedDistribution`
    wrappers (``.mask()``), including one under an ``Independent`` whose mask
    is constant along the reinterpreted dimensions (e.g. ``.mask(m).to_event(1)``
    with ``m`` of shape ``(B, 1)``), and return the bare distribution with the
    combined mask, or ``None`` for no mask. Other masks under an
    ``Independent`` are left in place, for :func:`site_factors` to handle
    element by element, or for a Monte Carlo term.

    A mask that is broadcast there (size 1 or stride 0: a boolean ``m``) is
    constant by its shape and strides, which are part of the plan's structure
    key. ``.mask()`` turns any other mask into a new boolean tensor (a float
    ``m`` of shape ``(B, 1)``, as Pyro's DMM example passes, loses its strides),
    so such a mask is checked by its values, every time: the plan is made on
    the first trace's mask, and a later mask that varies inside the event is
    handled by the fallbacks of the terms, which are unbiased as well. Inside a
    JIT trace, where a value-dependent branch would be compiled in, only the
    strides count; with ``by_value=False`` too.
    """
    mask = None
    while True:
        if isinstance(fn, MaskedDistribution):
            mask = _and(mask, fn._mask)
            fn = fn.base_dist
            continue
        if isinstance(fn, Independent) and isinstance(fn.base_dist, MaskedDistribution):
            k = fn.reinterpreted_batch_ndims
            inner = fn.base_dist
            m = inner._mask
            if torch.is_tensor(m) and m.dim() > len(inner.batch_shape) - k:
                nk = min(k, m.dim())
                if not _constant_along_last(m, nk, by_value):
                    break  # the mask may vary inside the event
                m = m[(Ellipsis,) + (0,) * nk]
            mask = _and(mask, m)
            fn = Independent(inner.base_dist, k)
            continue
        break
    return fn, mask


def _constant_along_last(m: torch.Tensor, n: int, by_value: bool = True) -> bool:
    """Whether a mask is constant along its ``n`` rightmost dimensions (see :func:`unwrap_mask`)."""
    dims = range(m.dim() - n, m.dim())
    with outside_jit_trace():  # shapes only: constants of a compiled graph
        broadcast = all(m.size(d) == 1 or m.stride(d) == 0 for d in dims)
    if broadcast:
        return True
    if not by_value or torch._C._get_tracing_state():
        return False
    first = m[(Ellipsis,) + (slice(0, 1),) * n]
    return bool(torch.equal(m, first.expand(m.shape)))


def _masked_event_dims(fn: Distribution) -> int:
    """How many event dimensions of ``fn`` hold a ``.mask()`` that could not be folded."""
    if isinstance(fn, Independent) and has_mask(fn.base_dist):
        return fn.reinterpreted_batch_ndims
    return 0


def _strip_event_dims(fn: Distribution, k: int) -> Optional[Distribution]:
    """``fn`` with its ``k`` rightmost event dimensions made batch dimensions, if it can be."""
    if isinstance(fn, Independent) and fn.reinterpreted_batch_ndims >= k:
        r = fn.reinterpreted_batch_ndims - k
        return Independent(fn.base_dist, r) if r else fn.base_dist
    return None


def _pad_right(x: Any, k: int) -> Any:
    """Give a batch-shaped factor ``k`` trailing singleton dimensions."""
    return x.reshape(x.shape + (1,) * k) if torch.is_tensor(x) and x.dim() else x


def has_mask(fn: Distribution) -> bool:
    """Whether a ``.mask()`` is left anywhere in ``fn``'s chain of base distributions."""
    while fn is not None:
        if isinstance(fn, MaskedDistribution):
            return True
        fn = getattr(fn, "base_dist", None)
    return False


def same_factor(scale_p: Any, mask_p: Any, scale_q: Any, mask_q: Any) -> bool:
    """Whether the model's and the guide's factors are certainly equal (cheap checks only)."""
    if torch.is_tensor(scale_p) or torch.is_tensor(scale_q):
        if scale_p is not scale_q:
            return False
    elif scale_p != scale_q:
        return False
    if mask_p is mask_q:
        return True
    if torch.is_tensor(mask_p) and torch.is_tensor(mask_q):
        if torch._C._get_tracing_state():
            return False
        return mask_p.shape == mask_q.shape and bool(torch.equal(mask_p, mask_q))
    return False


class SiteFactors(NamedTuple):
    """
    A latent site's guide and model distributions without ``.mask()``
    wrappers, with their factors; ``event_dims`` event dimensions were made
    batch dimensions (where a mask varies inside the event), so terms are
    computed element by element and then summed over them.
    """

    q: Distribution
    p: Distribution
    scale_q: Any
    mask_q: Any
    scale_p: Any
    mask_p: Any
    event_dims: int = 0


def site_factors(model_site: Dict[str, Any], guide_site: Dict[str, Any]) -> SiteFactors:
    r"""
    Unwrap both sides' masks into their factors. A mask that varies inside
    an ``Independent``'s event (``.mask(m).to_event(1)`` with ``m`` of the full
    shape) cannot be a per-site factor; then both sides are lowered to the
    elementwise level, where it can: with
    :math:`\mathrm{KL}(\mathrm{Indep}(q_0) \| \mathrm{Indep}(p_0)) = \sum_i
    \mathrm{KL}(q_{0,i} \| p_{0,i})`, the term is
    :math:`\sum_i [-f_{p,i}\,\mathrm{KL}_i - (f_{p,i} - f_{q,i})\,\mathrm{H}_i]`.
    """
    # a mask not broadcast along the event by its strides is taken apart element by element
    # wherever both sides allow it (exact for any mask values, so the plan and every later step,
    # also inside a JIT trace, make the same decision); only where they do not is it folded
    # when its values are constant along the event
    q, mask_q = unwrap_mask(guide_site["fn"], by_value=False)
    p, mask_p = unwrap_mask(model_site["fn"], by_value=False)
    k = max(_masked_event_dims(q), _masked_event_dims(p))
    if k and (_strip_event_dims(q, k) is None or _strip_event_dims(p, k) is None):
        q, mask_q = unwrap_mask(guide_site["fn"])
        p, mask_p = unwrap_mask(model_site["fn"])
    mask_q = _and(guide_site["mask"], mask_q)
    mask_p = _and(model_site["mask"], mask_p)
    scale_q, scale_p = guide_site["scale"], model_site["scale"]
    k = max(_masked_event_dims(q), _masked_event_dims(p))
    if k:
        q0, p0 = _strip_event_dims(q, k), _strip_event_dims(p, k)
        if q0 is not None and p0 is not None:
            q0, mask_q0 = unwrap_mask(q0, by_value=False)
            p0, mask_p0 = unwrap_mask(p0, by_value=False)
            return SiteFactors(
                q0,
                p0,
                _pad_right(scale_q, k),
                _and(_pad_right(mask_q, k), mask_q0),
                _pad_right(scale_p, k),
                _and(_pad_right(mask_p, k), mask_p0),
                k,
            )
    return SiteFactors(q, p, scale_q, mask_q, scale_p, mask_p)


def observed_site_factors(site: Dict[str, Any]) -> Optional[Tuple[Any, Any, Any, int]]:
    """
    An observed site's distribution without ``.mask()`` wrappers, its scale and
    mask, and the number ``k`` of event dimensions made batch dimensions (a
    mask that varies inside an ``Independent``'s event, or that is not seen to
    be constant there: its strides only, as under the JIT), so that
    ``sum_rightmost(scale * mask * fn.log_prob(value), k)`` is the site's term;
    ``None`` where a mask cannot be taken off, or where the value does not
    broadcast to ``fn.batch_shape + fn.event_shape`` without enlarging it (a
    distribution of batch shape ``()`` scoring a value of shape ``(N,)``, which
    validation rejects): the value is then not one of ``fn``'s shape, and could
    not be stacked with other sites' values.
    """
    fn, mask = unwrap_mask(site["fn"], by_value=False)
    scale, k = site["scale"], _masked_event_dims(fn)
    if k:
        fn = _strip_event_dims(fn, k)
        if fn is None:
            return None
        fn, inner = unwrap_mask(fn, by_value=False)
        mask, scale = _and(_pad_right(_and(site["mask"], mask), k), inner), _pad_right(scale, k)
    else:
        mask = _and(site["mask"], mask)
    if has_mask(fn):
        return None
    with outside_jit_trace():  # shapes only: constants of a compiled graph
        fits = shape_within(site["value"].shape, fn.batch_shape + fn.event_shape)
    return (fn, scale, mask, k) if fits else None


@contextlib.contextmanager
def outside_jit_trace() -> Iterator[None]:
    """
    Suspend a JIT trace in progress, for work that must not be part of a
    compiled graph: the dependency analysis and the handlers made for it (a
    vectorised-particle plate, whose sizes would otherwise be traced tensors),
    and the reading of shapes. Inside a trace, sizes are traced 0-dim tensors:
    every comparison of them records graph nodes (dead code, removed only
    after tracing) and warns (:class:`torch.jit.TracerWarning`). Its result
    is a constant of the compiled graph either way (a graph has one
    structure), so the shape checks of the plan key and the terms compare them
    with the trace suspended; nothing computed inside may flow into the graph.
    Outside a trace it does nothing.
    """
    tracing_state = torch._C._get_tracing_state()
    if tracing_state is None:
        yield
        return
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(tracing_state)


def shape_within(shape: Tuple[int, ...], target: Tuple[int, ...]) -> bool:
    """Whether ``shape`` broadcasts to ``target`` without enlarging it."""
    # on the hot path: plain comparisons of sizes, no warnings context, no torch.broadcast_shapes
    return len(shape) <= len(target) and all(
        s == 1 or s == t for s, t in zip(reversed(shape), reversed(target))
    )
