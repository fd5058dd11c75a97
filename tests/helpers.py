# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
Shared test helpers: Monte Carlo means and standard errors of ELBO estimators, and a context
manager restoring torch's KL registry.
"""

import contextlib
import math
from typing import Callable, Dict, Iterator, Sequence, Tuple

import pyro
import torch
import torch.distributions.kl as torch_kl
from pyro.infer.elbo import ELBO


@contextlib.contextmanager
def restored_kl_registry() -> Iterator[None]:
    """
    Undo the registrations made inside the block with
    :func:`torch.distributions.kl.register_kl` (and removals from torch's registry). Touches
    torch's private registry, as only a test may.
    """
    saved = dict(torch_kl._KL_REGISTRY)
    try:
        yield
    finally:
        torch_kl._KL_REGISTRY.clear()
        torch_kl._KL_REGISTRY.update(saved)
        torch_kl._KL_MEMOIZE.clear()


def loss_and_grad_stats(
    elbo: ELBO,
    model: Callable,
    guide: Callable,
    params: Sequence[torch.Tensor],
    batches: int,
    *args,
    **kwargs,
) -> Tuple[Tuple[float, float], torch.Tensor, torch.Tensor]:
    """
    Means and standard errors of the loss and of its gradient with respect to
    ``params`` over ``batches`` independent calls of ``elbo.differentiable_loss``
    (each averaging the ELBO's own particles).

    :returns: ``((loss mean, loss SE), gradient means, gradient SEs)``, the
        gradients flattened and concatenated in the order of ``params``
    """
    losses, grads = [], []
    for _ in range(batches):
        loss = elbo.differentiable_loss(model, guide, *args, **kwargs)
        g = torch.autograd.grad(loss, list(params), allow_unused=True)
        grads.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if gi is None else gi).reshape(-1)
                    for p, gi in zip(params, g)
                ]
            )
        )
        losses.append(loss.detach())
    losses_t, grads_t = torch.stack(losses), torch.stack(grads)
    root = math.sqrt(batches)
    return (
        (float(losses_t.mean()), float(losses_t.std() / root)),
        grads_t.mean(0),
        grads_t.std(0) / root,
    )


def z_scores(ours, reference) -> Dict[str, object]:
    """
    ``|difference| / combined standard error`` of the loss and of each gradient
    component between two results of :func:`loss_and_grad_stats`; a reference
    with zero standard errors (a closed form) counts only ours.
    """
    (l1, s1), g1, e1 = ours
    (l2, s2), g2, e2 = reference
    z_loss = abs(l1 - l2) / max(math.hypot(s1, s2), 1e-12)
    z_grad = (g1 - g2).abs() / torch.sqrt(e1**2 + e2**2).clamp(min=1e-12)
    return {"loss": z_loss, "grad": z_grad}


def exact(loss: torch.Tensor, params: Sequence[torch.Tensor]):
    """A closed-form loss in the format of :func:`loss_and_grad_stats` (zero SEs)."""
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    flat = torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]
    )
    return (float(loss.detach()), 0.0), flat, torch.zeros_like(flat)


def fresh_params(**initial: float) -> Dict[str, torch.Tensor]:
    """
    Clear the param store and register scalar params with these initial values.

    :returns: their unconstrained tensors, the leaves gradients are taken of
    """
    pyro.clear_param_store()
    return {
        name: pyro.param(name, torch.tensor(value)).unconstrained()
        for name, value in initial.items()
    }


def param_store_grad_stats(elbo: ELBO, model: Callable, guide: Callable, batches: int, *args):
    """
    Means and standard errors of loss and gradient over independent batches,
    through ``loss_and_grads`` (the entry point every Pyro ELBO has), with
    respect to every parameter of the param store but baselines' (sorted by
    name, unconstrained).

    :returns: ``(loss mean, loss SE, gradient means, gradient SEs, params)``
    """
    grads, losses = [], []
    for _ in range(batches):
        for p in pyro.get_param_store().values():
            p.unconstrained().grad = None
        losses.append(torch.tensor(elbo.loss_and_grads(model, guide, *args)))
        store = pyro.get_param_store()
        names = sorted(n for n in store.keys() if not n.startswith("__baseline"))
        params = [store[n].unconstrained() for n in names]
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
    grads, losses = torch.stack(grads), torch.stack(losses)
    n = math.sqrt(batches)
    return losses.mean(), losses.std() / n, grads.mean(0), grads.std(0) / n, params
