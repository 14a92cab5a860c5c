"""Golden files for generation, from diffusers' WanPipeline and WanImageToVideoPipeline.

Tiny random components are saved as diffusers model roots and the reference videos are made by
the pipelines diffusers loads back from those roots (`DiffusionPipeline.from_pretrained`), so
the roots are checked to be real ones. Components that several roots share are stored once;
tests assemble a root from its own folder plus the shared ones (symlinks), as
`tests/pipeline_roots.py` does:

    tests/golden/pipelines/components/   tokenizer/ text_encoder/ vae21/ vae22/ image_encoder/
                                         image_processor/   (shared)
    tests/golden/pipelines/<case>/       model_index.json scheduler/ transformer/ [transformer_2/]
                                         parts.json (the shared components it uses, by name)
                                         golden.npz: latents (B, C, F', H', W') the initial noise
                                         (channels-first, as diffusers takes it), [image]
                                         (H, W, 3) uint8, video (B, F, H, W, 3) float32 the
                                         pipeline's output_type="np" frames
    tests/golden/pipelines/cases.json    per case: the call's arguments (prompts, negative prompt,
                                         sizes, steps, guidance, sampler)

Cases: t2v (Wan 2.1 layout, UniPC, CFG with a negative prompt, two prompts), t2v_euler (the same
root with FlowMatchEulerDiscreteScheduler), a14b (two experts, boundary_ratio, guidance_scale_2),
i2v (Wan 2.1 I2V: CLIP states, mask and condition latents), i2v_a14b (Wan 2.2 I2V A14B: two
36-channel-layout experts, no CLIP, boundary 0.9), ti2v (Wan 2.2 VAE, text only) and
ti2v_i2v (the same root through WanImageToVideoPipeline: clean first frame with timestep 0).
"""

import json
import os
import shutil
import tempfile

import numpy as np
import torch
from PIL import Image
from diffusers import (AutoencoderKLWan, DiffusionPipeline, FlowMatchEulerDiscreteScheduler,
                       UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline,
                       WanTransformer3DModel)
from transformers import (CLIPImageProcessor, T5Tokenizer, CLIPVisionConfig,
                          CLIPVisionModel, UMT5Config, UMT5EncoderModel)

TEXT_LEN = 16
PROMPTS = ["A cat walks across the floor.", "Waves  crash against &amp; the\nrocks at night"]
NEGATIVE = "blurry, static, low quality"
TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=32,
                   ffn_dim=64, num_layers=2, patch_size=(1, 2, 2), cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
TEXT = dict(vocab_size=300, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
            relative_attention_num_buckets=32, relative_attention_max_distance=128,
            layer_norm_epsilon=1e-6, dense_act_fn="gelu_new", feed_forward_proj="gated-gelu",
            is_encoder_decoder=False, use_cache=False)
VAE = {
    "vae21": dict(base_dim=4, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                  temperal_downsample=[False, True, True],
                  latents_mean=[-0.3, 0.2, 0.5, -0.1], latents_std=[1.5, 0.7, 2.0, 1.1]),
    "vae22": dict(base_dim=4, decoder_base_dim=6, z_dim=6, dim_mult=[1, 2, 2, 2],
                  num_res_blocks=1, attn_scales=[], temperal_downsample=[False, True, True],
                  is_residual=True, in_channels=12, out_channels=12, patch_size=2,
                  scale_factor_spatial=16, latents_mean=[0.1, -0.4, 0.3, 0.0, -0.2, 0.6],
                  latents_std=[0.9, 1.3, 2.2, 0.6, 1.0, 1.7]),
}
CLIP_SIZE = 32  # the I2V case's frames are CLIP-sized, so neither processor resamples
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            image_size=CLIP_SIZE, patch_size=8, hidden_act="gelu", layer_norm_eps=1e-5,
            projection_dim=16)
# UniPC as the released Wan diffusers roots configure it (flow_shift differs per model).
SCHEDULER = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                 num_train_timesteps=1000, solver_order=2, solver_type="bh2", predict_x0=True,
                 lower_order_final=True, final_sigmas_type="zero", timestep_spacing="linspace")

