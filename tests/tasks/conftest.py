"""Run these small-network tests on one CPU thread: on a shared 2-core machine, extra
threads contend with other processes and make each step many times slower."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
