"""Golden outputs of diffusers' WanTransformer3DModel on tiny random configs.

Writes, for each variant, a diffusers checkpoint directory tests/golden/transformer_<name>/ and
tests/golden/transformer_<name>.npz with the inputs (channels-last, as our API takes them) and
the float32 reference output (also channels-last). The I2V variant is written a second time in
the original Wan-AI layout (original tensor names and config.json) to test that loader.

`python tools/golden/transformer.py --check-saved DIR` loads a directory written by our `save`
(tests/golden/transformer_t2v_saved/) with diffusers and checks its output against the golden one.
"""

import json
import os
import sys

import numpy as np
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

TINY = dict(num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=32, ffn_dim=64,
            num_layers=2, patch_size=(1, 2, 2))
VARIANTS = {
    # name: (config overrides, latent (F, H, W), text length, image tokens, per-token timesteps)
    "t2v": (dict(in_channels=16, out_channels=16), (3, 6, 10), 7, 0, False),
    # diffusers splits image tokens off the context assuming 512 text tokens.
    "i2v": (dict(in_channels=36, out_channels=16, image_dim=24, added_kv_proj_dim=32),
            (3, 6, 10), 512, 5, False),
    "ti2v": (dict(in_channels=48, out_channels=48), (3, 6, 10), 7, 0, True),
}

# diffusers name fragment -> original Wan name fragment (order matters: norm2/norm3 swap).
TO_ORIGINAL = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    ("attn1", "self_attn"), ("attn2", "cross_attn"),
    (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
    (".add_k_proj.", ".k_img."), (".add_v_proj.", ".v_img."), (".norm_added_k.", ".norm_k_img."),
    ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
    (".norm2.", ".norm3."),
    ("proj_out", "head.head"),
]


def _randomize(model, seed):
  """Random weights everywhere (norm scales around 1), so no part of the math is trivial."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
      elif "scale_shift_table" in name:
        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
      elif p.ndim >= 2:
        fan_in = int(np.prod(p.shape[1:]))
        p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
      else:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _to_original_name(name):
  if name == "scale_shift_table":
    return "head.modulation"
  name = name.replace("scale_shift_table", "modulation")
  for a, b in TO_ORIGINAL:
    name = name.replace(a, b)
  return name


def _write_original(model, cfg, out):
  os.makedirs(out, exist_ok=True)
  sd = {_to_original_name(k): v.contiguous() for k, v in model.state_dict().items()}
  save_file(sd, os.path.join(out, "diffusion_pytorch_model.safetensors"))
  dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
  raw = {"_class_name": "WanModel", "model_type": "i2v", "dim": dim, "eps": 1e-6,
         "ffn_dim": cfg["ffn_dim"], "freq_dim": cfg["freq_dim"], "in_dim": cfg["in_channels"],
         "num_heads": cfg["num_attention_heads"], "num_layers": cfg["num_layers"],
         "out_dim": cfg["out_channels"], "text_len": 512, "text_dim": cfg["text_dim"]}
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(raw, f, indent=2)


def _inputs(cfg, grid, text_len, image_len, per_token, seed):
  g = torch.Generator().manual_seed(seed)
  b = 2
  f, h, w = grid
  latents = torch.randn(b, cfg["in_channels"], f, h, w, generator=g)
  text = torch.randn(b, text_len, cfg["text_dim"], generator=g)
  image = torch.randn(b, image_len, cfg["image_dim"], generator=g) if image_len else None
  if per_token:
    seq = f * (h // 2) * (w // 2)
    timestep = torch.full((b, seq), 0.0)
    timestep[0, seq // f:] = 731.0  # first latent frame clean (t=0), the rest noisy
    timestep[1, :] = 250.0
  else:
    timestep = torch.tensor([731.0, 250.0])
  return latents, timestep, text, image


def _run(model, latents, timestep, text, image):
  with torch.no_grad():
    return model(latents, timestep, text, encoder_hidden_states_image=image,
                 return_dict=False)[0]


def make(out_dir):
  torch.manual_seed(0)
  for i, (name, (over, grid, text_len, image_len, per_token)) in enumerate(VARIANTS.items()):
    cfg = dict(TINY, **over)
    model = WanTransformer3DModel(**cfg).eval()
    _randomize(model, seed=100 + i)
    ckpt = os.path.join(out_dir, f"transformer_{name}")
    model.save_pretrained(ckpt, safe_serialization=True)
    latents, timestep, text, image = _inputs(cfg, grid, text_len, image_len, per_token, 200 + i)
    out = _run(model, latents, timestep, text, image)
    arrays = {"latents": latents.permute(0, 2, 3, 4, 1).numpy(), "timestep": timestep.numpy(),
              "text": text.numpy(), "output": out.permute(0, 2, 3, 4, 1).numpy()}
    if image is not None:
      arrays["image"] = image.numpy()
    np.savez_compressed(os.path.join(out_dir, f"transformer_{name}.npz"), **arrays)
    if name == "i2v":
      _write_original(model, cfg, os.path.join(out_dir, "transformer_i2v_original"))
    print(f"transformer_{name}: output {tuple(out.shape)}, |out| mean {out.abs().mean():.4f}")


def check_saved(saved_dir, golden_dir):
  """Loads a directory written by our save with diffusers; compares with the t2v golden output."""
  model = WanTransformer3DModel.from_pretrained(saved_dir).eval()
  g = np.load(os.path.join(golden_dir, "transformer_t2v.npz"))
  to_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a))
  out = _run(model, to_torch(g["latents"]).permute(0, 4, 1, 2, 3), to_torch(g["timestep"]),
             to_torch(g["text"]), None).permute(0, 2, 3, 4, 1).numpy()
  err = np.abs(out - g["output"]).max() / np.abs(g["output"]).max()
  print(f"{saved_dir}: loads in diffusers, max relative error vs golden {err:.2e}")
  if err > 1e-5:
    sys.exit("saved directory does not reproduce the golden output")


if __name__ == "__main__":
  golden = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "golden")
  if len(sys.argv) == 3 and sys.argv[1] == "--check-saved":
    check_saved(sys.argv[2], golden)
  else:
    make(golden)