CASES = {
    "t2v": dict(vae="vae21", root="t2v", prompts=PROMPTS, height=32, width=48, num_frames=9,
                num_inference_steps=4, guidance_scale=5.0, sampler="unipc"),
    "t2v_euler": dict(vae="vae21", root="t2v", prompts=PROMPTS[:1], height=32, width=48,
                      num_frames=9, num_inference_steps=3, guidance_scale=4.0, sampler="euler"),
    "a14b": dict(vae="vae21", root="a14b", prompts=PROMPTS[:1], height=32, width=32,
                 num_frames=5, num_inference_steps=4, guidance_scale=4.0, guidance_scale_2=3.0,
                 sampler="unipc", boundary_ratio=0.875),
    # 512 caption tokens: diffusers' Wan 2.1 I2V attention finds the CLIP tokens as the context
    # beyond 512 text tokens, so it is only right at Wan's max_sequence_length.
    "i2v": dict(vae="vae21", root="i2v", prompts=PROMPTS[:1], height=CLIP_SIZE, width=CLIP_SIZE,
                num_frames=5, num_inference_steps=3, guidance_scale=5.0, sampler="unipc",
                image=True, max_sequence_length=512),
    "i2v_a14b": dict(vae="vae21", root="i2v_a14b", prompts=PROMPTS[:1], height=32, width=48,
                     num_frames=5, num_inference_steps=4, guidance_scale=3.5,
                     guidance_scale_2=2.0, sampler="unipc", image=True, boundary_ratio=0.9),
    "ti2v": dict(vae="vae22", root="ti2v", prompts=PROMPTS[:1], height=32, width=64,
                 num_frames=5, num_inference_steps=3, guidance_scale=5.0, sampler="unipc"),
    "ti2v_i2v": dict(vae="vae22", root="ti2v", prompts=PROMPTS[:1], height=32, width=64,
                     num_frames=5, num_inference_steps=3, guidance_scale=5.0, sampler="unipc",
                     image=True),
}


