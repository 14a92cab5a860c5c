"""Wan transformer checkpoints: diffusers and original Wan-AI names, and the diffusers writer.

One table maps our module paths to both PyTorch names; the layouts follow from the leaf (Linear
(out, in) -> our (in, out) kernel, Conv3d (O, I, T, H, W) -> (T, H, W, I, O) patch embedding,
(1, n, D) -> (n, D) modulation tables). An original Wan-AI config.json (dim, num_heads, in_dim,
...) is translated into the diffusers architecture fields, the image branch read off the tensor
shapes. Writing produces a diffusers directory that diffusers and ComfyUI load.
"""

import dataclasses
import json

import jax.numpy as jnp

from wan import fs
from wan.errors import CheckpointError
from wan.weights import convert, roots, safetensors

STEM = "diffusion_pytorch_model"
LAYOUTS = ("diffusers", "original")
# The architecture: diffusers' WanTransformer3DModel config.json fields.
FIELDS = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels",
          "out_channels", "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm",
          "qk_norm", "eps", "image_dim", "added_kv_proj_dim", "rope_max_seq_len",
          "pos_embed_seq_len")
_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# Present in some diffusers files and unused by the model (as in diffusers).
_IGNORED = (r".*norm_added_q\.",)
_DIFFUSERS_VERSION = "0.35.0"

# Our module path -> (diffusers name, original Wan name). Leaves map kernel/scale -> weight and
# bias -> bias; modulation tables and the image position embedding map to the name itself.
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
                     ("v_img", "add_v_proj", "v_img"),
                     ("norm_k_img", "norm_added_k", "norm_k_img")):
    _BLOCK[f"{_ours}/{_a}"] = (f"{_diff}.{_d}", f"{_orig}.{_o}")
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def block_module_names(module: str) -> tuple[str, str]:
  """(diffusers name, original Wan name) of a block module ("self_attn/q" -> ("attn1.to_q",
  "self_attn.q")), without the "blocks.{layer}." prefix."""
  return _BLOCK[module]


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A transformer checkpoint as read: where, its architecture (diffusers config.json fields),
  its naming ("diffusers" | "original") and its tensors (PyTorch names and layouts)."""
  directory: str
  architecture: dict
  layout: str
  tensors: dict


# ----------------------------------------------------------------------------------------------
# Names


def _layout(path: str, leaf: str | None, shape: tuple) -> convert.Layout:
  if path == "patch_embed/kernel":
    return convert.conv(shape)
  if path.endswith("modulation"):
    return convert.Layout((1, *shape))
  if leaf == "kernel":
    return convert.linear(shape)
  return convert.Layout(shape)


def names(decls, layout: str = "diffusers") -> dict[str, convert.Tensor]:
  """{our path: checkpoint tensor} for every declared parameter, in `layout`'s names."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
  i = LAYOUTS.index(layout)
  top = {k: v[i] for k, v in _TOP.items()}
  block = {k: "blocks.{layer}." + v[i] for k, v in _BLOCK.items()}
  return convert.names_by_tables(decls, top, block, _LEAF, _layout, stack="blocks")


def tensor_shapes(decls) -> dict[str, tuple]:
  """diffusers tensor name -> PyTorch shape, for every tensor of the declarations."""
  return convert.tensor_shapes(decls, names(decls))


# ----------------------------------------------------------------------------------------------
# Reading


def _strip_prefixes(tensors: dict) -> dict:
  out = {}
  for name, t in tensors.items():
    for prefix in _PREFIXES:
      if name.startswith(prefix):
        name = name[len(prefix):]
    out[name] = t
  return out


