"""UMT5 encoder (Wan's text encoder, umt5-xxl) as pure functions.

Architecture, as in transformers' UMT5EncoderModel:
  token embedding -> num_layers x [RMS norm -> self-attention with this layer's own relative
  position bias (no 1/sqrt(d) scaling) -> residual; RMS norm -> gated-GELU FFN -> residual]
  -> final RMS norm.
Wan uses the last hidden state with every row past a prompt's length set to zero.

Parameters (see `declarations`; their PyTorch names: wan/weights/text_encoder.py):
  token_embed (vocab, D)
  layers/ (stacked on a leading num_layers axis)
    attn_norm/scale (D,)
    q, k, v/kernel (D, H, d_kv); o/kernel (H, d_kv, D)   (no biases, as T5)
    rel_bias (num_buckets, H)
    ffn_norm/scale (D,)
    wi_0, wi_1/kernel (D, d_ff) gated | wi/kernel (D, d_ff); wo/kernel (d_ff, D)
  final_norm/scale (D,)
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from wan import attention
from wan import layers
from wan import params as params_lib
from wan import sharding
from wan import tokenizer as tokenizer_lib
from wan.errors import MissingFile
from wan.numerics import DTYPES, PRECISIONS
from wan.weights import roots
from wan.weights import text_encoder as weights

ACTIVATIONS = {
    "gelu_new": layers.gelu_tanh,  # tanh approximation
    "gelu_pytorch_tanh": layers.gelu_tanh,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class Config:
  """Architecture (transformers' config.json names; defaults are umt5-xxl) + runtime options."""
  vocab_size: int = 256384
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dense_act_fn: str = "gelu_new"
  feed_forward_proj: str = "gated-gelu"
  # Runtime options.
  weights_dtype: str = "float32"
  activations_dtype: str = "float32"
  precision: str = "DEFAULT"
  scan_layers: bool = True

  def __post_init__(self):
    for name, value, allowed in (("dense_act_fn", self.dense_act_fn, ACTIVATIONS),
                                 ("weights_dtype", self.weights_dtype, DTYPES),
                                 ("activations_dtype", self.activations_dtype, DTYPES),
                                 ("precision", self.precision, PRECISIONS)):
      if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; use one of {sorted(allowed)}")
    if self.relative_attention_num_buckets % 4:
      raise ValueError("relative_attention_num_buckets must be a multiple of 4 (half per "
                       f"direction, half of that exact), got {self.relative_attention_num_buckets}")

  @property
  def gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @classmethod
  def from_json(cls, config: dict, **runtime) -> "Config":
    """Config from a transformers config.json dict (unknown keys ignored) plus runtime options."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in names}, **runtime)


UMT5_XXL = Config()
TINY = Config(vocab_size=300, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4)


def declarations(cfg: Config):
  """The declaration tree of every parameter (see wan/params.py); layers stacked on "layers"."""
  d, h, k, f = cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff
  P = params_lib.Param
  norm = lambda: {"scale": P((d,), ("embed",), params_lib.ones, jnp.float32)}
  layer = {
      "attn_norm": norm(),
      **{n: {"kernel": P((d, h, k), ("embed", "heads", None))} for n in ("q", "k", "v")},
      "o": {"kernel": P((h, k, d), ("heads", None, "embed"), params_lib.fan_in_uniform(2))},
      "rel_bias": P((cfg.relative_attention_num_buckets, h), (None, "heads"),
                    params_lib.normal(1.0)),
      "ffn_norm": norm(),
      "wo": {"kernel": P((f, d), ("mlp", "embed"))},
  }
  for name in ("wi_0", "wi_1") if cfg.gated else ("wi",):
    layer[name] = {"kernel": P((d, f), ("embed", "mlp"))}
  return {
      "token_embed": P((cfg.vocab_size, d), ("vocab", "embed"), params_lib.normal(1.0)),
      "layers": params_lib.stack(layer, cfg.num_layers),
      "final_norm": norm(),
  }


def init(cfg: Config, key: jax.Array):
  return params_lib.init(declarations(cfg), key, DTYPES[cfg.weights_dtype])


def abstract(cfg: Config):
  return params_lib.abstract(declarations(cfg), DTYPES[cfg.weights_dtype])


def shardings(cfg: Config, mesh: jax.sharding.Mesh):
  return params_lib.shardings(declarations(cfg), mesh)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """(length, length) int32 bucket of key position - query position, bidirectional.

  Computed in NumPy float32 following transformers' arithmetic step by step, because the log
  buckets have exact-integer boundaries (e.g. distance 16 with 32 buckets) where a differently
  rounded log would move a distance into the neighbouring bucket.
  """
  relative = np.arange(length)[None, :] - np.arange(length)[:, None]
  half = num_buckets // 2  # one half of the buckets per direction
  max_exact = half // 2
  distance = np.abs(relative)
  # Distance 0 would take log(0); its bucket comes from the exact branch, so any value does.
  log_ratio = (np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
               / np.float32(math.log(max_distance / max_exact)))
  large = max_exact + (log_ratio * np.float32(half - max_exact)).astype(np.int64)
  large = np.minimum(large, half - 1)
  buckets = (relative > 0) * half + np.where(distance < max_exact, distance, large)
  return buckets.astype(np.int32)


def block(p, x, buckets, key_bias, cfg: Config):
  """One encoder layer. x: (B, L, D); buckets: (L, L) int32; key_bias: (B, 1, 1, L) float32."""
  dense = lambda q, a, in_dims=1: layers.dense(q, a, dtype=DTYPES[cfg.activations_dtype],
                                               precision=PRECISIONS[cfg.precision],
                                               in_dims=in_dims)
  eps = cfg.layer_norm_epsilon

  h = layers.rms_norm(x, p["attn_norm"]["scale"], eps)
  q, k, v = (dense(p[n], h) for n in ("q", "k", "v"))  # (B, L, H, d_kv)
  position_bias = jnp.transpose(p["rel_bias"].astype(jnp.float32)[buckets], (2, 0, 1))
  # T5 folds the 1/sqrt(d_kv) scale into q's initialisation, so scores are not scaled here.
  attn = attention.dot_product(q, k, v, bias=position_bias[None] + key_bias, scale=1.0,
                               precision=PRECISIONS[cfg.precision])
  x = x + dense(p["o"], attn, in_dims=2)
  x = sharding.constrain(x, ("batch", "length", "act_embed"))

  h = layers.rms_norm(x, p["ffn_norm"]["scale"], eps)
  act = ACTIVATIONS[cfg.dense_act_fn]
  if cfg.gated:
    h = act(dense(p["wi_0"], h)) * dense(p["wi_1"], h)
  else:
    h = act(dense(p["wi"], h))
  h = sharding.constrain(h, ("batch", "length", "act_mlp"))
  x = x + dense(p["wo"], h)
  return sharding.constrain(x, ("batch", "length", "act_embed"))


def encode(params, cfg: Config, token_ids: jax.Array, mask: jax.Array) -> jax.Array:
  """Text embeddings as Wan uses them.

  token_ids: (B, L) int; mask: (B, L) bool, True on real tokens (a prefix of each row).
  Returns (B, L, D) in activations_dtype: the final-norm output, rows where mask is False zero.
  """
  if token_ids.shape != mask.shape or token_ids.ndim != 2:
    raise ValueError(f"token_ids {token_ids.shape} and mask {mask.shape} must both be (B, L)")
  x = jnp.take(params["token_embed"], token_ids, axis=0).astype(DTYPES[cfg.activations_dtype])
  x = sharding.constrain(x, ("batch", "length", "act_embed"))
  buckets = jnp.asarray(relative_position_buckets(
      token_ids.shape[1], cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance))
  # Padded keys get the most negative float (as transformers does) rather than -inf, so a row
  # whose mask is all False still gives finite (then zeroed) output instead of NaN.
  key_bias = jnp.where(mask[:, None, None, :], 0.0, jnp.finfo(jnp.float32).min)

  def step(x, layer_params):
    return block(layer_params, x, buckets, key_bias, cfg), None

  if cfg.scan_layers:
    x, _ = jax.lax.scan(step, x, params["layers"])
  else:
    for i in range(cfg.num_layers):
      x, _ = step(x, jax.tree.map(lambda a, i=i: a[i], params["layers"]))
  x = layers.rms_norm(x, params["final_norm"]["scale"], cfg.layer_norm_epsilon)
  return jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))


# ---------------------------------------------------------------------------------------------
# Loading transformers checkpoints.


def load(path: str, tokenizer_path: str | None = None, **runtime):
  """(cfg, params, tokenizer) from a transformers UMT5 directory or a Wan diffusers model root.

  `path`: a directory with config.json + model.safetensors (or its sharded index), or a model
  root holding text_encoder/ and tokenizer/ (local or bucket). The tokenizer is read from
  `tokenizer_path`, else from `path` itself or its tokenizer/. `runtime`: Config runtime options
  (dtypes, precision). Params are host NumPy arrays in weights_dtype (norm scales float32);
  place them with `jax.device_put(params, shardings(cfg, mesh))`. Any missing, mis-shaped or
  unexpected tensor is named in one CheckpointError.
  """
  ckpt = weights.read(path)
  cfg = Config.from_json(ckpt.config, **runtime)
  params = weights.to_params(ckpt.tensors, declarations(cfg), DTYPES[cfg.weights_dtype],
                             source=ckpt.directory)
  tokenizer_dir = tokenizer_path or roots.find(path, "tokenizer")
  if tokenizer_dir is None:
    raise MissingFile(f"no tokenizer.json or spiece.model in {path} or {path}/tokenizer; "
                      "pass tokenizer_path=")
  return cfg, params, tokenizer_lib.load(tokenizer_dir)
