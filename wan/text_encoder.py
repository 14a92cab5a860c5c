"""UMT5 encoder (Wan's text encoder, umt5-xxl) as pure functions.

Architecture, as in transformers' UMT5EncoderModel:
  token embedding -> num_layers x [RMS norm -> self-attention with this layer's own relative
  position bias (no 1/sqrt(d) scaling) -> residual; RMS norm -> gated-GELU FFN -> residual]
  -> final RMS norm.
Wan uses the last hidden state with every row past a prompt's length set to zero.

Parameters (see `declarations`), PyTorch names in brackets:
  token_embed (vocab, D)                             [shared.weight]
  layers/ (stacked on a leading num_layers axis)
    attn_norm (D,)                                    [encoder.block.i.layer.0.layer_norm]
    q, k, v (D, H, d_kv); o (H, d_kv, D)              [...layer.0.SelfAttention.{q,k,v,o}]
    rel_bias (num_buckets, H)                         [...SelfAttention.relative_attention_bias]
    ffn_norm (D,)                                     [encoder.block.i.layer.1.layer_norm]
    wi_0, wi_1 (D, d_ff) gated | wi (D, d_ff); wo (d_ff, D)  [...layer.1.DenseReluDense.*]
  final_norm (D,)                                     [encoder.final_layer_norm]
"""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from wan import params as params_lib
from wan import safetensors_io
from wan import sharding
from wan import tokenizer as tokenizer_lib
from wan.numerics import PRECISIONS

ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # tanh approximation
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
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
  d, h, k, f = cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff
  norm = lambda: params_lib.Param((d,), ("embed",), params_lib.ones, jnp.float32)
  layer = {
      "attn_norm": norm(),
      "q": params_lib.Param((d, h, k), ("embed", "heads", None), params_lib.fan_in_uniform()),
      "k": params_lib.Param((d, h, k), ("embed", "heads", None), params_lib.fan_in_uniform()),
      "v": params_lib.Param((d, h, k), ("embed", "heads", None), params_lib.fan_in_uniform()),
      "o": params_lib.Param((h, k, d), ("heads", None, "embed"), params_lib.fan_in_uniform(2)),
      "rel_bias": params_lib.Param((cfg.relative_attention_num_buckets, h), (None, "heads"),
                                   params_lib.normal(1.0)),
      "ffn_norm": norm(),
      "wo": params_lib.Param((f, d), ("mlp", "embed"), params_lib.fan_in_uniform()),
  }
  for name in ("wi_0", "wi_1") if cfg.gated else ("wi",):
    layer[name] = params_lib.Param((d, f), ("embed", "mlp"), params_lib.fan_in_uniform())
  return {
      "token_embed": params_lib.Param((cfg.vocab_size, d), ("vocab", "embed"),
                                      params_lib.normal(1.0)),
      "layers": params_lib.stack(layer, cfg.num_layers),
      "final_norm": norm(),
  }


def init(cfg: Config, key: jax.Array):
  return params_lib.init(declarations(cfg), key, jnp.dtype(cfg.weights_dtype))


def abstract(cfg: Config):
  return params_lib.abstract(declarations(cfg), jnp.dtype(cfg.weights_dtype))


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


def _rms_norm(x, scale, eps):
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (scale.astype(jnp.float32) * x32).astype(x.dtype)


def block(p, x, buckets, key_bias, cfg: Config):
  """One encoder layer. x: (B, L, D); buckets: (L, L) int32; key_bias: (B, 1, 1, L) float32."""
  dtype = jnp.dtype(cfg.activations_dtype)
  precision = PRECISIONS[cfg.precision]
  mm = lambda spec, a, w: jnp.einsum(spec, a, w.astype(dtype), precision=precision)

  h = _rms_norm(x, p["attn_norm"], cfg.layer_norm_epsilon)
  q, k, v = (mm("bld,dhk->blhk", h, p[n]) for n in ("q", "k", "v"))
  # T5 folds the 1/sqrt(d_kv) scale into q's initialisation, so scores are not scaled here.
  scores = jnp.einsum("bqhk,bshk->bhqs", q, k, precision=precision,
                      preferred_element_type=jnp.float32)
  position_bias = jnp.transpose(p["rel_bias"].astype(jnp.float32)[buckets], (2, 0, 1))
  weights = jax.nn.softmax(scores + position_bias[None] + key_bias, axis=-1).astype(dtype)
  attn = jnp.einsum("bhqs,bshk->bqhk", weights, v, precision=precision)
  x = x + mm("blhk,hkd->bld", attn, p["o"])
  x = sharding.constrain(x, ("batch", "length", "act_embed"))

  h = _rms_norm(x, p["ffn_norm"], cfg.layer_norm_epsilon)
  act = ACTIVATIONS[cfg.dense_act_fn]
  if cfg.gated:
    h = act(mm("bld,df->blf", h, p["wi_0"])) * mm("bld,df->blf", h, p["wi_1"])
  else:
    h = act(mm("bld,df->blf", h, p["wi"]))
  h = sharding.constrain(h, ("batch", "length", "act_mlp"))
  x = x + mm("blf,fd->bld", h, p["wo"])
  return sharding.constrain(x, ("batch", "length", "act_embed"))


