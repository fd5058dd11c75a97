# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
Runnable examples.

* :mod:`pyro_markov_kl.examples.dmm`: the Deep Markov Model of Krishnan et al. (2017) on the JSB
  Chorales, trained with a choice of ELBO estimators (``python -m pyro_markov_kl.examples.dmm``).
"""
