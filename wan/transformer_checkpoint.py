"""Loading and saving Wan transformer checkpoints: diffusers format and the original Wan-AI layout.

Both layouts are described by one table from our parameter paths to PyTorch tensor names; loading
converts PyTorch layouts to ours (linear (out, in) -> (in, out), Conv3d (O, I, T, H, W) ->
(T, H, W, I, O), modulation tables (1, n, D) -> (n, D)) and stacks the per-layer tensors on the
"layers" axis; saving does the inverse and writes a diffusers directory that diffusers and
ComfyUI load.
"""

import dataclasses
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from wan import params as params_lib
from wan import safetensors_io

STEM = "diffusion_pytorch_model"
_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_IGNORED = ("norm_added_q",)  # present in some diffusers files, unused by the model (as diffusers)
EXPERTS = {"high_noise": ("transformer", "high_noise_model"),
           "low_noise": ("transformer_2", "low_noise_model")}

# Our module path -> (diffusers name, original Wan name). Leaves map w/kernel/scale -> weight,
# b/bias -> bias; modulation tables map to the module name itself.
_TOP = {
    "patch_embed": ("patch_embedding", "patch_embedding"),
    "time_embed/fc1": ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    "time_embed/fc2": ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    "time_proj": ("condition_embedder.time_proj", "time_projection.1"),
    "text_embed/fc1": ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    "text_embed/fc2": ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    "image_embed/norm1": ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    "image_embed/fc1": ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    "image_embed/fc2": ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    "image_embed/norm2": ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    "image_embed/pos_embed": ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos"),
    "head/modulation": ("scale_shift_table", "head.modulation"),
    "head/proj": ("proj_out", "head.head"),
}
_BLOCK = {
    "modulation": ("scale_shift_table", "modulation"),
    "cross_norm": ("norm2", "norm3"),
    "ffn/fc1": ("ffn.net.0.proj", "ffn.0"),
    "ffn/fc2": ("ffn.net.2", "ffn.2"),
}
for _ours, _diff, _orig in (("self_attn", "attn1", "self_attn"),
                            ("cross_attn", "attn2", "cross_attn")):
  for _a, _d, _o in (("q", "to_q", "q"), ("k", "to_k", "k"), ("v", "to_v", "v"),
                     ("o", "to_out.0", "o"), ("norm_q", "norm_q", "norm_q"),
                     ("norm_k", "norm_k", "norm_k"), ("k_img", "add_k_proj", "k_img"),
                     ("v_img", "add_v_proj", "v_img"), ("norm_k_img", "norm_added_k", "norm_k_img")):
    _BLOCK[f"{_ours}/{_a}"] = (f"{_diff}.{_d}", f"{_orig}.{_o}")
_LEAF = {"w": "weight", "kernel": "weight", "scale": "weight", "b": "bias", "bias": "bias"}


def _torch_names(path: str, layout: int, num_layers: int) -> list[str]:
  """PyTorch tensor names of one of our leaves (one per layer for stacked block leaves)."""
  parts = path.split("/")
  stacked = parts[0] == "blocks"
  table, parts = (_BLOCK, parts[1:]) if stacked else (_TOP, parts)
  module, leaf = "/".join(parts), None
  if module not in table:
    module, leaf = "/".join(parts[:-1]), parts[-1]
  name = table[module][layout] + ("" if leaf is None else "." + _LEAF[leaf])
  return [f"blocks.{i}.{name}" for i in range(num_layers)] if stacked else [name]


def _torch_shape(path: str, shape: tuple) -> tuple:
  """The PyTorch shape of one (unstacked) leaf of ours."""
  if path.endswith("patch_embed/kernel"):
    return (shape[4], shape[3], *shape[:3])
  if path.endswith("modulation"):
    return (1, *shape)
  if path.endswith("/w"):
    return shape[::-1]
  return shape


def _to_ours(path: str, t: np.ndarray) -> np.ndarray:
  if path.endswith("patch_embed/kernel"):
    return t.transpose(2, 3, 4, 1, 0)
  if path.endswith("modulation"):
    return t.reshape(t.shape[1:])
  if path.endswith("/w"):
    return t.T
  return t


def _to_torch(path: str, a: np.ndarray) -> np.ndarray:
  if path.endswith("patch_embed/kernel"):
    return a.transpose(4, 3, 0, 1, 2)
  if path.endswith("modulation"):
    return a[None]
  if path.endswith("/w"):
    return a.T
  return a


