# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
Shared pytest configuration.

Tests marked ``@pytest.mark.slow`` (long statistical or end-to-end tests, over about 8 s each)
are skipped by default; run them with ``pytest --runslow`` or with the environment variable
``PMKL_RUN_SLOW=1`` (as CI does).
"""

import os

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--runslow",
        action="store_true",
        default=False,
        help="also run the tests marked slow (or set PMKL_RUN_SLOW=1)",
    )


def run_slow(config: pytest.Config) -> bool:
    """Whether the slow tests run: ``--runslow`` or ``PMKL_RUN_SLOW=1``."""
    return bool(config.getoption("--runslow")) or os.environ.get("PMKL_RUN_SLOW", "") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if run_slow(config):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or PMKL_RUN_SLOW=1")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _single_thread():
    """The test machines are small and shared: keep torch on one thread."""
    torch.set_num_threads(1)
    yield
