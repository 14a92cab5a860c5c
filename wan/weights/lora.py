"""LoRA files of the Wan transformer in the three formats other tools read and write.

- "diffusers": diffusers / PEFT names, what `pipe.load_lora_weights(dir)` reads by default
  (`pytorch_lora_weights.safetensors`): `transformer.blocks.0.attn1.to_q.lora_A.weight`. PEFT has
  no per-tensor alpha, so the written file carries the scale alpha / rank inside lora_B (its
  `lora_adapter_metadata`, PEFT's LoraConfig fields as a pipeline writes them, says
  lora_alpha = r); a file's lora_alpha there is honoured when read.
- "comfyui": `diffusion_model.` + the original Wan names, lora_A / lora_B and `.alpha`
  (`diffusion_model.blocks.0.self_attn.q.lora_A.weight`), what ComfyUI's LoRA loader reads.
- "musubi": kohya / musubi-tuner names, `lora_unet_blocks_0_self_attn_q.lora_down.weight`,
  `.lora_up.weight` and `.alpha`.
Reading also takes the other spellings in use (lora_down / lora_up under `diffusion_model.`,
names without the `transformer.` prefix).

In memory an adapter set is {module: {"lora_a": (L, in, r), "lora_b": (L, r, out)}} with
modules named as our block paths ("self_attn/q", "ffn/fc1"), layers stacked (a layer a file
does not hold is zero), and the file's scale (alpha / rank) folded into lora_b, so that the
layer's weight change is exactly lora_a @ lora_b. Modules of different ranks in one file are
zero-padded to the largest rank, which changes nothing in the product.
"""

import json
import re

import numpy as np

from wan import fs
from wan.errors import CheckpointError, MissingFile
from wan.weights import safetensors
from wan.weights import transformer as transformer_weights

# Every linear layer of a block (what a LoRA can adapt), as our module paths.
MODULES = ("self_attn/q", "self_attn/k", "self_attn/v", "self_attn/o",
           "cross_attn/q", "cross_attn/k", "cross_attn/v", "cross_attn/o",
           "cross_attn/k_img", "cross_attn/v_img", "ffn/fc1", "ffn/fc2")
FILES = {"diffusers": "pytorch_lora_weights.safetensors", "comfyui": "comfyui.safetensors",
         "musubi": "musubi.safetensors"}
_META = "lora_adapter_metadata"


def _diffusers(module: str) -> str:
  return "blocks.{layer}." + transformer_weights.block_module_names(module)[0]


def _original(module: str) -> str:
  return "blocks.{layer}." + transformer_weights.block_module_names(module)[1]


def _musubi(module: str, layer) -> str:
  return "lora_unet_" + _original(module).format(layer=layer).replace(".", "_")


def _keys(module: str, layer: int, fmt: str) -> tuple[str, str, str | None]:
  """(A name, B name, alpha name or None) of one module's layer in `fmt`."""
  if fmt == "diffusers":
    base = "transformer." + _diffusers(module).format(layer=layer)
    return f"{base}.lora_A.weight", f"{base}.lora_B.weight", None
  if fmt == "comfyui":
    base = "diffusion_model." + _original(module).format(layer=layer)
    return f"{base}.lora_A.weight", f"{base}.lora_B.weight", f"{base}.alpha"
  if fmt == "musubi":
    base = _musubi(module, layer)
    return f"{base}.lora_down.weight", f"{base}.lora_up.weight", f"{base}.alpha"
  raise ValueError(f"LoRA format {fmt!r} is not one of {sorted(FILES)}")


# ----------------------------------------------------------------------------------------------
# Writing


def to_tensors(adapters: dict, alpha: float, fmt: str) -> dict[str, np.ndarray]:
  """PyTorch-named tensors of `adapters` in `fmt`; `alpha` is written (comfyui, musubi) with
  lora_B divided by alpha / rank, so a reader scaling by alpha / rank gets the same change."""
  out = {}
  for module, ab in adapters.items():
    a, b = np.asarray(ab["lora_a"]), np.asarray(ab["lora_b"])
    rank = a.shape[-1]
    unscale = 1.0 if fmt == "diffusers" else rank / alpha
    for layer in range(a.shape[0]):
      a_name, b_name, alpha_name = _keys(module, layer, fmt)
      out[a_name] = np.ascontiguousarray(a[layer].T)
      out[b_name] = np.ascontiguousarray((b[layer] * unscale).astype(b.dtype).T)
      if alpha_name:
        out[alpha_name] = np.asarray(alpha, np.float32)
  return out


def write(directory: str, adapters: dict, alpha: float):
  """The three files of `adapters` as directory `directory`, written as a whole (an earlier
  one there is replaced only once all three are complete)."""
  rank = max(np.shape(ab["lora_a"])[-1] for ab in adapters.values())

  def fill(tmp):
    for fmt, name in FILES.items():
      metadata = None
      if fmt == "diffusers":  # the scale is in lora_B: alpha = rank for PEFT
        targets = sorted({transformer_weights.block_module_names(m)[0] for m in adapters})
        metadata = {_META: json.dumps({"transformer.r": rank, "transformer.lora_alpha": rank,
                                       "transformer.target_modules": targets})}
      safetensors.write_file(fs.join(tmp, name), to_tensors(adapters, alpha, fmt), metadata)
  fs.write_dir(directory, fill)


# ----------------------------------------------------------------------------------------------
# Reading


