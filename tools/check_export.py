"""Loads a job=export model root with diffusers and runs it (the golden venv of
tools/make_golden.py, plus peft; run it outside the repository root, e.g. from /tmp).

    /tmp/golden-venv/bin/python /work/main/tools/check_export.py EXPORT_DIR [--base=ROOT]
        [--latents]
    /tmp/golden-venv/bin/python /work/main/tools/check_export.py --make-tiny-vae=DIR

`WanPipeline.from_pretrained(EXPORT_DIR)` loads every component (both experts and the
boundary_ratio for Wan 2.2 A14B) and generates a short clip. With a lora/ folder (a LoRA run
exported with export_merged) and `--base` (the root the run trained from), each of its three
files (of each expert, lora/high_noise/ and lora/low_noise/ for an expert=both run) is loaded with `pipe.load_lora_weights` into the base and must generate what the merged
export generates.
`--latents` stops at the latents (output_type="latent"), for the tests' tiny roots whose VAE
has other latent channels than their transformer; `--make-tiny-vae=DIR` instead writes a tiny
random 16-channel Wan 2.1 VAE (the pipeline goldens' tiny config with z_dim 16) to put in such a
root before training, so that the export decodes to video. Prints one line per run; exits
non-zero on any failure. Nothing here imports wan/.
"""

import json
import os
import sys

import numpy as np
import torch
from diffusers import WanPipeline

FILES = ("pytorch_lora_weights.safetensors", "comfyui.safetensors", "musubi.safetensors")


def _generate(pipe, latents_only: bool):
  out = pipe("A cat walks across the floor.", negative_prompt="blurry", height=32, width=32,
             num_frames=5, num_inference_steps=2, guidance_scale=4.0, max_sequence_length=16,
             generator=torch.Generator().manual_seed(0),
             output_type="latent" if latents_only else "np")
  frames = out.frames
  return np.asarray(frames[0] if not latents_only else frames.float().numpy())


def make_tiny_vae(directory: str):
  from diffusers import AutoencoderKLWan  # pylint: disable=import-outside-toplevel
  tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                      "golden", "pipelines", "components", "vae21", "config.json")
  with open(tiny) as f:
    cfg = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
  cfg.update(z_dim=16, latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
  torch.manual_seed(0)
  AutoencoderKLWan(**cfg).save_pretrained(directory)
  print(f"tiny 16-channel VAE written to {directory}")


def main(argv):
  vae = next((a.split("=", 1)[1] for a in argv if a.startswith("--make-tiny-vae=")), None)
  if vae:
    make_tiny_vae(vae)
    return
  root = argv[1]
  latents_only = "--latents" in argv
  base_root = next((a.split("=", 1)[1] for a in argv if a.startswith("--base=")), None)
  pipe = WanPipeline.from_pretrained(root, torch_dtype=torch.float32)
  experts = [n for n in ("transformer", "transformer_2") if getattr(pipe, n, None) is not None]
  base = _generate(pipe, latents_only)
  print(f"{root}: loaded {', '.join(experts)} (boundary_ratio "
        f"{pipe.config.get('boundary_ratio')}); output {base.shape}, finite "
        f"{bool(np.isfinite(base).all())}")
  if not np.isfinite(base).all():
    sys.exit(1)
  lora_dir = os.path.join(root, "lora")
  if os.path.isdir(lora_dir) and base_root:
    # An expert=both run: lora/high_noise/ into transformer, lora/low_noise/ into transformer_2.
    both = os.path.isdir(os.path.join(lora_dir, "high_noise"))
    for name in FILES:
      pipe = WanPipeline.from_pretrained(base_root, torch_dtype=torch.float32)
      if both:
        pipe.load_lora_weights(os.path.join(lora_dir, "high_noise"), weight_name=name,
                               adapter_name="trained")
        pipe.load_lora_weights(os.path.join(lora_dir, "low_noise"), weight_name=name,
                               adapter_name="trained_2", load_into_transformer_2=True)
      else:
        pipe.load_lora_weights(lora_dir, weight_name=name, adapter_name="trained")
      out = _generate(pipe, latents_only)
      err = float(np.abs(out - base).max() / np.abs(base).max())
      print(f"  base + lora/{name} vs the merged export: relative difference {err:.3g}")
      if not err <= 1e-5:
        sys.exit(1)


if __name__ == "__main__":
  main(sys.argv)
