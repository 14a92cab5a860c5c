"""Reading Wan VAE checkpoints: diffusers and original Wan-AI tensor names, PyTorch layouts.

Our parameter tree (wan/vae.py `declarations`) groups both VAE versions into stages:
encoder.down_blocks[i] = {resnets: [...], downsampler}, decoder.up_blocks[i] = {resnets: [...],
upsampler}. The checkpoints name the same tensors differently:

  diffusers 2.1   encoder.down_blocks.<flat index>     (resnets and resamplers in one list)
                  decoder.up_blocks.<i>.upsamplers.0
  diffusers 2.2   encoder.down_blocks.<i>.resnets.<j>, .downsampler; decoder...upsampler
  Wan-AI 2.1      encoder.downsamples.<flat index>, decoder.upsamples.<flat index>,
                  residual.{0,2,3,6} for norm1/conv1/norm2/conv2, middle.{0,1,2}, head.{0,2},
                  conv1 / conv2 for quant_conv / post_quant_conv
  Wan-AI 2.2      encoder.downsamples.<i>.downsamples.<j>, decoder.upsamples.<i>.upsamples.<j>
                  (otherwise as Wan-AI 2.1)

PyTorch layouts: Conv3d (O, I, T, H, W) -> ours (T, H, W, I, O); Conv2d (O, I, H, W) -> (H, W,
I, O); a 1x1 Conv2d used as a dense layer -> (I, O); norm gammas (C, 1, 1[, 1]) -> (C,).
"""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from wan.params import is_param

_LEAF = {"kernel": "weight", "scale": "gamma", "bias": "bias"}
_RESNET_ORIGINAL = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3",
                    "conv2": "residual.6", "conv_shortcut": "shortcut"}


def read_safetensors(path: str) -> dict:
  if not path.endswith(".safetensors"):
    raise ValueError(f"{path}: only .safetensors checkpoints are read; convert a .pth once with "
                     "torch.load + safetensors.torch.save_file")
  return load_file(path)


def read_safetensors_dir(path: str) -> dict:
  """All tensors of a diffusers model directory: the single file, or its shards; a variant
  (diffusion_pytorch_model.fp16.safetensors) only when there is nothing else."""
  files = [os.path.join(path, "diffusion_pytorch_model.safetensors")]
  if not os.path.exists(files[0]):
    files = sorted(glob.glob(os.path.join(path, "diffusion_pytorch_model-*-of-*.safetensors")))
  if not files:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))[:1]
  if not files:
    raise FileNotFoundError(f"{path} has no .safetensors file (diffusion_pytorch_model.safetensors)")
  tensors = {}
  for f in files:
    tensors.update(load_file(f))
  return tensors


def param_paths(decls):
  """[(path tuple of str/int, Param)] of the declaration tree."""
  out = []
  for path, p in jax.tree.flatten_with_path(decls, is_leaf=is_param)[0]:
    out.append((tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path), p))
  return out


def _stage_name(stage: int, j: int, rest: list, cfg, original: bool, encoder: bool) -> list:
  """Checkpoint name parts of block `j` of a stage: resnets are 0 .. n-1, the resampler is n
  (n = num_res_blocks in the encoder, num_res_blocks + 1 in the decoder)."""
  n = cfg.num_res_blocks if encoder else cfg.num_res_blocks + 1
  resampler = j == n
  if resampler and rest[0] == "conv":
    rest = ["resample", 1] + rest[1:]  # torch: Sequential(pad or upsample, conv)
  if original and cfg.is_residual:
    group = "downsamples" if encoder else "upsamples"
    return [group, stage, group, j] + rest
  if original or (encoder and not cfg.is_residual):
    # One flat list per encoder/decoder: each earlier stage holds n blocks plus a resampler
    # (every stage but the last has one).
    flat = stage * (n + 1) + j
    return ["downsamples" if original and encoder else "upsamples" if original else
            "down_blocks", flat] + rest
  block = ["down_blocks" if encoder else "up_blocks", stage]
  if not resampler:
    return block + ["resnets", j] + rest
  if encoder:
    return block + ["downsampler"] + rest
  return block + (["upsampler"] if cfg.is_residual else ["upsamplers", 0]) + rest


def checkpoint_name(path: tuple, cfg, original: bool = False) -> str:
  """Tensor name, in a diffusers or original Wan-AI checkpoint, of our parameter at `path`."""
  parts = list(path[:-1])
  if len(parts) > 3 and parts[1] in ("down_blocks", "up_blocks"):
    encoder = parts[1] == "down_blocks"
    stage, kind = parts[2], parts[3]
    if kind == "resnets":
      j, rest = parts[4], parts[5:]
    else:
      j, rest = cfg.num_res_blocks + (0 if encoder else 1), parts[4:]
    parts = [parts[0]] + _stage_name(stage, j, rest, cfg, original, encoder)
  name = ".".join(str(p) for p in parts) + "." + _LEAF[path[-1]]
  return _original_rename(name) if original else name


