"""RMSNorm, the norm attention needs so far (its chapter extends it).

The RoPE tests that used to live here moved to test_rope.py.
"""

import pytest
import torch
from torch import nn

from llm_scratch.norm import RMSNorm


def test_rmsnorm_matches_torch():
    ours, theirs = RMSNorm(24, eps=1e-6), nn.RMSNorm(24, eps=1e-6)
    with torch.no_grad():
        theirs.weight.normal_()
        ours.weight.copy_(theirs.weight)
    x = torch.randn(3, 5, 24) * 3
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="last dimension"):
        ours(torch.randn(2, 23))