def encode(params, cfg: Config, token_ids: jax.Array, mask: jax.Array) -> jax.Array:
  """Text embeddings as Wan uses them.

  token_ids: (B, L) int; mask: (B, L) bool, True on real tokens (a prefix of each row).
  Returns (B, L, D) in activations_dtype: the final-norm output, rows where mask is False zero.
  """
  if token_ids.shape != mask.shape or token_ids.ndim != 2:
    raise ValueError(f"token_ids {token_ids.shape} and mask {mask.shape} must both be (B, L)")
  dtype = jnp.dtype(cfg.activations_dtype)
  x = jnp.take(params["token_embed"], token_ids, axis=0).astype(dtype)
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
  x = _rms_norm(x, params["final_norm"], cfg.layer_norm_epsilon)
  return jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))


# ---------------------------------------------------------------------------------------------
# Loading transformers checkpoints.


def load(path: str, tokenizer_path: str | None = None, **runtime):
  """(cfg, params, tokenizer) from a transformers UMT5 directory or a Wan diffusers model root.

  `path`: a directory with config.json + model.safetensors (or its sharded index), or a model
  root holding text_encoder/ and tokenizer/. The tokenizer is read from `tokenizer_path`, else
  path/tokenizer/, else `path` itself. `runtime`: Config runtime options (dtypes, precision).
  Params are NumPy arrays in weights_dtype; place them with `jax.device_put(params, shardings)`.
  """
  root = path
  if os.path.isdir(os.path.join(path, "text_encoder")):
    path = os.path.join(path, "text_encoder")
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"no config.json in {path} (nor a text_encoder/ folder in {root})")
  with open(config_path) as f:
    cfg = Config.from_json(json.load(f), **runtime)
  params = from_transformers(safetensors_io.load_dir(path, "model"), cfg)
  candidates = [tokenizer_path] if tokenizer_path else [os.path.join(root, "tokenizer"), root]
  for candidate in candidates:
    if any(os.path.exists(os.path.join(candidate, n)) for n in ("tokenizer.json", "spiece.model")):
      return cfg, params, tokenizer_lib.load(candidate)
  raise FileNotFoundError(f"no tokenizer.json or spiece.model in {candidates}; pass "
                          "tokenizer_path=")


def from_transformers(tensors: dict, cfg: Config):
  """Our params from transformers' UMT5 state dict (NumPy arrays, PyTorch layouts).

  Encoder-decoder checkpoints are accepted: decoder and LM-head tensors are ignored. A missing,
  unexpected encoder tensor or a wrong shape is an error naming the tensor.
  """
  d, h, k = cfg.d_model, cfg.num_heads, cfg.d_kv
  dtype = jnp.dtype(cfg.weights_dtype)
  used = set()

  def take(name, shape):
    if name not in tensors:
      raise KeyError(f"checkpoint has no tensor {name!r} (expected shape {shape})")
    value = tensors[name]
    if tuple(value.shape) != tuple(shape):
      raise ValueError(f"tensor {name!r} has shape {tuple(value.shape)}, expected {shape}")
    used.add(name)
    return np.asarray(value, np.float32)

  embed_name = "shared.weight" if "shared.weight" in tensors else "encoder.embed_tokens.weight"
  used.update({"shared.weight", "encoder.embed_tokens.weight"} & tensors.keys())
  layers = []
  for i in range(cfg.num_layers):
    attn = f"encoder.block.{i}.layer.0.SelfAttention."
    ffn = f"encoder.block.{i}.layer.1."
    # PyTorch Linear stores (out, in); we store (in, out) split into heads where there are any.
    layer = {
        "attn_norm": take(f"encoder.block.{i}.layer.0.layer_norm.weight", (d,)),
        **{n: take(attn + f"{n}.weight", (h * k, d)).T.reshape(d, h, k) for n in "qkv"},
        "o": take(attn + "o.weight", (d, h * k)).T.reshape(h, k, d),
        "rel_bias": take(attn + "relative_attention_bias.weight",
                         (cfg.relative_attention_num_buckets, h)),
        "ffn_norm": take(ffn + "layer_norm.weight", (d,)),
        "wo": take(ffn + "DenseReluDense.wo.weight", (d, cfg.d_ff)).T,
    }
    for n in ("wi_0", "wi_1") if cfg.gated else ("wi",):
      layer[n] = take(ffn + f"DenseReluDense.{n}.weight", (cfg.d_ff, d)).T
    layers.append(layer)
  params = {
      "token_embed": take(embed_name, (cfg.vocab_size, d)),
      "layers": jax.tree.map(lambda *xs: np.stack(xs), *layers),
      "final_norm": take("encoder.final_layer_norm.weight", (d,)),
  }
  unexpected = sorted(n for n in tensors.keys() - used
                      if not n.startswith(("decoder.", "lm_head.")))
  if unexpected:
    raise ValueError(f"checkpoint has tensors the UMT5 encoder does not use: {unexpected[:8]}")
  abstract_params = abstract(cfg)
  return jax.tree.map(lambda a, ref: a.astype(ref.dtype), params, abstract_params)
