"""The LoRA part of the plan: reads enable_lora, lora_config, lora_alpha and lora_targets
(wan/plan.py calls it; nothing else reads them).

  job=train, enable_lora       trains one adapter (rank = lora_config.rank[0]) over a frozen
                               base; the first LoRA of lora_model_name_or_path, if any, is where
                               it starts, the others are merged into the base at their scales
  job=generate, enable_lora    every listed LoRA is merged at its scale; a LoRA run's checkpoint
                               (rank, alpha and targets as it trained) is merged on top
"""

from wan import fs, lora
from wan.errors import ConfigError


def _fail(message):
  raise ConfigError(message)


def _per_lora(field: str, values, n: int, default):
  """A lora_config list with one entry per LoRA: empty (all `default`), one (for all) or n."""
  values = tuple(values)
  if not values:
    return (default,) * n
  if len(values) == 1 and n != 1 and field == "scale":
    return values * n
  if len(values) != n:
    _fail(f"lora_config.{field} has {len(values)} entries for {n} LoRA(s) in "
          f"lora_config.lora_model_name_or_path; give one per LoRA"
          + (" (or one for all)" if field == "scale" else "") + " or none")
  return values


def loads(paths, weight_names, adapter_names, scales, from_pt, ranks) -> tuple[lora.Load, ...]:
  """The LoRA files of lora_config (its lists, names split at commas), checked; their tensors
  are read when the run starts. ranks: lora_config.rank, one per LoRA (each file's rank is
  checked against its entry) or the one entry of the trained adapter."""
  n = len(paths)
  given = {"weight_name": weight_names, "adapter_name": adapter_names, "from_pt": from_pt}
  if not n:
    for field, values in given.items():
      if tuple(values):
        _fail(f"lora_config.{field}={tuple(values)!r} has no effect without "
              "lora_config.lora_model_name_or_path; leave it empty")
    if tuple(scales) not in ((), (1.0,)):
      _fail(f"lora_config.scale={tuple(scales)!r} has no effect without "
            "lora_config.lora_model_name_or_path; leave it at (1.0,)")
    return ()
  weight_names = _per_lora("weight_name", weight_names, n, "")
  adapter_names = _per_lora("adapter_name", adapter_names, n, "")
  scales = _per_lora("scale", scales, n, 1.0)
  from_pt = _per_lora("from_pt", from_pt, n, True)
  # One entry is the trained adapter's rank (a file may have a smaller one); one per LoRA is
  # each file's, checked when it is read. 0: any.
  ranks = tuple(int(r) for r in ranks) if len(ranks) == n > 1 else (0,) * n
  if not all(from_pt):
    _fail("lora_config.from_pt=False: LoRA files are read as PyTorch-named safetensors "
          "(diffusers, ComfyUI, musubi); set True or leave it empty")
  if len(set(adapter_names) - {""}) != len([a for a in adapter_names if a]):
    _fail(f"lora_config.adapter_name={adapter_names!r} repeats a name; name each LoRA once")
  out = []
  for path, weight_name, name, scale, rank in zip(paths, weight_names, adapter_names, scales,
                                                  ranks):
    path = fs.absolute(path)
    if not fs.is_remote(path) and not fs.exists(path):
      _fail(f"lora_config.lora_model_name_or_path: {path} does not exist (a LoRA .safetensors "
            "file or a directory holding one; Hugging Face repo names are not downloaded)")
    out.append(lora.Load(path, weight_name, name or fs.basename(path), float(scale), rank))
  return tuple(out)


def settings(c, model) -> lora.Settings | None:
  """The adapter a LoRA run trains (and a LoRA run's checkpoint holds); None without enable_lora."""
  if not c.enable_lora:
    return None
  ranks = tuple(c.lora_config.rank)
  n = len(tuple(c.lora_config.lora_model_name_or_path))
  if len(ranks) != 1 and len(ranks) != n:
    _fail(f"lora_config.rank={ranks!r}: give one rank (the trained adapter's) or one per LoRA of "
          f"lora_config.lora_model_name_or_path ({n}; the first is the trained adapter's)")
  if not ranks:
    _fail("lora_config.rank is empty: give the trained adapter's rank")
  rank = int(ranks[0])
  if rank < 1:
    _fail(f"lora_config.rank={rank} must be >= 1")
  if c.lora_alpha < 0:
    _fail(f"lora_alpha={c.lora_alpha} must be > 0, or 0 for alpha = rank")
  try:
    targets = lora.targets(model, c.lora_targets)
  except ValueError as e:
    _fail(str(e))
  return lora.Settings(rank, float(c.lora_alpha or rank), targets)
