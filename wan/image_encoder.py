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

Parameters (see `declarations`; their PyTorch names: wan/weights/image_encoder.py):
  patch_embed/kernel (p, p, 3, D)  class_embed (D,)  pos_embed (T, D)  pre_norm/{scale, bias}
  layers/ (stacked): ln1, ln2/{scale, bias}; q, k, v/{kernel (D, H, hd), bias (H, hd)};
    o/{kernel (H, hd, D), bias (D,)}; fc1/{kernel (D, F), bias}; fc2/{kernel (F, D), bias}
"""

import dataclasses

import jax
import jax.numpy as jnp

from wan import attention
from wan import layers
from wan import params as params_lib
from wan import sharding
from wan.numerics import DTYPES, PRECISIONS
from wan.weights import image_encoder as weights

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu_new": layers.gelu_tanh,
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
                                 ("weights_dtype", self.weights_dtype, DTYPES),
                                 ("activations_dtype", self.activations_dtype, DTYPES),
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
  """The declaration tree of every parameter (see wan/params.py); layers stacked on "layers"."""
  d, h, f, p = cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.patch_size
  hd = d // h
  P, zeros = params_lib.Param, params_lib.zeros
  norm = lambda: {"scale": P((d,), ("embed",), params_lib.ones, jnp.float32),
                  "bias": P((d,), ("embed",), zeros, jnp.float32)}
  dense = lambda shape, axes, fan_in_dims=1: {
      "kernel": P(shape, axes, params_lib.fan_in_uniform(fan_in_dims)),
      "bias": P(shape[fan_in_dims:], axes[fan_in_dims:], zeros)}
  layer = {
      "ln1": norm(),
      **{n: dense((d, h, hd), ("embed", "heads", None)) for n in ("q", "k", "v")},
      "o": dense((h, hd, d), ("heads", None, "embed"), fan_in_dims=2),
      "ln2": norm(),
      "fc1": dense((d, f), ("embed", "mlp")),
      "fc2": dense((f, d), ("mlp", "embed")),
  }
  return {
      "patch_embed": {"kernel": P((p, p, 3, d), (None, None, None, "embed"),
                                  params_lib.fan_in_uniform(3))},
      "class_embed": P((d,), ("embed",), params_lib.normal(d ** -0.5)),
      "pos_embed": P((cfg.num_tokens, d), (None, "embed"), params_lib.normal(0.02)),
      "pre_norm": norm(),
      "layers": params_lib.stack(layer, cfg.num_hidden_layers),
  }


def init(cfg: Config, key: jax.Array):
  return params_lib.init(declarations(cfg), key, DTYPES[cfg.weights_dtype])


def abstract(cfg: Config):
  return params_lib.abstract(declarations(cfg), DTYPES[cfg.weights_dtype])


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


def _norm(p, x, cfg: Config):
  return layers.layer_norm(x, cfg.layer_norm_eps, p["scale"], p["bias"]).astype(x.dtype)


def block(p, x, cfg: Config):
  """One encoder layer. x: (B, T, D)."""
  dense = lambda q, a, in_dims=1: layers.dense(q, a, dtype=DTYPES[cfg.activations_dtype],
                                               precision=PRECISIONS[cfg.precision],
                                               in_dims=in_dims)
  h = _norm(p["ln1"], x, cfg)
  q, k, v = (dense(p[n], h) for n in ("q", "k", "v"))  # (B, T, H, hd)
  attn = attention.dot_product(q, k, v, precision=PRECISIONS[cfg.precision])
  x = x + dense(p["o"], attn, in_dims=2)
  x = sharding.constrain(x, ("batch", "length", "act_embed"))
  h = ACTIVATIONS[cfg.hidden_act](dense(p["fc1"], _norm(p["ln2"], x, cfg)))
  h = sharding.constrain(h, ("batch", "length", "act_mlp"))
  x = x + dense(p["fc2"], h)
  return sharding.constrain(x, ("batch", "length", "act_embed"))


def hidden_state(params, cfg: Config, pixels: jax.Array, num_layers: int) -> jax.Array:
  """pixels: (B, S, S, 3) normalised -> (B, T, D), the output of the first `num_layers` layers.

  transformers' hidden_states[i] is hidden_state(..., i); hidden_states[-2] is num_layers - 1.
  """
  dtype = DTYPES[cfg.activations_dtype]
  b, s = pixels.shape[0], cfg.image_size
  if pixels.shape != (b, s, s, 3):
    raise ValueError(f"pixels must be (B, {s}, {s}, 3), got {pixels.shape}; see preprocess")
  patches = jax.lax.conv_general_dilated(
      pixels.astype(dtype), params["patch_embed"]["kernel"].astype(dtype),
      (cfg.patch_size,) * 2, "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=PRECISIONS[cfg.precision])
  patches = patches.reshape(b, -1, cfg.hidden_size)
  cls = jnp.broadcast_to(params["class_embed"].astype(dtype), (b, 1, cfg.hidden_size))
  x = jnp.concatenate([cls, patches], axis=1) + params["pos_embed"].astype(dtype)
  x = _norm(params["pre_norm"], x, cfg)
  x = sharding.constrain(x, ("batch", "length", "act_embed"))
  stacked = jax.tree.map(lambda a: a[:num_layers], params["layers"])
  if cfg.scan_layers:
    x, _ = jax.lax.scan(lambda x, p: (block(p, x, cfg), None), x, stacked)
  else:
    for i in range(num_layers):
      x = block(jax.tree.map(lambda a, i=i: a[i], stacked), x, cfg)
  return x


def encode(params, cfg: Config, images: jax.Array) -> jax.Array:
  """Wan's image embedding. images: (B, H, W, 3) in [0, 1] -> (B, T, D) penultimate-layer output.

  T = (image_size / patch_size)^2 + 1: 257 tokens of 1280 for ViT-H/14 at 224.
  """
  return hidden_state(params, cfg, preprocess(images, cfg), cfg.num_hidden_layers - 1)


# ---------------------------------------------------------------------------------------------
# Loading transformers checkpoints.


def load(path: str, **runtime):
  """(cfg, params) from a transformers CLIP vision directory or a Wan diffusers model root.

  `path`: a directory with config.json + model.safetensors (or its sharded index), or a model
  root with image_encoder/ (and image_processor/, whose mean/std are used), local or bucket.
  `runtime`: Config runtime options. Params are host NumPy arrays in weights_dtype (norms
  float32); any missing, mis-shaped or unexpected tensor is named in one CheckpointError.
  """
  ckpt = weights.read(path)
  if ckpt.processor is not None:
    runtime = {"image_mean": tuple(ckpt.processor.get("image_mean", CLIP_MEAN)),
               "image_std": tuple(ckpt.processor.get("image_std", CLIP_STD)), **runtime}
  cfg = Config.from_json(ckpt.config, **runtime)
  params = weights.to_params(ckpt.tensors, declarations(cfg), DTYPES[cfg.weights_dtype],
                             source=ckpt.directory)
  return cfg, params
