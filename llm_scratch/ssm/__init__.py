"""State space models: Mamba-2 and its state space duality (SSD), chunked scan and recurrent step."""

from llm_scratch.ssm.mamba2 import (
    GatedRMSNorm,
    Mamba2,
    Mamba2State,
    segsum,
    ssd_chunked,
    ssd_quadratic,
    ssd_sequential,
    ssd_step,
)

__all__ = ["GatedRMSNorm", "Mamba2", "Mamba2State", "segsum", "ssd_chunked", "ssd_quadratic", "ssd_sequential",
           "ssd_step"]
