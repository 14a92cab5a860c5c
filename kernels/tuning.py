"""Block sizes for the flash kernels, per device generation.

Every entry below comes from a public reference (research/kernels.md §6), not from a
measurement of ours: no TPU or GPU was available when this table was written. Run
`python -m kernels.sweep` on the device to replace an entry with measured winners.
"""

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the forward, dK/dV and dQ kernels (tokens along each sequence).

  `*_compute` sizes split a kv block into sub-tiles inside the TPU kernel (the DMA moves
  `block_kv` rows, the MXU works on `block_kv_compute` rows at a time). On GPU the kv loop runs
  inside the kernel and `num_warps` / `num_stages` are the Triton launch parameters.
  `vmem_limit_bytes` raises the TPU scoped-VMEM limit (its default is far below physical VMEM).
  """
  block_q: int = 512
  block_kv: int = 512
  block_kv_compute: int = 512
  block_q_dkv: int = 512
  block_kv_dkv: int = 512
  block_kv_dkv_compute: int = 512
  block_q_dq: int = 512
  block_kv_dq: int = 512
  vmem_limit_bytes: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None

  @classmethod
  def make(cls, value) -> "BlockSizes":
    """A BlockSizes from a BlockSizes, a dict of its fields, or None (the generic default)."""
    if value is None:
      return cls()
    if isinstance(value, cls):
      return value
    if isinstance(value, dict):
      unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
      if unknown:
        raise ValueError(f"unknown block size names {sorted(unknown)}; "
                         f"valid: {[f.name for f in dataclasses.fields(cls)]}")
      return cls(**value)
    raise TypeError(f"block_sizes must be a BlockSizes, a dict or None, got {type(value)}")


def _uniform(fwd, dkv, dq, **extra):
  """Fwd (q, kv, kv_compute), dkv (q, kv, kv_compute), dq (q, kv) tuples -> BlockSizes."""
  return BlockSizes(*fwd, *dkv, *dq, **extra)


_MIB = 1 << 20

# Table key -> BlockSizes. TPU q blocks are multiples of 128 here (our kernels keep the log-sum-exp
# in lanes in the dK/dV kernel), so MaxDiffusion's 3024 becomes 3072.
TABLE = {
    # MaxText base.yml / MaxDiffusion Wan default: 512 everywhere; v4 has 16 MiB VMEM per core.
    "v4": _uniform((512, 512, 512), (512, 512, 512), (512, 512), vmem_limit_bytes=14 * _MIB),
    # MaxText v5e benchmarks (llama3.1-8b, seq 8192): 2048 everywhere; fwd kv_compute 1024 from
    # research/kernels.md §6.4 (MaxDiffusion's Wan compute split).
    "v5e": _uniform((2048, 2048, 1024), (2048, 2048, 1024), (2048, 2048),
                    vmem_limit_bytes=96 * _MIB),
    # MaxDiffusion base_wan_14b.yml "Use on v5p": fwd 3024/2048/1024, dkv 1024/3072/256,
    # dq 1024/3072.
    "v5p": _uniform((3072, 2048, 1024), (1024, 3072, 256), (1024, 3072),
                    vmem_limit_bytes=48 * _MIB),
    # MaxDiffusion base_wan_14b.yml "Use on v6e": 3024/2048/1024 for every kernel.
    "v6e": _uniform((3072, 2048, 1024), (3072, 2048, 1024), (3072, 2048),
                    vmem_limit_bytes=96 * _MIB),
    # 7x: MaxDiffusion's custom ring kernel uses q 4864 / kv 1024 / compute 1024 per shard; we
    # take kv/compute from it and a 2048 q block, within 64 MiB VMEM per core.
    "7x": _uniform((2048, 1024, 1024), (2048, 1024, 1024), (2048, 1024),
                   vmem_limit_bytes=48 * _MIB),
    # tokamax H100 autotuning data (Pallas Triton, bf16, D=128): fwd 128/128, 8 warps, 3 stages;
    # bwd 64s with 4 warps, 2 stages. Our GPU body uses one num_warps/num_stages for all kernels,
    # so the backward blocks take the bwd sizes and the launch takes the fwd parameters.
    "h100": _uniform((128, 128, 128), (64, 64, 64), (64, 64), num_warps=8, num_stages=3),
    # H200 is an H100 with more/faster HBM: same SM, same tiles (reference: the H100 entry).
    "h200": _uniform((128, 128, 128), (64, 64, 64), (64, 64), num_warps=8, num_stages=3),
    # Fallbacks: research/kernels.md §8 (512s on TPU, jax's Triton default 128/128 on GPU).
    "tpu": BlockSizes(),
    "gpu": _uniform((128, 128, 128), (64, 64, 64), (64, 64), num_warps=4, num_stages=2),
    # CPU interpret mode: big blocks keep the interpreter's grid small.
    "cpu": BlockSizes(),
}


def device_key(device=None) -> str:
  """Table key of a device from its device_kind ("TPU v5 lite" -> "v5e", "NVIDIA H100 ..." ...)."""
  device = device or jax.devices()[0]
  kind = device.device_kind.lower()
  if device.platform == "tpu":
    for pattern, key in (("v5 lite", "v5e"), ("v5e", "v5e"), ("v5p", "v5p"), ("v5", "v5p"),
                         ("v6", "v6e"), ("7x", "7x"), ("v7", "7x"), ("v4", "v4")):
      if pattern in kind:
        return key
    return "tpu"
  if device.platform == "gpu":
    for key in _GPU_KEYS:
      if key in kind:
        return key
    return "gpu"
  return "cpu"


# The GPU table keys named by their device_kind; "gpu" is the entry of any other GPU.
_GPU_KEYS = ("h100", "h200")


def platform_of(key: str) -> str:
  """"tpu" | "gpu" | "cpu": the platform of a table key."""
  if key not in TABLE:
    raise ValueError(f"unknown device key {key!r}; known: {sorted(TABLE)}")
  return "cpu" if key == "cpu" else "gpu" if key in _GPU_KEYS + ("gpu",) else "tpu"


def block_sizes_for(key: str | None = None) -> BlockSizes:
  """The table entry for `key` (default: the first local device)."""
  return TABLE[key or device_key()]
