# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""Shared pytest configuration."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """The test machines are small and shared: keep torch on one thread."""
    torch.set_num_threads(1)
    yield
