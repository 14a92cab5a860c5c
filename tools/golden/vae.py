"""Golden files for the Wan VAE (2.1 and 2.2 layouts) from diffusers' `AutoencoderKLWan`.

For each kind a tiny randomly initialised model is written with `save_pretrained` (weights in
float16 to keep the files small; the reference runs in float32 on exactly those rounded weights)
into tests/golden/vae_<kind>/, together with `golden.npz`:

    video      (1, 3, 9, H, W)   float16 input in [-1, 1], channels-first as diffusers takes it
    mean       (1, z, 3, h, w)   float32 posterior mean of `encode(video)`
    latents    (1, z, 3, h, w)   float16 random latents (decoder input)
    decoded    (1, 3, 9, H, W)   float32 `decode(latents)`, clamped to [-1, 1] as diffusers does

Nine frames (1 + 4k, k = 2) so that the first-frame pass and two cached 4-frame chunks both run;
spatial sizes are multiples of the compression factor but not powers of two.
"""

import os

import numpy as np
import torch
from diffusers import AutoencoderKLWan

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

  path = os.path.join(out_dir, f"vae_{kind}")
  model.to(torch.float16).save_pretrained(path)
  np.savez(os.path.join(path, "golden.npz"),
           video=video.numpy().astype(np.float16), mean=mean.numpy().astype(np.float32),
           latents=latents.numpy().astype(np.float16), decoded=decoded.numpy().astype(np.float32))
  clamped = float((decoded.abs() >= 1).float().mean())
  print(f"  {kind}: video {tuple(video.shape)} -> mean {tuple(mean.shape)} "
        f"(std {float(mean.std()):.3f}); decoded {tuple(decoded.shape)} "
        f"(std {float(decoded.std()):.3f}, {clamped:.1%} clamped)")


def make(out_dir: str):
  for seed, kind in enumerate(KINDS):
    make_kind(out_dir, kind, seed)
