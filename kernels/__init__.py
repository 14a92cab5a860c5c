"""Pallas attention kernels: flash attention (TPU and GPU bodies) and ring attention.

Knows nothing of the Wan model; layout everywhere in the public API is (B, S, H, D).
"""

from kernels.flash import RESIDUALS, flash_attention
from kernels.ring import ring_attention
from kernels.tuning import BlockSizes, TABLE, block_sizes_for, device_key

__all__ = ["RESIDUALS", "flash_attention", "ring_attention", "BlockSizes", "TABLE", "block_sizes_for", "device_key"]
