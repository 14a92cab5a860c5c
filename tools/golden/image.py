"""Golden files for the CLIP vision encoder (Wan 2.1 I2V's image encoder), from transformers.

Writes under tests/golden/:

    clip_tiny/          a tiny random `CLIPVisionModel` (save_pretrained, safetensors, float32)
                        and the `CLIPImageProcessor` that goes with it (preprocessor_config.json)
    clip_tiny.npz       square   (2, S, S, 3)  float32 images in [0, 1] at the model's size S
                        square_pixels (2, 3, S, S) the processor's output for them (no resize)
                        wide     (1, 40, 34, 3) float32 image in [0, 1] that needs resize + crop
                        wide_pixels (1, 3, S, S) the processor's output for it
                        penultimate, last (3, T, D) hidden_states[-2] and [-1] of the model on
                        concat(square_pixels, wide_pixels); T = (S / patch)^2 + 1

Every weight, layer norms included, is randomised so that a mixed-up tensor shows in the output.
"""

import os

import numpy as np
import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=28, patch_size=7, hidden_act="gelu", layer_norm_eps=1e-5,
              projection_dim=16)


def make(out_dir):
  model_dir = os.path.join(out_dir, "clip_tiny")
  torch.manual_seed(0)
  model = CLIPVisionModel(CLIPVisionConfig(**CONFIG)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif p.ndim == 1 or "embedding" in name:
        p.copy_(0.5 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / np.sqrt(np.prod(p.shape[1:])))
  model.save_pretrained(model_dir)
  size = CONFIG["image_size"]
  # CLIP's defaults (OpenAI mean/std, bicubic, shortest edge then center crop) at the tiny size;
  # the inputs are already in [0, 1], so no 1/255 rescale.
  processor = CLIPImageProcessor(size={"shortest_edge": size},
                                 crop_size={"height": size, "width": size}, do_rescale=False)
  processor.save_pretrained(model_dir)

  rng = np.random.default_rng(0)
  # Multiples of 1/255: without torchvision transformers' processor goes through 8-bit PIL
  # images, which then loses nothing.
  square = (rng.integers(0, 256, (2, size, size, 3)) / 255).astype(np.float32)
  # A smooth image (resampling a noise image would mostly test aliasing) of another shape.
  yy, xx = np.meshgrid(np.linspace(0, 1, 40), np.linspace(0, 1, 34), indexing="ij")
  wide = np.stack([0.5 + 0.5 * np.sin(5 * xx + 3 * yy), yy * xx, 0.5 + 0.4 * np.cos(7 * yy)],
                  -1)[None]
  wide = (np.round(wide * 255) / 255).astype(np.float32)
  pixels = {}
  for name, images in (("square", square), ("wide", wide)):
    pixels[name] = processor(images=list(images), return_tensors="np",
                             input_data_format="channels_last")["pixel_values"]
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(np.concatenate([pixels["square"],
                                                              pixels["wide"]])),
                output_hidden_states=True)
  np.savez(os.path.join(out_dir, "clip_tiny.npz"), square=square,
           square_pixels=pixels["square"].astype(np.float32), wide=wide,
           wide_pixels=pixels["wide"].astype(np.float32),
           penultimate=out.hidden_states[-2].numpy(), last=out.hidden_states[-1].numpy())
  print("clip", out.hidden_states[-2].shape, pixels["wide"].shape)