def _from_original(raw: dict, shapes: dict) -> dict:
  """Diffusers architecture fields of an original Wan-AI config.json; `shapes`: name -> .shape."""
  dim, heads = raw["dim"], raw["num_heads"]
  # Wan 2.1 I2V / FLF2V carry a CLIP branch: its sizes are only in the tensors.
  dim_of = lambda name, axis: shapes[name].shape[axis] if name in shapes else None
  image_dim = dim_of("img_emb.proj.1.weight", 1)
  added = dim_of("blocks.0.cross_attn.k_img.weight", 1)
  pos = dim_of("img_emb.emb_pos", 1)
  return {
      "patch_size": list(raw.get("patch_size", (1, 2, 2))), "num_attention_heads": heads,
      "attention_head_dim": dim // heads, "in_channels": raw["in_dim"],
      "out_channels": raw["out_dim"], "text_dim": raw.get("text_dim", 4096),
      "freq_dim": raw.get("freq_dim", 256), "ffn_dim": raw["ffn_dim"],
      "num_layers": raw["num_layers"], "cross_attn_norm": raw.get("cross_attn_norm", True),
      "qk_norm": "rms_norm_across_heads" if raw.get("qk_norm", True) else None,
      "eps": raw.get("eps", 1e-6), "image_dim": image_dim, "added_kv_proj_dim": added,
      "rope_max_seq_len": 1024, "pos_embed_seq_len": pos,
  }


def _architecture(directory: str, shapes: dict) -> tuple[dict, str]:
  """(diffusers architecture fields, layout) from config.json and the tensors' shapes."""
  config_path = fs.join(directory, "config.json")
  raw = roots.read_json(config_path)
  try:
    if "dim" in raw and "num_heads" in raw:
      return _from_original(raw, shapes), "original"
  except KeyError as e:
    raise CheckpointError(f"{config_path}: an original Wan config without {e}") from None
  if "num_attention_heads" not in raw:
    raise CheckpointError(
        f"{config_path} is neither a diffusers WanTransformer3DModel config "
        "(num_attention_heads, ...) nor an original Wan config (dim, num_heads, ...)")
  return {k: raw[k] for k in FIELDS if k in raw}, "diffusers"


def read(path, expert: str = "high_noise") -> Checkpoint:
  """The transformer at `path`: a transformer directory (config.json + safetensors), a diffusers
  model root (transformer/, or transformer_2/ for the A14B `expert="low_noise"`) or an original
  Wan-AI directory or A14B root (high_noise_model/, low_noise_model/). Tensors are
  memory-mapped where local and read one by one when used from a bucket (safetensors.Ranged),
  `model.diffusion_model.` prefixes stripped."""
  directory = roots.resolve(path, "transformer", expert)
  tensors = _strip_prefixes(safetensors.read_dir(directory, STEM, lazy=True))
  architecture, layout = _architecture(directory, tensors)
  return Checkpoint(directory, architecture, layout, tensors)


def read_architecture(path, expert: str = "high_noise") -> dict:
  """As `read(...).architecture`, reading only the safetensors headers, no tensor data."""
  directory = roots.resolve(path, "transformer", expert)
  return _architecture(directory, _strip_prefixes(safetensors.read_dir_header(directory, STEM)))[0]


def to_params(tensors: dict, decls, layout: str, dtype=jnp.float32, source: str = "checkpoint",
              shardings=None):
  """Our parameter tree (host NumPy, or placed by `shardings`: convert.to_params; `dtype`
  unless a declaration pins one) from PyTorch-named tensors; every missing, mis-shaped or
  unexpected tensor is named in one CheckpointError."""
  return convert.to_params(tensors, decls, names(decls, layout), dtype, source=source,
                           what="Wan transformer", ignore=_IGNORED, shardings=shardings)


# ----------------------------------------------------------------------------------------------
# Writing


def to_tensors(params, decls) -> dict:
  """Our parameter tree -> diffusers-named tensors in PyTorch layouts."""
  return convert.to_tensors(params, decls, names(decls))


def write(path, architecture: dict, tensors: dict, max_shard_bytes: int = 5 * 2**30):
  """Writes a diffusers transformer directory (config.json + safetensors, sharded with an index
  above `max_shard_bytes`).

  The directory is written next to `path` under a temporary name and renamed into place: an
  interrupted write leaves an earlier model at `path` intact and no temporary directory behind.
  """
  config = {"_class_name": "WanTransformer3DModel", "_diffusers_version": _DIFFUSERS_VERSION,
            **architecture}

  def fill(tmp):
    safetensors.write_dir(tmp, tensors, STEM, max_shard_bytes)
    with fs.open_file(fs.join(tmp, "config.json"), "w") as f:
      json.dump(config, f, indent=2)
  fs.write_dir(path, fill)
