"""CLIP vision encoder (Wan 2.1 I2V's image encoder, ViT-H/14) as pure functions.

As transformers' CLIPVisionModel: patch conv (no bias) -> class token + learned position
embeddings -> pre layer norm -> num_hidden_layers x [LN -> attention -> residual; LN -> MLP ->
residual]. Wan takes hidden_states[-2], the output of the second-to-last layer, so `encode` runs
num_hidden_layers - 1 layers; the post layer norm and projection are never used.

Preprocessing (`preprocess`) follows CLIPImageProcessor: bicubic resize of the shortest side to
image_size, center crop, normalize with CLIP's mean/std. An image already image_size square is
not resampled, and matches the processor exactly. Resizing is antialiased bicubic
(jax.image.resize); transformers resizes through 8-bit PIL images, so resized inputs agree to
about one 8-bit level (tested: <= 0.03 after normalisation), not bit for bit.

Parameters (transformers names, possibly under vision_model., in brackets):
  patch_embed (p, p, 3, D)  [embeddings.patch_embedding]  class_embed (D,)  pos_embed (T, D)
  pre_norm/{scale, bias} (D,)  [pre_layrnorm]
  layers/ (stacked): ln1, ln2 {scale, bias}; q, k, v (D, H, hd) + q_bias.. (H, hd);
    o (H, hd, D) + o_bias (D,); fc1 (D, F) + fc1_bias; fc2 (F, D) + fc2_bias  [encoder.layers.i.*]
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from wan import params as params_lib
from wan import safetensors_io
from wan import sharding
from wan.numerics import PRECISIONS

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class Config:
  """Architecture (transformers' CLIPVisionConfig names; defaults are Wan's ViT-H/14) + options."""
  hidden_size: int = 1280
  intermediate_size: int = 5120
  num_hidden_layers: int = 32
  num_attention_heads: int = 16
  image_size: int = 224
  patch_size: int = 14
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-5
  image_mean: tuple[float, float, float] = CLIP_MEAN
  image_std: tuple[float, float, float] = CLIP_STD
  # Runtime options.
  weights_dtype: str = "float32"
  activations_dtype: str = "float32"
  precision: str = "DEFAULT"
  scan_layers: bool = True

  def __post_init__(self):
    for name, value, allowed in (("hidden_act", self.hidden_act, ACTIVATIONS),
                                 ("precision", self.precision, PRECISIONS)):
      if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; use one of {sorted(allowed)}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"{self.num_attention_heads} heads do not divide hidden_size "
                       f"{self.hidden_size}")
    if self.image_size % self.patch_size:
      raise ValueError(f"patch_size {self.patch_size} does not divide image_size "
                       f"{self.image_size}")

  @property
  def num_tokens(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1  # patches + class token

  @classmethod
  def from_json(cls, config: dict, **runtime) -> "Config":
    """Config from a transformers config.json dict (a full CLIPConfig's vision_config is used)."""
    config = config.get("vision_config", config)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in names}, **runtime)


VIT_H_14 = Config()
TINY = Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=28, patch_size=7)


def declarations(cfg: Config):
  d, h, f, p = cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.patch_size
  hd = d // h
  P = params_lib.Param
  norm = lambda: {"scale": P((d,), ("embed",), params_lib.ones, jnp.float32),
                  "bias": P((d,), ("embed",), params_lib.zeros, jnp.float32)}
  zeros = params_lib.zeros
  layer = {
      "ln1": norm(),
      **{n: P((d, h, hd), ("embed", "heads", None)) for n in ("q", "k", "v")},
      **{f"{n}_bias": P((h, hd), ("heads", None), zeros) for n in ("q", "k", "v")},
      "o": P((h, hd, d), ("heads", None, "embed"), params_lib.fan_in_uniform(2)),
      "o_bias": P((d,), ("embed",), zeros),
      "ln2": norm(),
      "fc1": P((d, f), ("embed", "mlp")), "fc1_bias": P((f,), ("mlp",), zeros),
      "fc2": P((f, d), ("mlp", "embed")), "fc2_bias": P((d,), ("embed",), zeros),
  }
  return {
      "patch_embed": P((p, p, 3, d), (None, None, None, "embed"), params_lib.fan_in_uniform(3)),
      "class_embed": P((d,), ("embed",), params_lib.normal(d ** -0.5)),
      "pos_embed": P((cfg.num_tokens, d), (None, "embed"), params_lib.normal(0.02)),
      "pre_norm": norm(),
      "layers": params_lib.stack(layer, cfg.num_hidden_layers),
  }


def init(cfg: Config, key: jax.Array):
  return params_lib.init(declarations(cfg), key, jnp.dtype(cfg.weights_dtype))


def abstract(cfg: Config):
  return params_lib.abstract(declarations(cfg), jnp.dtype(cfg.weights_dtype))


