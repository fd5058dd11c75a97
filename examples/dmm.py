# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
The Deep Markov Model on the JSB Chorales: a thin wrapper of :mod:`pyro_markov_kl.examples.dmm`.

Run ``python examples/dmm.py --help`` (or ``python -m pyro_markov_kl.examples.dmm --help``).
"""

from pyro_markov_kl.examples.dmm import main

if __name__ == "__main__":
    main()