def _randomize(model, seed, scale=1.0):
  """Random weights everywhere (norm scales around 1), so no part of the math is trivial."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if ("norm" in name or "gamma" in name) and p.ndim == 1 and "bias" not in name:
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
      elif "scale_shift_table" in name:
        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
      elif p.ndim >= 2:
        p.copy_(scale * torch.randn(p.shape, generator=g) / int(np.prod(p.shape[1:])) ** 0.5)
      else:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _transformer(seed, in_channels, out_channels, image_dim=None):
  model = WanTransformer3DModel(**TRANSFORMER, in_channels=in_channels, out_channels=out_channels,
                                image_dim=image_dim,
                                added_kv_proj_dim=TRANSFORMER["num_attention_heads"]
                                * TRANSFORMER["attention_head_dim"] if image_dim else None)
  _randomize(model, seed)
  return model.eval()


def _components(tmp):
  """The shared components, each saved once under `tmp` and loaded back (what the roots hold)."""
  src = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                     "tests", "golden", "spiece_tiny")
  tokenizer = T5Tokenizer.from_pretrained(src)  # as google/umt5-xxl: sentencepiece, pad 0, eos 1
  torch.manual_seed(0)
  text = UMT5EncoderModel(UMT5Config(**TEXT)).eval()
  _randomize(text, 1)
  vaes = {}
  for i, (name, cfg) in enumerate(VAE.items()):
    vae = AutoencoderKLWan(**cfg).eval()
    _randomize(vae, 10 + i)
    vaes[name] = vae
  clip = CLIPVisionModel(CLIPVisionConfig(**CLIP)).eval()
  _randomize(clip, 3)
  processor = CLIPImageProcessor(size={"shortest_edge": CLIP_SIZE},
                                 crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE})
  return dict(tokenizer=tokenizer, text_encoder=text, image_encoder=clip,
              image_processor=processor, **vaes)


def _roots(parts):
  """(root name -> (pipeline class, its components, extra config)) for the cases' roots."""
  z21, z22 = VAE["vae21"]["z_dim"], VAE["vae22"]["z_dim"]
  common = dict(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"])
  return {
      "t2v": (WanPipeline, dict(common, vae=parts["vae21"], transformer=_transformer(20, z21, z21)),
              ("vae21",)),
      "a14b": (WanPipeline, dict(common, vae=parts["vae21"], transformer=_transformer(21, z21, z21),
                                 transformer_2=_transformer(22, z21, z21), boundary_ratio=0.875),
               ("vae21",)),
      "i2v": (WanImageToVideoPipeline,
              dict(common, vae=parts["vae21"], image_encoder=parts["image_encoder"],
                   image_processor=parts["image_processor"],
                   transformer=_transformer(23, 2 * z21 + 4, z21, image_dim=CLIP["hidden_size"])),
              ("vae21", "image_encoder", "image_processor")),
      "i2v_a14b": (WanImageToVideoPipeline,
                   dict(common, vae=parts["vae21"], transformer=_transformer(25, 2 * z21 + 4, z21),
                        transformer_2=_transformer(26, 2 * z21 + 4, z21), boundary_ratio=0.9),
                   ("vae21",)),
      "ti2v": (WanPipeline, dict(common, vae=parts["vae22"], transformer=_transformer(24, z22, z22),
                                 expand_timesteps=True), ("vae22",)),
  }


SHARED = ("tokenizer", "text_encoder", "vae", "image_encoder", "image_processor")


def _save_root(pipe_cls, kwargs, shared, work, out, name):
  """Saves a root with save_pretrained, moves its shared folders to components/ (once) and
  returns the pipeline diffusers loads back from the assembled root."""
  pipe = pipe_cls(scheduler=UniPCMultistepScheduler(**SCHEDULER), **kwargs)
  saved = os.path.join(work, name)
  pipe.save_pretrained(saved)
  root = os.path.join(out, name)
  os.makedirs(root)
  components = os.path.join(out, "components")
  parts = {}
  for folder in sorted(os.listdir(saved)):
    path = os.path.join(saved, folder)
    if folder in SHARED:
      stored = {"vae": shared[0]}.get(folder, folder)
      parts[folder] = stored
      if not os.path.exists(os.path.join(components, stored)):
        shutil.copytree(path, os.path.join(components, stored))
    elif os.path.isdir(path):
      shutil.copytree(path, os.path.join(root, folder))
    else:
      shutil.copy(path, root)
  with open(os.path.join(root, "parts.json"), "w") as f:
    json.dump(parts, f, indent=1, sort_keys=True)
  assembled = os.path.join(work, name + "_assembled")
  shutil.copytree(root, assembled)
  for folder, stored in parts.items():
    os.symlink(os.path.join(components, stored), os.path.join(assembled, folder))
  return DiffusionPipeline.from_pretrained(assembled, torch_dtype=torch.float32)


def _image(height, width):
  """A smooth uint8 image (a noise image would mostly test the VAE on noise)."""
  yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
  rgb = np.stack([0.5 + 0.5 * np.sin(6 * xx + 2 * yy), 0.2 + 0.7 * yy * xx,
                  0.5 + 0.4 * np.cos(5 * yy - 3 * xx)], -1)
  return np.round(rgb * 255).astype(np.uint8)


def _run(pipe, case, seed):
  vae = pipe.vae.config
  frames = (case["num_frames"] - 1) // vae.scale_factor_temporal + 1
  shape = (len(case["prompts"]), vae.z_dim, frames, case["height"] // vae.scale_factor_spatial,
           case["width"] // vae.scale_factor_spatial)
  latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
  if case["sampler"] == "euler":
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=SCHEDULER["flow_shift"])
  kwargs = dict(prompt=case["prompts"], negative_prompt=NEGATIVE, height=case["height"],
                width=case["width"], num_frames=case["num_frames"],
                num_inference_steps=case["num_inference_steps"],
                guidance_scale=case["guidance_scale"], latents=latents.clone(),
                max_sequence_length=case.get("max_sequence_length", TEXT_LEN), output_type="np")
  if "guidance_scale_2" in case:
    kwargs["guidance_scale_2"] = case["guidance_scale_2"]
  image = None
  if case.get("image"):
    image = _image(case["height"], case["width"])
    kwargs["image"] = Image.fromarray(image)
  with torch.no_grad():
    video = pipe(**kwargs).frames
  return latents.numpy(), image, np.asarray(video, np.float32)


def make(out_dir):
  out = os.path.join(out_dir, "pipelines")
  shutil.rmtree(out, ignore_errors=True)
  os.makedirs(os.path.join(out, "components"))
  with tempfile.TemporaryDirectory() as work:
    parts = _components(work)
    pipes = {name: _save_root(cls, kwargs, shared, work, out, name)
             for name, (cls, kwargs, shared) in _roots(parts).items()}
    for i, (name, case) in enumerate(CASES.items()):
      pipe = pipes[case["root"]]
      if case.get("image") and not isinstance(pipe, WanImageToVideoPipeline):
        # TI2V: the same root through the I2V pipeline (as diffusers documents for TI2V 5B).
        pipe = WanImageToVideoPipeline(**pipe.components, expand_timesteps=True)
      if case["sampler"] == "euler":
        pipe = type(pipe)(**dict(pipe.components))
      if "boundary_ratio" in case:  # both experts must run
        pipe.scheduler.set_timesteps(case["num_inference_steps"])
        ts = pipe.scheduler.timesteps.numpy()
        boundary = 1000 * case["boundary_ratio"]
        assert (ts >= boundary).any() and (ts < boundary).any(), ts
      latents, image, video = _run(pipe, case, seed=100 + i)
      record = dict(latents=latents, video=video)
      if image is not None:
        record["image"] = image
      os.makedirs(os.path.join(out, name), exist_ok=True)
      np.savez_compressed(os.path.join(out, name, "golden.npz"), **record)
      print(f"  {name}: video {video.shape}, mean {video.mean():.3f}, std {video.std():.3f}")
  cases = {name: dict(dict(max_sequence_length=TEXT_LEN), **case, negative_prompt=NEGATIVE)
           for name, case in CASES.items()}
  with open(os.path.join(out, "cases.json"), "w") as f:
    json.dump(cases, f, indent=1, sort_keys=True)
