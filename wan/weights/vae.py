"""Wan VAE checkpoints: diffusers (2.1 and 2.2) and original Wan-AI tensor names.

Our parameter tree (wan/vae `declarations`) groups both VAE versions into stages:
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
I, O); a 1x1 Conv2d used as a dense layer (O, I, 1, 1) -> (I, O); norm gammas (C, 1, 1, 1)
(attention norms (C, 1, 1)) -> (C,).
"""

import dataclasses

from wan import fs
from wan.errors import CheckpointError, MissingFile
from wan.weights import convert, roots, safetensors

STEM = "diffusion_pytorch_model"
_LEAF = {"kernel": "weight", "scale": "gamma", "bias": "bias"}
_RESNET_ORIGINAL = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3",
                    "conv2": "residual.6", "conv_shortcut": "shortcut"}
_ORIGINAL = (("mid_block.resnets.0.", "middle.0."), ("mid_block.attentions.0.", "middle.1."),
             ("mid_block.resnets.1.", "middle.2."), ("norm_out.", "head.0."),
             ("conv_out.", "head.2."), ("encoder.conv_in.", "encoder.conv1."),
             ("decoder.conv_in.", "decoder.conv1."))


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A VAE checkpoint as read: the directory or file, its diffusers config.json (None for an
  original Wan-AI file) and its tensors (PyTorch names and layouts)."""
  source: str
  config: dict | None
  tensors: dict


# ----------------------------------------------------------------------------------------------
# Names


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


def checkpoint_name(path: str, cfg, original: bool = False) -> str:
  """Tensor name, in a diffusers or original Wan-AI checkpoint, of our parameter at `path`
  ("decoder/up_blocks/1/resnets/0/conv1/kernel"); `cfg`: num_res_blocks, is_residual."""
  keys = [int(k) if k.isdigit() else k for k in path.split("/")]
  parts = keys[:-1]
  if len(parts) > 3 and parts[1] in ("down_blocks", "up_blocks"):
    encoder = parts[1] == "down_blocks"
    stage, kind = parts[2], parts[3]
    if kind == "resnets":
      j, rest = parts[4], parts[5:]
    else:
      j, rest = cfg.num_res_blocks + (0 if encoder else 1), parts[4:]
    parts = [parts[0]] + _stage_name(stage, j, rest, cfg, original, encoder)
  name = ".".join(str(p) for p in parts) + "." + _LEAF[keys[-1]]
  return _original_rename(name) if original else name


def _original_rename(name: str) -> str:
  for ours, theirs in _RESNET_ORIGINAL.items():
    name = name.replace(f".{ours}.", f".{theirs}.")
  for ours, theirs in _ORIGINAL:
    name = name.replace(ours, theirs)
  if name.startswith("quant_conv."):
    name = "conv1." + name.split(".", 1)[1]
  elif name.startswith("post_quant_conv."):
    name = "conv2." + name.split(".", 1)[1]
  return name


def _layout(path: str, shape: tuple) -> convert.Layout:
  if path.endswith("/kernel"):
    # Our dense kernels (attention to_qkv / proj) are 1x1 Conv2d in PyTorch.
    return convert.conv(shape, torch_kernel=(1, 1) if len(shape) == 2 else None)
  if path.endswith("/scale"):
    return convert.Layout((*shape, 1, 1) if "/attentions/" in path else (*shape, 1, 1, 1))
  return convert.Layout(tuple(shape))


def names(decls, cfg, original: bool = False) -> dict[str, convert.Tensor]:
  """{our path: checkpoint tensor} for every declared parameter."""
  return {path: convert.Tensor(checkpoint_name(path, cfg, original), _layout(path, p.shape))
          for path, p in convert.leaves(decls)}


def tensor_shapes(decls, cfg) -> dict[str, tuple]:
  """diffusers tensor name -> PyTorch shape, for every tensor of the declarations."""
  return convert.tensor_shapes(decls, names(decls, cfg))


def is_original(tensors: dict) -> bool:
  return "encoder.conv1.weight" in tensors


# ----------------------------------------------------------------------------------------------
# Reading


def read(path) -> Checkpoint:
  """A diffusers VAE directory (config.json + diffusion_pytorch_model safetensors, or a model
  root with vae/) or an original Wan-AI VAE .safetensors file (Wan2.1_VAE / Wan2.2_VAE
  converted from .pth)."""
  path = str(path)
  if fs.isdir(path):
    directory = roots.resolve(path, "vae")
    config = roots.read_json(fs.join(directory, "config.json"))
    return Checkpoint(directory, config, safetensors.read_dir(directory, STEM))
  if not path.endswith(safetensors.SUFFIX):
    raise CheckpointError(f"{path}: only .safetensors checkpoints are read; convert a .pth once "
                          "with torch.load + safetensors.torch.save_file")
  if not fs.exists(path):
    raise MissingFile(f"VAE checkpoint {path} does not exist")
  tensors = safetensors.read_file(path)
  if not is_original(tensors):
    raise CheckpointError(f"{path} is neither a diffusers directory nor an original Wan-AI VAE "
                          "file (no encoder.conv1.weight); pass the directory holding config.json")
  return Checkpoint(path, None, tensors)


def original_preset(tensors: dict, presets: dict):
  """The released config (of `presets` "wan2.1", "wan2.2") matching an original Wan-AI file, by
  its latent width."""
  z2 = tensors["conv1.weight"].shape[0] if "conv1.weight" in tensors else None
  by_width = {2 * presets[name].z_dim: presets[name] for name in ("wan2.1", "wan2.2")}
  if z2 in by_width:
    return by_width[z2]
  raise CheckpointError(f"original Wan VAE checkpoint with quant conv width {z2} matches no "
                        "released config (16 latent channels for Wan 2.1, 48 for Wan 2.2); pass "
                        "its Config to load()")


def to_params(tensors: dict, decls, cfg, dtype, source: str = "checkpoint"):
  """Our parameter tree (host NumPy in `dtype`) from diffusers- or Wan-AI-named tensors."""
  return convert.to_params(tensors, decls, names(decls, cfg, is_original(tensors)), dtype,
                           source=source, what="Wan VAE")