def _leaves(cfg):
  from wan import transformer  # the declarations live with the model
  leaves, treedef = jax.tree.flatten_with_path(transformer.param_decls(cfg),
                                               is_leaf=params_lib.is_param)
  paths = ["/".join(k.key for k in path) for path, _ in leaves]
  return paths, [p for _, p in leaves], treedef


# ----------------------------------------------------------------------------------------------
# Configs


_DIFFUSERS_FIELDS = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels",
                     "out_channels", "text_dim", "freq_dim", "ffn_dim", "num_layers",
                     "cross_attn_norm", "qk_norm", "eps", "image_dim", "added_kv_proj_dim",
                     "rope_max_seq_len", "pos_embed_seq_len")


def _config_from_diffusers(raw: dict):
  from wan import transformer
  kw = {k: raw[k] for k in _DIFFUSERS_FIELDS if k in raw}
  kw["patch_size"] = tuple(kw.get("patch_size", (1, 2, 2)))
  kw["out_channels"] = kw.get("out_channels") or kw.get("in_channels", 16)
  return transformer.Config(**kw)


def _config_from_original(raw: dict, tensors: dict):
  from wan import transformer
  dim, heads = raw["dim"], raw["num_heads"]
  image_dim = added = None
  if "img_emb.proj.1.weight" in tensors:  # Wan 2.1 I2V / FLF2V carry a CLIP branch
    image_dim = tensors["img_emb.proj.1.weight"].shape[1]
    added = tensors["blocks.0.cross_attn.k_img.weight"].shape[1]
  pos = tensors["img_emb.emb_pos"].shape[1] if "img_emb.emb_pos" in tensors else None
  return transformer.Config(
      patch_size=tuple(raw.get("patch_size", (1, 2, 2))), num_attention_heads=heads,
      attention_head_dim=dim // heads, in_channels=raw["in_dim"], out_channels=raw["out_dim"],
      text_dim=raw.get("text_dim", 4096), freq_dim=raw.get("freq_dim", 256),
      ffn_dim=raw["ffn_dim"], num_layers=raw["num_layers"],
      cross_attn_norm=raw.get("cross_attn_norm", True),
      qk_norm="rms_norm_across_heads" if raw.get("qk_norm", True) else None,
      eps=raw.get("eps", 1e-6), image_dim=image_dim, added_kv_proj_dim=added,
      pos_embed_seq_len=pos)


def _config_to_diffusers(cfg) -> dict:
  raw = {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.35.0"}
  raw.update({k: getattr(cfg, k) for k in _DIFFUSERS_FIELDS})
  raw["patch_size"] = list(cfg.patch_size)
  return raw


# ----------------------------------------------------------------------------------------------
# Loading


def resolve_dir(path: str, expert: str = "high_noise") -> str:
  """The directory holding the transformer's config.json and weights.

  `path` may be that directory, a diffusers model root (transformer/, and transformer_2/ for the
  Wan 2.2 A14B low-noise expert) or an original Wan 2.2 A14B root (high_noise_model/,
  low_noise_model/). `expert` picks the A14B expert: "high_noise" or "low_noise".
  """
  if expert not in EXPERTS:
    raise ValueError(f"expert={expert!r} is not one of {sorted(EXPERTS)}")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"transformer checkpoint directory {path!r} does not exist")
  if expert == "high_noise" and os.path.exists(os.path.join(path, "config.json")):
    return path
  for sub in EXPERTS[expert]:
    if os.path.isdir(os.path.join(path, sub)):
      return os.path.join(path, sub)
  raise FileNotFoundError(
      f"{path!r} holds no transformer for expert {expert!r}: expected config.json there or a "
      f"subdirectory {' or '.join(EXPERTS[expert])}")


def _read_tensors(directory: str) -> dict:
  try:
    tensors = safetensors_io.load_dir(directory, STEM)
  except FileNotFoundError:
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
      raise FileNotFoundError(f"no .safetensors weights in {directory}") from None
    tensors = {}
    for f in files:
      tensors.update(safetensors_io.load_file(os.path.join(directory, f)))
  out = {}
  for name, t in tensors.items():
    for prefix in _PREFIXES:
      if name.startswith(prefix):
        name = name[len(prefix):]
    out[name] = t
  return out


def _read_config(directory: str, tensors: dict):
  with open(os.path.join(directory, "config.json")) as f:
    raw = json.load(f)
  if "dim" in raw and "num_heads" in raw:
    return _config_from_original(raw, tensors), 1
  if "num_attention_heads" in raw:
    return _config_from_diffusers(raw), 0
  raise ValueError(f"{directory}/config.json is neither a diffusers WanTransformer3DModel "
                   "config (num_attention_heads, ...) nor an original Wan config (dim, ...)")


