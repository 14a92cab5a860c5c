"""diffusers' output with our LoRA files loaded by its own Wan LoRA loader (PEFT).

For each case of tests/golden/lora/<case>/ (written by tools/lora_files.py: a LoRA trained by
our trainer on the tiny transformer tests/golden/transformer_<case>/), each of the three files
is loaded into a WanPipeline with `pipe.load_lora_weights(dir, weight_name=...)`, which picks
the conversion by the names (diffusers / PEFT, ComfyUI `diffusion_model.`, musubi
`lora_unet_`), and the transformer runs on the inputs of tests/golden/transformer_<case>.npz.
Writes tests/golden/lora/<case>.npz: one output per format (channels-last float32).

Needs peft besides the venv of tools/make_golden.py (`pip install peft`); run it outside the
repository root (`cd /tmp`), where our kernels/ package would shadow the `kernels` package that
transformers probes for.
"""

import os

import numpy as np
import torch
from diffusers import WanPipeline, WanTransformer3DModel

FILES = {"diffusers": "pytorch_lora_weights.safetensors", "comfyui": "comfyui.safetensors",
         "musubi": "musubi.safetensors"}
CASES = ("t2v", "i2v")


def _run(transformer, g):
  to_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a))
  image = to_torch(g["image"]) if "image" in g else None
  with torch.no_grad():
    out = transformer(to_torch(g["latents"]).permute(0, 4, 1, 2, 3), to_torch(g["timestep"]),
                      to_torch(g["text"]), encoder_hidden_states_image=image,
                      return_dict=False)[0]
  return out.permute(0, 2, 3, 4, 1).numpy()


def make(out_dir):
  for case in CASES:
    lora_dir = os.path.join(out_dir, "lora", case)
    g = np.load(os.path.join(out_dir, f"transformer_{case}.npz"))
    outputs = {}
    for fmt, weight_name in FILES.items():
      transformer = WanTransformer3DModel.from_pretrained(
          os.path.join(out_dir, f"transformer_{case}")).eval()
      pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None,
                         transformer=transformer)
      pipe.load_lora_weights(lora_dir, weight_name=weight_name, adapter_name=fmt)
      outputs[fmt] = _run(pipe.transformer, g)
      change = np.abs(outputs[fmt] - g["output"]).max() / np.abs(g["output"]).max()
      print(f"lora {case} {fmt}: output changed by {change:.3g} (relative max) by the LoRA")
    np.savez_compressed(os.path.join(out_dir, "lora", f"{case}.npz"), **outputs)
