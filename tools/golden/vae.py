"""Golden files for the Wan VAE (2.1 and 2.2 layouts) from diffusers' `AutoencoderKLWan`.

For each kind a tiny randomly initialised model is written with `save_pretrained` (weights in
float16 to keep the files small; the reference runs in float32 on exactly those rounded weights)
into tests/golden/vae_<kind>/, together with `golden.npz`:

    video      (1, 3, 9, H, W)   float16 input in [-1, 1], channels-first as diffusers takes it
    mean       (1, z, 3, h, w)   float32 posterior mean of `encode(video)`
    latents    (1, z, 3, h, w)   float16 random latents (decoder input)
    decoded    (1, 3, 9, H, W)   float32 `decode(latents)`, clamped to [-1, 1] as diffusers does
    mean_tiled, decoded_tiled    (Wan 2.2 only) the same with diffusers' spatial tiling enabled

Also tests/golden/vae_keys.json: the tensor names and PyTorch shapes of the released Wan 2.1 and
Wan 2.2 configurations (built on the meta device, no weights), and the original Wan-AI names of
the Wan 2.1 tensors, checked by mapping them back with diffusers' own
`convert_wan_vae_to_diffusers`; vae_wan21/original_names.json applies the same naming to the tiny
model.

Nine frames (1 + 4k, k = 2) so that the first-frame pass and two cached 4-frame chunks both run;
spatial sizes are multiples of the compression factor but not powers of two.
"""

import os

import json
import re

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

KINDS = {
    # Wan 2.1 layout: plain down/up blocks, 8x spatial. (diffusers cannot run a non-empty
    # attn_scales: its encoder passes the chunk cache to the attention block.)
    "wan21": dict(
        config=dict(base_dim=4, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=2,
                    attn_scales=[], temperal_downsample=[False, True, True],
                    latents_mean=[-0.3, 0.2, 0.5, -0.1], latents_std=[1.5, 0.7, 2.0, 1.1]),
        size=(24, 40),
    ),
    # Wan 2.2 layout: patchify 2, residual avg-down / dup-up paths, wider decoder, 16x spatial.
    "wan22": dict(
        config=dict(base_dim=4, decoder_base_dim=6, z_dim=6, dim_mult=[1, 2, 2, 2],
                    num_res_blocks=1, attn_scales=[], temperal_downsample=[False, True, True],
                    is_residual=True, in_channels=12, out_channels=12, patch_size=2,
                    scale_factor_spatial=16,
                    latents_mean=[0.1, -0.4, 0.3, 0.0, -0.2, 0.6],
                    latents_std=[0.9, 1.3, 2.2, 0.6, 1.0, 1.7]),
        size=(48, 48),
        # diffusers' enable_tiling sizes (min, stride) for a second, tiled encode and decode.
        tiling=dict(encode=(16, 8), decode=(32, 16)),
    ),
}
FRAMES = 9