def shardings(cfg: Config, mesh: jax.sharding.Mesh):
  return params_lib.shardings(declarations(cfg), mesh)


def preprocess(images: jax.Array, cfg: Config) -> jax.Array:
  """images: (B, H, W, 3) in [0, 1] -> (B, S, S, 3) normalised pixels, S = cfg.image_size."""
  b, h, w, c = images.shape
  if c != 3:
    raise ValueError(f"images must be (B, H, W, 3) RGB, got {images.shape}")
  s = cfg.image_size
  x = images.astype(jnp.float32)
  if (h, w) != (s, s):
    # CLIPImageProcessor: shortest side to s, the other side scaled and truncated to an int.
    nh, nw = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
    x = jax.image.resize(x, (b, nh, nw, 3), "bicubic", antialias=True)
    top, left = (nh - s) // 2, (nw - s) // 2
    x = x[:, top:top + s, left:left + s]
  mean, std = jnp.asarray(cfg.image_mean, jnp.float32), jnp.asarray(cfg.image_std, jnp.float32)
  return (x - mean) / std


def _layer_norm(x, p, eps):
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]
  return y.astype(x.dtype)


def block(p, x, cfg: Config):
  """One encoder layer. x: (B, T, D)."""
  dtype = jnp.dtype(cfg.activations_dtype)
  precision = PRECISIONS[cfg.precision]
  mm = lambda spec, a, w: jnp.einsum(spec, a, w.astype(dtype), precision=precision)
  h = _layer_norm(x, p["ln1"], cfg.layer_norm_eps)
  q, k, v = (mm("btd,dhk->bthk", h, p[n]) + p[f"{n}_bias"].astype(dtype) for n in "qkv")
  scores = jnp.einsum("bqhk,bshk->bhqs", q, k, precision=precision,
                      preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
  weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
  attn = jnp.einsum("bhqs,bshk->bqhk", weights, v, precision=precision)
  x = x + mm("bthk,hkd->btd", attn, p["o"]) + p["o_bias"].astype(dtype)
  x = sharding.constrain(x, ("batch", "length", "act_embed"))
  h = _layer_norm(x, p["ln2"], cfg.layer_norm_eps)
  h = ACTIVATIONS[cfg.hidden_act](mm("btd,df->btf", h, p["fc1"]) + p["fc1_bias"].astype(dtype))
  h = sharding.constrain(h, ("batch", "length", "act_mlp"))
  x = x + mm("btf,fd->btd", h, p["fc2"]) + p["fc2_bias"].astype(dtype)
  return sharding.constrain(x, ("batch", "length", "act_embed"))


def hidden_state(params, cfg: Config, pixels: jax.Array, num_layers: int) -> jax.Array:
  """pixels: (B, S, S, 3) normalised -> (B, T, D), the output of the first `num_layers` layers.

  transformers' hidden_states[i] is hidden_state(..., i); hidden_states[-2] is num_layers - 1.
  """
  dtype = jnp.dtype(cfg.activations_dtype)
  b, s = pixels.shape[0], cfg.image_size
  if pixels.shape != (b, s, s, 3):
    raise ValueError(f"pixels must be (B, {s}, {s}, 3), got {pixels.shape}; see preprocess")
  patches = jax.lax.conv_general_dilated(
      pixels.astype(dtype), params["patch_embed"].astype(dtype), (cfg.patch_size,) * 2, "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=PRECISIONS[cfg.precision])
  patches = patches.reshape(b, -1, cfg.hidden_size)
  cls = jnp.broadcast_to(params["class_embed"].astype(dtype), (b, 1, cfg.hidden_size))
  x = jnp.concatenate([cls, patches], axis=1) + params["pos_embed"].astype(dtype)
  x = _layer_norm(x, params["pre_norm"], cfg.layer_norm_eps)
  x = sharding.constrain(x, ("batch", "length", "act_embed"))
  layers = jax.tree.map(lambda a: a[:num_layers], params["layers"])
  if cfg.scan_layers:
    x, _ = jax.lax.scan(lambda x, p: (block(p, x, cfg), None), x, layers)
  else:
    for i in range(num_layers):
      x = block(jax.tree.map(lambda a, i=i: a[i], layers), x, cfg)
  return x


def encode(params, cfg: Config, images: jax.Array) -> jax.Array:
  """Wan's image embedding. images: (B, H, W, 3) in [0, 1] -> (B, T, D) penultimate-layer output.

  T = (image_size / patch_size)^2 + 1: 257 tokens of 1280 for ViT-H/14 at 224.
  """
  return hidden_state(params, cfg, preprocess(images, cfg), cfg.num_hidden_layers - 1)


# ---------------------------------------------------------------------------------------------
# Loading transformers checkpoints.

# Tensors of CLIPVisionModel(WithProjection) / CLIPModel that Wan's penultimate features never use.
_UNUSED_PREFIXES = ("vision_model.post_layernorm.", "post_layernorm.", "visual_projection.",
                    "text_model.", "text_projection.", "logit_scale",
                    "vision_model.embeddings.position_ids", "embeddings.position_ids")


def load(path: str, **runtime):
  """(cfg, params) from a transformers CLIP vision directory or a Wan diffusers model root.

  `path`: a directory with config.json + model.safetensors (or its sharded index), or a model
  root with image_encoder/ (and image_processor/, whose mean/std/size are checked). `runtime`:
  Config runtime options. Params are NumPy arrays in weights_dtype.
  """
  root = path
  if os.path.isdir(os.path.join(path, "image_encoder")):
    path = os.path.join(path, "image_encoder")
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"no config.json in {path} (nor an image_encoder/ folder in {root})")
  with open(config_path) as f:
    model_config = json.load(f)
  for processor_dir in (os.path.join(root, "image_processor"), path):
    processor_path = os.path.join(processor_dir, "preprocessor_config.json")
    if os.path.exists(processor_path):
      with open(processor_path) as f:
        processor = json.load(f)
      runtime = {"image_mean": tuple(processor.get("image_mean", CLIP_MEAN)),
                 "image_std": tuple(processor.get("image_std", CLIP_STD)), **runtime}
      break
  cfg = Config.from_json(model_config, **runtime)
  return cfg, from_transformers(safetensors_io.load_dir(path, "model"), cfg)


def from_transformers(tensors: dict, cfg: Config):
  """Our params from transformers' CLIP vision state dict (NumPy arrays, PyTorch layouts).

  Names with or without the vision_model. prefix; a missing, unexpected or mis-shaped tensor is
  an error naming it.
  """
  d, h, f, p = cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.patch_size
  hd = d // h
  used = set()
  # transformers 4 saved CLIPVisionModel under vision_model. (as Wan's released image_encoder
  # is); transformers 5 saves the vision tower's names bare.
  prefix = "vision_model." if any(n.startswith("vision_model.") for n in tensors) else ""

  def take(name, shape):
    name = prefix + name
    if name not in tensors:
      raise KeyError(f"checkpoint has no tensor {name!r} (expected shape {shape})")
    value = tensors[name]
    if tuple(value.shape) != tuple(shape):
      raise ValueError(f"tensor {name!r} has shape {tuple(value.shape)}, expected {shape}")
    used.add(name)
    return np.asarray(value, np.float32)

  norm = lambda name: {"scale": take(f"{name}.weight", (d,)), "bias": take(f"{name}.bias", (d,))}
  layers = []
  for i in range(cfg.num_hidden_layers):
    pre = f"encoder.layers.{i}."
    attn = pre + "self_attn."
    # PyTorch Linear stores (out, in); we store (in, out) split into heads where there are any.
    layer = {"ln1": norm(pre + "layer_norm1"), "ln2": norm(pre + "layer_norm2")}
    for n in "qkv":
      layer[n] = take(attn + f"{n}_proj.weight", (d, d)).T.reshape(d, h, hd)
      layer[f"{n}_bias"] = take(attn + f"{n}_proj.bias", (d,)).reshape(h, hd)
    layer["o"] = take(attn + "out_proj.weight", (d, d)).T.reshape(h, hd, d)
    layer["o_bias"] = take(attn + "out_proj.bias", (d,))
    layer["fc1"] = take(pre + "mlp.fc1.weight", (f, d)).T
    layer["fc1_bias"] = take(pre + "mlp.fc1.bias", (f,))
    layer["fc2"] = take(pre + "mlp.fc2.weight", (d, f)).T
    layer["fc2_bias"] = take(pre + "mlp.fc2.bias", (d,))
    layers.append(layer)
  params = {
      # Conv2d (out, in, kh, kw) -> (kh, kw, in, out).
      "patch_embed": take("embeddings.patch_embedding.weight", (d, 3, p, p)).transpose(2, 3, 1, 0),
      "class_embed": take("embeddings.class_embedding", (d,)),
      "pos_embed": take("embeddings.position_embedding.weight", (cfg.num_tokens, d)),
      "pre_norm": norm("pre_layrnorm"),
      "layers": jax.tree.map(lambda *xs: np.stack(xs), *layers),
  }
  unexpected = sorted(n for n in tensors.keys() - used if not n.startswith(_UNUSED_PREFIXES))
  if unexpected:
    raise ValueError(f"checkpoint has tensors the CLIP vision encoder does not use: "
                     f"{unexpected[:8]}")
  return jax.tree.map(lambda a, ref: a.astype(ref.dtype), params, abstract(cfg))