def read_config(path: str, expert: str = "high_noise"):
  """The architecture of a checkpoint without reading its weights (headers only)."""
  directory = resolve_dir(path, expert)
  return _read_config(directory, _read_tensors(directory))[0]


def load(path: str, dtype=jnp.float32, *, expert: str = "high_noise"):
  """Loads a transformer: (cfg, params) with params as host NumPy arrays in `dtype`.

  `path`: a diffusers transformer directory (config.json + diffusion_pytorch_model.safetensors,
  or shards with an index), a diffusers model root (its transformer/ is used; for Wan 2.2 A14B
  `expert="low_noise"` picks transformer_2/), or an original Wan-AI checkpoint directory
  (config.json with dim/num_heads + safetensors with the original names). Place the result with
  `jax.device_put(params, wan.params.shardings(...))`. Any missing, unexpected or mis-shaped
  tensor is an error that names it.
  """
  directory = resolve_dir(path, expert)
  tensors = _read_tensors(directory)
  cfg, layout = _read_config(directory, tensors)
  cfg = dataclasses.replace(cfg, weights_dtype=jnp.dtype(dtype).name)
  return cfg, convert(tensors, cfg, layout, dtype, source=directory)


def convert(tensors: dict, cfg, layout: int, dtype, source: str = "checkpoint"):
  """PyTorch-named tensors -> our parameter tree (layout 0: diffusers, 1: original Wan)."""
  paths, decls, treedef = _leaves(cfg)
  np_dtype = np.dtype(jnp.dtype(dtype))
  problems, used, values = [], set(), []
  for path, decl in zip(paths, decls):
    stacked = path.startswith("blocks/")
    names = _torch_names(path, layout, cfg.num_layers)
    want = _torch_shape(path, decl.shape[1:] if stacked else decl.shape)
    layers = []
    for name in names:
      used.add(name)
      if name not in tensors:
        problems.append(f"missing tensor {name} (expected shape {want})")
      elif tuple(tensors[name].shape) != want:
        problems.append(f"tensor {name} has shape {tuple(tensors[name].shape)}, expected {want}")
      else:
        layers.append(_to_ours(path, np.asarray(tensors[name])).astype(np_dtype))
    if len(layers) == len(names):
      values.append(np.stack(layers) if stacked else layers[0])
  extra = sorted(n for n in set(tensors) - used if not any(s in n for s in _IGNORED))
  problems += [f"unexpected tensor {n} (not part of this model config)" for n in extra]
  if problems:
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise ValueError(f"{source} does not match the Wan transformer config:\n  " +
                     "\n  ".join(problems[:20]) + more)
  return jax.tree.unflatten(treedef, values)


# ----------------------------------------------------------------------------------------------
# Saving


def to_torch_tensors(cfg, params) -> dict[str, np.ndarray]:
  """Our parameter tree -> diffusers-named tensors in PyTorch layout."""
  paths, _, treedef = _leaves(cfg)
  arrays = treedef.flatten_up_to(params)
  tensors = {}
  for path, a in zip(paths, arrays):
    a = np.asarray(jax.device_get(a))
    names = _torch_names(path, 0, cfg.num_layers)
    layers = a if path.startswith("blocks/") else [a]
    for name, layer in zip(names, layers):
      tensors[name] = np.ascontiguousarray(_to_torch(path, layer))
  return tensors


def save(path: str, cfg, params, max_shard_bytes: int = 5 * 2**30):
  """Writes a diffusers-format transformer directory (config.json + safetensors) atomically.

  The directory is written next to `path` under a temporary name and renamed into place, so an
  interrupted save never leaves a half-written model where a complete one was.
  """
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    safetensors_io.save_dir(to_torch_tensors(cfg, params), tmp, STEM, max_shard_bytes)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(_config_to_diffusers(cfg), f, indent=2)
    if os.path.exists(path):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
      os.rename(path, os.path.join(old, "x"))
      os.rename(tmp, path)
      shutil.rmtree(old)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def shapes(cfg) -> dict[str, tuple]:
  """diffusers tensor name -> PyTorch shape, for every tensor of `cfg` (documentation, tests)."""
  paths, decls, _ = _leaves(cfg)
  out = {}
  for path, decl in zip(paths, decls):
    stacked = path.startswith("blocks/")
    for name in _torch_names(path, 0, cfg.num_layers):
      out[name] = _torch_shape(path, decl.shape[1:] if stacked else decl.shape)
  return out

