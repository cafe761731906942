"""Shared fixtures. Every test seeds its own generator so it can run alone or under xdist."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