def _randomize(model: torch.nn.Module, gen: torch.Generator):
  """Moves every parameter off its default so that no norm or bias is an identity."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("gamma"):
        p.copy_(torch.empty_like(p).uniform_(0.5, 1.5, generator=gen))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
      else:
        p.mul_(torch.empty_like(p).uniform_(0.8, 1.6, generator=gen))
      # Round to float16 so the saved (float16) checkpoint holds exactly these weights.
      p.copy_(p.half().float())


def make_kind(out_dir: str, kind: str, seed: int):
  spec = KINDS[kind]
  gen = torch.Generator().manual_seed(seed)
  torch.manual_seed(seed)
  model = AutoencoderKLWan(**spec["config"]).eval()
  _randomize(model, gen)

  height, width = spec["size"]
  factor = model.config.scale_factor_spatial
  video = (torch.rand((1, 3, FRAMES, height, width), generator=gen) * 2 - 1).half().float()
  latent_frames = 1 + (FRAMES - 1) // 4
  z = model.config.z_dim
  latents = torch.randn((1, z, latent_frames, height // factor, width // factor),
                        generator=gen).half().float()
  with torch.no_grad():
    mean = model.encode(video).latent_dist.mean
    decoded = model.decode(latents).sample
    tiled = {}
    if "tiling" in spec:
      (enc_min, enc_stride), (dec_min, dec_stride) = spec["tiling"].values()
      model.enable_tiling(enc_min, enc_min, enc_stride, enc_stride)
      tiled["mean_tiled"] = model.encode(video).latent_dist.mean.numpy()
      model.enable_tiling(dec_min, dec_min, dec_stride, dec_stride)
      tiled["decoded_tiled"] = model.decode(latents).sample.numpy()
      model.disable_tiling()

  path = os.path.join(out_dir, f"vae_{kind}")
  model.to(torch.float16).save_pretrained(path)
  np.savez(os.path.join(path, "golden.npz"),
           video=video.numpy().astype(np.float16), mean=mean.numpy().astype(np.float32),
           latents=latents.numpy().astype(np.float16), decoded=decoded.numpy().astype(np.float32),
           **tiled)
  clamped = float((decoded.abs() >= 1).float().mean())
  print(f"  {kind}: video {tuple(video.shape)} -> mean {tuple(mean.shape)} "
        f"(std {float(mean.std()):.3f}); decoded {tuple(decoded.shape)} "
        f"(std {float(decoded.std()):.3f}, {clamped:.1%} clamped)")


# Released configurations (diffusers' defaults are Wan 2.1's).
RELEASED = {
    "wan2.1": {},
    "wan2.2": dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12,
                   out_channels=12, patch_size=2, scale_factor_spatial=16,
                   latents_mean=[0.0] * 48, latents_std=[1.0] * 48),
}

_RESIDUAL = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3",
             "conv2": "residual.6", "conv_shortcut": "shortcut"}


def _original_wan21_name(name: str, num_res_blocks: int) -> str:
  """Wan-AI's name for a diffusers Wan 2.1 tensor; verified below by diffusers' converter."""
  for ours, theirs in _RESIDUAL.items():
    name = name.replace(f".{ours}.", f".{theirs}.")
  name = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"middle.{2 * int(m.group(1))}", name)
  name = name.replace("mid_block.attentions.0", "middle.1")
  name = name.replace("norm_out", "head.0").replace("conv_out", "head.2")
  name = re.sub(r"^(encoder|decoder)\.conv_in", r"\1.conv1", name)
  name = re.sub(r"^quant_conv", "conv1", name)
  name = re.sub(r"^post_quant_conv", "conv2", name)
  name = name.replace("encoder.down_blocks.", "encoder.downsamples.")
  per_stage = num_res_blocks + 2  # resnets + upsampler
  name = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
                lambda m: f"decoder.upsamples.{per_stage * int(m.group(1)) + int(m.group(2))}", name)
  name = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                lambda m: f"decoder.upsamples.{per_stage * int(m.group(1)) + per_stage - 1}", name)
  return name


def _original_names(model: AutoencoderKLWan, verify: bool) -> dict:
  state = model.state_dict()
  names = {k: _original_wan21_name(k, model.config.num_res_blocks) for k in state}
  if verify:
    back = convert_wan_vae_to_diffusers({names[k]: v for k, v in state.items()})
    assert set(back) == set(state), sorted(set(back) ^ set(state))[:5]
  return names


def make_keys(out_dir: str):
  keys = {}
  for name, overrides in RELEASED.items():
    with torch.device("meta"):
      model = AutoencoderKLWan(**overrides)
    keys[name] = {k: list(v.shape) for k, v in model.state_dict().items()}
    if name == "wan2.1":
      keys["wan2.1_original"] = _original_names(model, verify=True)
  with open(os.path.join(out_dir, "vae_keys.json"), "w") as f:
    json.dump(keys, f, indent=0, sort_keys=True)
  print("  released tensor names:", {k: len(v) for k, v in keys.items()})


def make(out_dir: str):
  for seed, kind in enumerate(KINDS):
    make_kind(out_dir, kind, seed)
  tiny = AutoencoderKLWan(**KINDS["wan21"]["config"])
  with open(os.path.join(out_dir, "vae_wan21", "original_names.json"), "w") as f:
    # diffusers' converter hard-codes the released block indices of decoder shortcuts, so it can
    # only check this rule on the released layout (make_keys); the tiny model reuses the rule.
    json.dump(_original_names(tiny, verify=False), f, indent=0, sort_keys=True)
  make_keys(out_dir)
