# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
Runnable examples.

* :mod:`pyro_markov_kl.examples.dmm`: the Deep Markov Model of Krishnan et al. (2017) on the JSB
  Chorales, trained with a choice of ELBO estimators (``python -m pyro_markov_kl.examples.dmm``).
* :mod:`pyro_markov_kl.examples.dmm_compare`: training curves of the DMM under several ELBOs, to
  CSV and PNG.
* :mod:`pyro_markov_kl.examples.dmm_distributed`: data-parallel DMM training on
  :mod:`torch.distributed` (``torchrun``).
* :mod:`pyro_markov_kl.examples.switching`: a switching state-space model with
  non-reparameterised regimes (score-function gradients with analytic KL costs).
"""