def _original_rename(name: str) -> str:
  for ours, theirs in _RESNET_ORIGINAL.items():
    name = name.replace(f".{ours}.", f".{theirs}.")
  for ours, theirs in (("mid_block.resnets.0.", "middle.0."), ("mid_block.attentions.0.", "middle.1."),
                       ("mid_block.resnets.1.", "middle.2."), ("norm_out.", "head.0."),
                       ("conv_out.", "head.2."), ("encoder.conv_in.", "encoder.conv1."),
                       ("decoder.conv_in.", "decoder.conv1.")):
    name = name.replace(ours, theirs)
  if name.startswith("quant_conv."):
    name = "conv1." + name.split(".", 1)[1]
  elif name.startswith("post_quant_conv."):
    name = "conv2." + name.split(".", 1)[1]
  return name


def names(decls, cfg, original: bool = False) -> dict:
  """{our path: checkpoint tensor name} for every declared parameter."""
  return {path: checkpoint_name(path, cfg, original) for path, _ in param_paths(decls)}


def is_original(tensors: dict) -> bool:
  return "encoder.conv1.weight" in tensors


def original_config(tensors: dict, presets: dict):
  """The released config matching an original Wan-AI checkpoint (by its latent width)."""
  z2 = tensors["conv1.weight"].shape[0] if "conv1.weight" in tensors else None
  by_width = {2 * presets[name].z_dim: presets[name] for name in ("wan2.1", "wan2.2")}
  if z2 in by_width:
    return by_width[z2]
  raise ValueError(f"original Wan VAE checkpoint with quant conv width {z2} matches no released "
                   "config (16 latent channels for Wan 2.1, 48 for Wan 2.2); pass its Config to load()")


def torch_shape(shape: tuple, torch_rank: int) -> tuple:
  """The PyTorch shape that converts to our `shape` (for error messages)."""
  if len(shape) == 5:
    return (shape[4], shape[3]) + shape[:3]
  if len(shape) == 4:
    return (shape[3], shape[2]) + shape[:2]
  if len(shape) == 2:
    return (shape[1], shape[0], 1, 1)
  return shape + (1,) * (torch_rank - 1)


def _to_ours(t: np.ndarray, rank: int) -> np.ndarray:
  if rank == 5 and t.ndim == 5:
    return t.transpose(2, 3, 4, 1, 0)
  if rank == 4 and t.ndim == 4:
    return t.transpose(2, 3, 1, 0)
  if rank == 2 and t.ndim == 4 and t.shape[2:] == (1, 1):
    return t[:, :, 0, 0].T
  if rank == 1:
    return t.reshape(-1)
  return t


def convert(tensors: dict, decls, cfg, dtype) -> dict:
  """Our parameter tree from checkpoint tensors (diffusers or original Wan-AI names); errors
  name every missing, mis-shaped or unexpected tensor."""
  original = is_original(tensors)
  leaves, treedef = jax.tree.flatten_with_path(decls, is_leaf=is_param)
  missing, wrong, values, used = [], [], [], set()
  for (_, p), (path, _) in zip(leaves, param_paths(decls)):
    name = checkpoint_name(path, cfg, original)
    if name not in tensors:
      # Norm gammas are stored (C, 1, 1, 1) (attention norms (C, 1, 1)); biases are (C,).
      rank = 1 if path[-1] == "bias" else 4
      missing.append(f"{name} (expected shape {torch_shape(p.shape, rank)})")
      values.append(None)
      continue
    used.add(name)
    t = tensors[name]
    value = _to_ours(t, len(p.shape))
    if value.shape != p.shape:
      wrong.append(f"{name}: shape {t.shape}, expected {torch_shape(p.shape, t.ndim)} "
                   f"(ours {p.shape})")
    values.append(value)
  extra = sorted(set(tensors) - used)
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing tensor(s): " + "; ".join(missing[:10]))
  if wrong:
    problems.append(f"{len(wrong)} tensor(s) of the wrong shape: " + "; ".join(wrong[:10]))
  if extra:
    problems.append(f"{len(extra)} unexpected tensor(s) (does config.json match the weights?): "
                    + ", ".join(extra[:10]))
  if problems:
    raise ValueError("VAE checkpoint does not match its config: " + " | ".join(problems))
  return jax.tree.unflatten(treedef, [jnp.asarray(v.astype(dtype)) for v in values])