def resolve(path: str, weight_name: str = "") -> str:
  """The LoRA file of `path`: a .safetensors file, or a directory holding `weight_name`, the
  diffusers file, or exactly one .safetensors."""
  path = fs.absolute(path)
  if not fs.exists(path):
    raise MissingFile(f"LoRA {path} does not exist")
  if not fs.isdir(path):
    if weight_name:
      raise CheckpointError(f"LoRA {path} is a file; weight_name={weight_name!r} names a file in "
                            "a directory: give the directory, or leave weight_name empty")
    return path
  if weight_name:
    found = fs.join(path, weight_name)
    if not fs.exists(found):
      raise MissingFile(f"LoRA directory {path} holds no {weight_name}")
    return found
  if fs.exists(fs.join(path, FILES["diffusers"])):
    return fs.join(path, FILES["diffusers"])
  files = sorted(n for n in fs.listdir(path) if n.endswith(safetensors.SUFFIX))
  if len(files) != 1:
    raise MissingFile(f"LoRA directory {path} holds {len(files)} .safetensors files "
                      f"({', '.join(files) or 'none'}); set weight_name to the one to load")
  return fs.join(path, files[0])


def _module_tables():
  """name pattern -> our module, for every spelling: diffusers, original and musubi."""
  tables = []
  for module in MODULES:
    for template in (_diffusers(module), _original(module)):
      tables.append((re.compile(re.escape(template).replace(r"\{layer\}", r"(\d+)") + "$"),
                     module))
    tables.append((re.compile(re.escape(_musubi(module, "{layer}")).replace(r"\{layer\}",
                                                                            r"(\d+)") + "$"),
                   module))
  return tables


_TABLES = _module_tables()
_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.", "model.diffusion_model.")
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_down.weight": "A",
             ".lora_up.weight": "B", ".alpha": "alpha"}


def _parse(name: str):
  """(module, layer, part) of a tensor name, or None for a name no format gives a block linear."""
  for suffix, part in _SUFFIXES.items():
    if name.endswith(suffix):
      stem = name[:-len(suffix)]
      break
  else:
    return None
  for prefix in _PREFIXES:
    if stem.startswith(prefix):
      stem = stem[len(prefix):]
      break
  for pattern, module in _TABLES:
    m = pattern.match(stem)
    if m:
      return module, int(m.group(1)), part
  return None


def _peft_alpha(path: str, metadata: dict) -> float | None:
  """PEFT's lora_alpha from a diffusers file's metadata (None: alpha = rank)."""
  if _META not in metadata:
    return None
  try:
    config = json.loads(metadata[_META])
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: unreadable {_META} ({e})") from None
  # A pipeline's file prefixes each component's LoraConfig fields ("transformer.lora_alpha").
  config = {k.removeprefix("transformer."): v for k, v in config.items()}
  if config.get("alpha_pattern") or config.get("rank_pattern"):
    raise CheckpointError(f"{path}: per-module alpha_pattern / rank_pattern in its {_META} are "
                          "not supported; merge the LoRA with PEFT and save it again")
  alpha = config.get("lora_alpha")
  return None if alpha is None else float(alpha)


def read(path: str, weight_name: str = "") -> dict:
  """The adapter set (see the module docstring) of a LoRA file in any of the three formats."""
  file = resolve(path, weight_name)
  tensors = safetensors.read_file(file)
  peft_alpha = _peft_alpha(file, safetensors.read_metadata(file))
  parts, unknown = {}, []
  for name, t in tensors.items():
    parsed = _parse(name)
    if parsed is None:
      unknown.append(name)
    else:
      module, layer, part = parsed
      parts.setdefault(module, {}).setdefault(layer, {})[part] = np.asarray(t, np.float32)
  if unknown:
    shown = ", ".join(sorted(unknown)[:8]) + (f" and {len(unknown) - 8} more"
                                              if len(unknown) > 8 else "")
    raise CheckpointError(
        f"{file}: {len(unknown)} tensor(s) are not LoRA factors of a block's linear layers "
        f"(self/cross-attention q, k, v, o, k_img, v_img; FFN): {shown}. Weight or bias "
        "differences (.diff, .diff_b) and adapters of other layers are not supported")
  if not parts:
    raise CheckpointError(f"{file} holds no tensors")
  return {module: _stack(file, module, layers, peft_alpha) for module, layers in parts.items()}


def _stack(file: str, module: str, layers: dict, peft_alpha) -> dict:
  """One module's per-layer factors -> stacked (L, in, r) and scaled (L, r, out)."""
  rank = 0
  shapes = set()
  for layer, p in layers.items():
    if "A" not in p or "B" not in p:
      raise CheckpointError(f"{file}: block {layer} {module} has only "
                            f"{'lora_A' if 'A' in p else 'lora_B'}; a LoRA needs both factors")
    a, b = p["A"], p["B"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
      raise CheckpointError(f"{file}: block {layer} {module}: lora_A {a.shape} and lora_B "
                            f"{b.shape} are not (rank, in) and (out, rank)")
    rank = max(rank, a.shape[0])
    shapes.add((a.shape[1], b.shape[0]))
  if len(shapes) != 1:
    raise CheckpointError(f"{file}: {module} has different (in, out) sizes across blocks: "
                          f"{sorted(shapes)}")
  (n_in, n_out), = shapes
  n = max(layers) + 1
  lora_a = np.zeros((n, n_in, rank), np.float32)
  lora_b = np.zeros((n, rank, n_out), np.float32)
  for layer, p in layers.items():
    r = p["A"].shape[0]
    alpha = p["alpha"].item() if "alpha" in p else (peft_alpha if peft_alpha is not None else r)
    lora_a[layer, :, :r] = p["A"].T
    lora_b[layer, :r, :] = p["B"].T * (alpha / r)
  return {"lora_a": lora_a, "lora_b": lora_b}
