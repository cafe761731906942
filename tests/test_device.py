import random

import pytest
import torch

from llm_scratch import get_device, seed_everything


def test_get_device_defaults_to_an_available_device(monkeypatch):
    monkeypatch.delenv("LLM_SCRATCH_DEVICE", raising=False)
    device = get_device()
    torch.empty(1, device=device)  # usable
    if torch.cuda.is_available():
        assert device.type == "cuda"
    elif not torch.backends.mps.is_available():
        assert device.type == "cpu"


def test_environment_override(monkeypatch):
    monkeypatch.setenv("LLM_SCRATCH_DEVICE", "cpu")
    assert get_device() == torch.device("cpu")
    assert get_device("meta") == torch.device("meta")  # the argument wins over the environment


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is missing")
def test_unavailable_override_is_an_error():
    with pytest.raises(ValueError, match="not available"):
        get_device("cuda")


def test_seed_everything_repeats():
    seed_everything(123)
    a = (random.random(), torch.rand(3))
    seed_everything(123)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="seed"):
        seed_everything(-1)


def test_no_accelerator_name_outside_device_module():
    """GUIDE.md: the device comes from get_device(); no module hard-codes an accelerator."""
    import pathlib

    import llm_scratch

    root = pathlib.Path(llm_scratch.__file__).parent
    offenders = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if p.name != "device.py" and ('"cuda' in p.read_text() or "'cuda" in p.read_text())
    ]
    assert offenders == []


def test_is_cuda_and_cuda_device():
    from llm_scratch.device import cuda_device, is_cuda

    assert is_cuda("cuda") and is_cuda(torch.device("cuda", 1)) and not is_cuda("cpu") and not is_cuda("mps")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=f"this machine has {count} GPU"):
        cuda_device(count)  # one past the last GPU (device 0 on a machine without CUDA)
