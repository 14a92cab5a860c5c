"""The Wan diffusion transformer (DiT) as pure functions over a parameter pytree.

One architecture covers Wan 2.1 T2V 1.3B / 14B, Wan 2.1 I2V 14B (CLIP image tokens and added
key/value projections), Wan 2.2 A14B (two experts of the same shape) and Wan 2.2 TI2V 5B
(48 latent channels, per-token timesteps); they differ only by `Config`, the architecture
(diffusers' config.json). How a network runs (dtypes, precision, attention, remat, scan, dropout,
padding masks) is a separate value, `Options`, which the training plan builds.

Data flow of `forward`:
  latents (B, F, H, W, C) -> patchify -> (B, S, pt*ph*pw*C), S = F/pt * H/ph * W/pw
  -> patch embedding (a dense) -> tokens (B, S, D)
  timestep -> sinusoidal embedding -> time MLP -> temb (B, D) and 6-way modulation (B, 6, D)
  text (B, L, text_dim) -> text MLP -> context (B, L, D); Wan 2.1 I2V adds image tokens
  tokens -> num_layers x block(self-attn with 3D RoPE, cross-attn, FFN; adaLN-modulated)
  -> output head (2-way modulation) -> unpatchify -> (B, F, H, W, C_out)
`forward_packed` runs the same network (`_network`) from the patchify step on: rows of several
clips of different sizes (wan/data/packing.py), kept apart by segment ids in every attention,
each token with its own clip's RoPE position and timestep.

Checkpoint names and layouts live in `wan/weights/transformer.py`, remat policies in
`wan/remat.py`; `load`, `save` and `flops` are part of this module's API.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

import kernels
from wan import attention, layers, params, quant, remat, sharding
from wan.flops import flops  # noqa: F401  (part of this module's API)
from wan.numerics import DTYPES, PRECISIONS
from wan.params import Param
from wan.video_tokens import apply_rope, grid_positions, patchify, rope_cos_sin, unpatchify
from wan.weights import transformer as transformer_weights

ATTENTIONS = attention.IMPLS


@dataclasses.dataclass(frozen=True)
class Config:
  """The architecture: diffusers' WanTransformer3DModel config.json fields and names."""
  patch_size: tuple[int, int, int] = (1, 2, 2)
  num_attention_heads: int = 40
  attention_head_dim: int = 128
  in_channels: int = 16
  out_channels: int = 16
  text_dim: int = 4096
  freq_dim: int = 256
  ffn_dim: int = 13824
  num_layers: int = 40
  cross_attn_norm: bool = True
  qk_norm: str | None = "rms_norm_across_heads"
  eps: float = 1e-6
  image_dim: int | None = None          # CLIP feature size (Wan 2.1 I2V: 1280)
  added_kv_proj_dim: int | None = None  # key/value projections for image tokens
  rope_max_seq_len: int = 1024
  pos_embed_seq_len: int | None = None  # FLF2V: learned position embedding of image tokens

  def __post_init__(self):
    if self.qk_norm not in (None, "rms_norm_across_heads"):
      raise ValueError(f"qk_norm={self.qk_norm!r}: only 'rms_norm_across_heads' or None exist")
    if self.attention_head_dim % 2 or self.attention_head_dim < 6:
      raise ValueError(f"attention_head_dim={self.attention_head_dim} must be even and >= 6 "
                       "(3D RoPE splits it over frames, height and width in pairs)")
    if (self.added_kv_proj_dim is None) != (self.image_dim is None):
      raise ValueError("image_dim and added_kv_proj_dim come together (Wan 2.1 I2V has both)")
    if self.added_kv_proj_dim is not None and self.added_kv_proj_dim != self.dim:
      # The image embedder maps CLIP features to `dim`; add_k_proj/add_v_proj read that.
      raise ValueError(f"added_kv_proj_dim={self.added_kv_proj_dim} must equal the model dim "
                       f"num_attention_heads * attention_head_dim = {self.dim}")

  @property
  def dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def patch_volume(self) -> int:
    return math.prod(self.patch_size)

  @classmethod
  def from_diffusers(cls, raw: dict) -> "Config":
    """From a config.json dict: unknown keys (_class_name, ...) ignored, lists made tuples."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in names}
    if kw.get("out_channels") is None:  # diffusers: out_channels defaults to in_channels
      kw["out_channels"] = kw.get("in_channels", cls.in_channels)
    return cls(**kw)

  def to_diffusers(self) -> dict:
    """The config.json fields (diffusers names, JSON types)."""
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class Options:
  """How the network runs, not what it is; hashable (a static argument of jit)."""
  weights_dtype: str = "float32"
  activations_dtype: str = "float32"
  precision: str = "DEFAULT"
  attention: str = "dot_product"
  flash_min_seq_length: int = 0
  flash_block_sizes: tuple | None = None  # ((name, size), ...) overriding the tuned entry
  # The kernels.tuning key of the devices the flash kernels compile for ("v5p", "h100", ...;
  # None: this process's devices). The plan sets it from its devices, so a CPU process can
  # compile a TPU step ahead of time (benchmarks/capacity.py).
  kernel_target: str | None = None
  split_head_dim: bool = True  # dot_product layout: heads as their own einsum dimension
  attention_sharding_uniform: bool = True  # K/V sharded over context like the queries
  mask_padding_tokens: bool = False
  scan_layers: bool = True
  remat_policy: str = "NONE"
  names_which_can_be_saved: tuple[str, ...] = ()
  names_which_can_be_offloaded: tuple[str, ...] = ()
  dropout: float = 0.0
  quantization: quant.Settings | None = None  # qwix: the dense layers it selects run quantized

  def __post_init__(self):
    for name, value, allowed in (("weights_dtype", self.weights_dtype, DTYPES),
                                 ("activations_dtype", self.activations_dtype, DTYPES),
                                 ("precision", self.precision, PRECISIONS),
                                 ("attention", self.attention, ATTENTIONS),
                                 ("remat_policy", self.remat_policy, remat.POLICIES)):
      if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {sorted(allowed)}")
    if self.flash_block_sizes is not None and not (
        isinstance(self.flash_block_sizes, tuple)
        and all(isinstance(kv, tuple) and len(kv) == 2 for kv in self.flash_block_sizes)):
      raise ValueError(f"flash_block_sizes={self.flash_block_sizes!r} must be None or a tuple of "
                       "(name, size) pairs so Options stays hashable; pass "
                       "tuple(sorted(block_sizes.items())) for a dict")
    if self.flash_block_sizes:
      kernels.BlockSizes.make(dict(self.flash_block_sizes))  # unknown names: a clear error
    if self.kernel_target is not None:
      kernels.tuning.platform_of(self.kernel_target)  # unknown keys: a clear error
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
    remat.check_names(self.names_which_can_be_saved + self.names_which_can_be_offloaded)

  @property
  def dtype(self):
    return DTYPES[self.activations_dtype]


_TINY = dict(num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=32, ffn_dim=64,
             num_layers=2)

# Architectures by name. The model family each belongs to (conditioning, VAE, experts) is
# wan/families.py's business, not the network's.
PRESETS = {
    "wan2.1-t2v-1.3b": Config(num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "wan2.1-t2v-14b": Config(),
    "wan2.1-i2v-14b": Config(in_channels=36, image_dim=1280, added_kv_proj_dim=5120),
    "wan2.2-t2v-a14b": Config(),
    "wan2.2-i2v-a14b": Config(in_channels=36),
    "wan2.2-ti2v-5b": Config(num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48,
                             out_channels=48),
    # Tiny models for CPU tests and the README's one-minute training run.
    "tiny-t2v": Config(**_TINY),
    "tiny-t2v-a14b": Config(**_TINY),
    "tiny-i2v": Config(**_TINY, in_channels=36, image_dim=24, added_kv_proj_dim=32),
    "tiny-i2v-a14b": Config(**_TINY, in_channels=36),
    "tiny-ti2v": Config(**_TINY, in_channels=48, out_channels=48),
}


# ----------------------------------------------------------------------------------------------
# Parameters


def _linear(n_in, n_out, axes):
  return {"kernel": Param((n_in, n_out), axes),
          "bias": Param((n_out,), axes[1:], params.zeros)}


def _norm(n):
  return {"scale": Param((n,), (None,), params.ones, jnp.float32),
          "bias": Param((n,), (None,), params.zeros, jnp.float32)}


def _scale(n):
  return {"scale": Param((n,), (None,), params.ones, jnp.float32)}


def _attention_decls(cfg: Config, cross: bool):
  d = cfg.dim
  decls = {name: _linear(d, d, ("embed", "heads")) for name in ("q", "k", "v")}
  decls["o"] = _linear(d, d, ("heads", "embed"))
  if cfg.qk_norm:
    decls["norm_q"], decls["norm_k"] = _scale(d), _scale(d)
  if cross and cfg.added_kv_proj_dim is not None:
    decls["k_img"] = _linear(cfg.added_kv_proj_dim, d, ("embed", "heads"))
    decls["v_img"] = _linear(cfg.added_kv_proj_dim, d, ("embed", "heads"))
    decls["norm_k_img"] = _scale(d)
  return decls


def _block_decls(cfg: Config):
  d = cfg.dim
  decls = {
      "modulation": Param((6, d), (None, "embed"), params.normal(d**-0.5), jnp.float32),
      "self_attn": _attention_decls(cfg, cross=False),
      "cross_attn": _attention_decls(cfg, cross=True),
      "ffn": {"fc1": _linear(d, cfg.ffn_dim, ("embed", "mlp")),
              "fc2": _linear(cfg.ffn_dim, d, ("mlp", "embed"))},
  }
  if cfg.cross_attn_norm:
    decls["cross_norm"] = _norm(d)
  return decls


def declarations(cfg: Config):
  """The declaration tree of every parameter (see wan/params.py); blocks stacked on "layers"."""
  d, pt, ph, pw = cfg.dim, *cfg.patch_size
  decls = {
      "patch_embed": {
          "kernel": Param((pt, ph, pw, cfg.in_channels, d), (None, None, None, None, "embed"),
                          params.fan_in_uniform(4)),
          "bias": Param((d,), ("embed",), params.zeros)},
      "time_embed": {"fc1": _linear(cfg.freq_dim, d, (None, "embed")),
                     "fc2": _linear(d, d, ("embed", None))},
      "time_proj": _linear(d, 6 * d, ("embed", None)),
      "text_embed": {"fc1": _linear(cfg.text_dim, d, (None, "embed")),
                     "fc2": _linear(d, d, ("embed", None))},
      "blocks": params.stack(_block_decls(cfg), cfg.num_layers),
      "head": {"modulation": Param((2, d), (None, "embed"), params.normal(d**-0.5), jnp.float32),
               "proj": _linear(d, cfg.out_channels * cfg.patch_volume, ("embed", None))},
  }
  if cfg.image_dim is not None:
    decls["image_embed"] = {
        "norm1": _norm(cfg.image_dim),
        "fc1": _linear(cfg.image_dim, cfg.image_dim, (None, "mlp")),
        "fc2": _linear(cfg.image_dim, d, ("mlp", "embed")),
        "norm2": _norm(d),
    }
    if cfg.pos_embed_seq_len is not None:
      decls["image_embed"]["pos_embed"] = Param((1, cfg.pos_embed_seq_len, cfg.image_dim),
                                                (None, None, None), params.zeros, jnp.float32)
  return decls


def init(cfg: Config, key: jax.Array, dtype=jnp.float32):
  """Randomly initialised parameters; weights in `dtype` (norms and modulation stay float32)."""
  return params.init(declarations(cfg), key, dtype)


def abstract(cfg: Config, dtype=jnp.float32):
  """ShapeDtypeStruct tree of the parameters."""
  return params.abstract(declarations(cfg), dtype)


def shardings(cfg: Config, mesh):
  """NamedSharding tree of the parameters on `mesh` (by the rule table in wan/sharding.py)."""
  return params.shardings(declarations(cfg), mesh)


# ----------------------------------------------------------------------------------------------
# Layers


def _dense(p, x, opts: Options):
  return layers.dense(p, x, dtype=opts.dtype, precision=PRECISIONS[opts.precision],
                      quant=opts.quantization)


def _dropout(x, rate, key):
  if rate == 0.0 or key is None:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """Sinusoidal embedding, cosine half first. t: (...,) -> (..., dim) float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def _heads(x, cfg: Config):
  """(B, S, D) -> (B, S, H, Dh), sharded over heads."""
  x = x.reshape(*x.shape[:-1], cfg.num_attention_heads, cfg.attention_head_dim)
  return sharding.constrain(x, ("batch", "length", "act_heads", None))


def _attend(q, k, v, opts: Options, segment_ids=None):
  """q: (B, S, H, Dh) against k, v: (B, L, H, Dh), through the configured implementation.

  segment_ids: None, or (q_ids (B, S), kv_ids (B, L)) int32: a query attends only to keys of
  its own id.
  """
  kv_axes = ("batch", "length" if opts.attention_sharding_uniform else "kv_length", "act_heads",
             None)
  k, v = sharding.constrain(k, kv_axes), sharding.constrain(v, kv_axes)
  q_segment_ids, kv_segment_ids = (None, None) if segment_ids is None else segment_ids
  return attention.attention(
      q, k, v, impl=opts.attention, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
      precision=PRECISIONS[opts.precision], block_sizes=opts.flash_block_sizes,
      min_seq_length=opts.flash_min_seq_length, split_head_dim=opts.split_head_dim,
      target=opts.kernel_target, kv_split=opts.attention_sharding_uniform)


def self_attention(p, x, rope, cfg: Config, opts: Options, segment_ids=None):
  """x: (B, S, D) -> (B, S, D); RMS-normed q/k (across heads), 3D RoPE (cos, sin)."""
  q = checkpoint_name(_dense(p["q"], x, opts), "query_proj")
  k = checkpoint_name(_dense(p["k"], x, opts), "key_proj")
  v = checkpoint_name(_dense(p["v"], x, opts), "value_proj")
  if cfg.qk_norm:
    q = layers.rms_norm(q, p["norm_q"]["scale"], cfg.eps)
    k = layers.rms_norm(k, p["norm_k"]["scale"], cfg.eps)
  q = checkpoint_name(apply_rope(_heads(q, cfg), *rope), "xq_out")
  k = checkpoint_name(apply_rope(_heads(k, cfg), *rope), "xk_out")
  out = _attend(q, k, _heads(v, cfg), opts, segment_ids)
  out = checkpoint_name(out.reshape(x.shape), "attn_output")
  return _dense(p["o"], out, opts)


def cross_attention(p, x, context, cfg: Config, opts: Options, text_segment_ids=None,
                    image_context=None, image_segment_ids=None):
  """x: (B, S, D) attends to text context (B, L, D) and, for Wan 2.1 I2V, image tokens (B, N, D).

  text_segment_ids / image_segment_ids: None or (q_ids (B, S), kv_ids (B, L or N)).
  """
  q = _dense(p["q"], x, opts)
  k, v = _dense(p["k"], context, opts), _dense(p["v"], context, opts)
  if cfg.qk_norm:
    q = layers.rms_norm(q, p["norm_q"]["scale"], cfg.eps)
    k = layers.rms_norm(k, p["norm_k"]["scale"], cfg.eps)
  q = _heads(q, cfg)
  out = _attend(q, _heads(k, cfg), _heads(v, cfg), opts, text_segment_ids)
  if image_context is not None:
    k_img = layers.rms_norm(_dense(p["k_img"], image_context, opts), p["norm_k_img"]["scale"],
                            cfg.eps)
    v_img = _dense(p["v_img"], image_context, opts)
    out = out + _attend(q, _heads(k_img, cfg), _heads(v_img, cfg), opts, image_segment_ids)
  return _dense(p["o"], out.reshape(x.shape), opts)


def block(p, x, ctx, cfg: Config, opts: Options, dropout_key=None):
  """One transformer block. x: (B, S, D); ctx: dict of per-forward inputs (see `_network`)."""
  dtype = x.dtype
  keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
  # (B, 6, D) or per-token (B, S, 6, D), in float32 as the reference.
  mod = p["modulation"] + ctx["modulation"]
  shift, scale, gate, c_shift, c_scale, c_gate = (mod[..., i, :] for i in range(6))
  if shift.ndim == 2:  # one timestep per sample: broadcast over tokens
    shift, scale, gate, c_shift, c_scale, c_gate = (
        m[:, None, :] for m in (shift, scale, gate, c_shift, c_scale, c_gate))

  h = (layers.layer_norm(x, cfg.eps) * (1 + scale) + shift).astype(dtype)
  h = self_attention(p["self_attn"], h, ctx["rope"], cfg, opts, ctx["self_segment_ids"])
  h = _dropout(h, opts.dropout, keys[0])
  x = (x.astype(jnp.float32) + h * gate).astype(dtype)

  h = x
  if cfg.cross_attn_norm:
    h = layers.layer_norm(x, cfg.eps, p["cross_norm"]["scale"],
                          p["cross_norm"]["bias"]).astype(dtype)
  x = x + cross_attention(p["cross_attn"], h, ctx["context"], cfg, opts, ctx["text_segment_ids"],
                          ctx["image_context"], ctx["image_segment_ids"])

  h = (layers.layer_norm(x, cfg.eps) * (1 + c_scale) + c_shift).astype(dtype)
  h = layers.gelu_tanh(_dense(p["ffn"]["fc1"], h, opts))
  h = _dropout(checkpoint_name(h, "ffn_activation"), opts.dropout, keys[1])
  h = _dense(p["ffn"]["fc2"], h, opts)
  x = (x.astype(jnp.float32) + h.astype(jnp.float32) * c_gate).astype(dtype)
  return sharding.constrain(x, ("batch", "length", "act_embed"))


def _gathered(p, decls):
  """A layer's matrices constrained whole over fsdp (their tensor-parallel split kept), as
  they are used. Inside a rematerialised layer, the backward then multiplies by the weights it
  gathered for its recomputation; left to XLA, the backward's own matmuls of the attention
  projections gathered each of them once more (14B, 720p: 225 MiB per layer and device).
  `decls`: the stacked declarations of the blocks."""
  mesh = sharding.auto_mesh()
  if mesh is None:
    return p

  def one(x, d):
    if isinstance(d, dict):
      return {k: one(v, d[k]) if k in d else v for k, v in x.items()}
    if not isinstance(x, jax.Array) or x.ndim != 2 or len(d.shape) != 3:
      return x  # vectors (norms, biases, modulation) and quantized kernels as they are
    spec, _ = sharding.param_spec(d.axes, d.shape, mesh)
    whole = jax.P(*(tuple(a for a in sharding.axes_of(e) if a != sharding.FSDP_AXIS) or None
                    for e in tuple(spec)[1:]))
    return jax.lax.with_sharding_constraint(x, whole)

  return one(p, decls)


def _run_blocks(blocks, x, ctx, cfg: Config, opts: Options, dropout_rng):
  """All blocks, scanned over the stacked "layers" axis or looped, under the remat policy
  (which also recomputes the layer's weight gathers, `_gathered`; without remat the backward
  would keep every layer's gathered weights, so XLA places the gathers then)."""
  decls = declarations(cfg)["blocks"]
  gather = (lambda p: p) if opts.remat_policy == "NONE" else (lambda p: _gathered(p, decls))
  body = remat.apply(lambda p, x, key: block(gather(p), x, ctx, cfg, opts, key), opts)
  keys = (None if dropout_rng is None or opts.dropout == 0.0
          else jax.random.split(dropout_rng, cfg.num_layers))
  if opts.scan_layers:
    def step(x, layer):
      p, key = layer
      return body(p, x, key), None
    x, _ = jax.lax.scan(step, x, (blocks, keys))
    return x
  for i in range(cfg.num_layers):
    x = body(jax.tree.map(lambda a: a[i], blocks), x, None if keys is None else keys[i])
  return x


def _check_conditions(cfg: Config, b, seq, timestep, text, image):
  """The checks `forward` and `forward_packed` share: timestep, text and image shapes."""
  if timestep.shape not in ((b,), (b, seq)):
    raise ValueError(f"timestep must be (B,)=({b},) or per-token (B, S)=({b}, {seq}); got "
                     f"{timestep.shape}")
  if text.ndim != 3 or text.shape[0] != b or text.shape[-1] != cfg.text_dim:
    raise ValueError(f"text must be (B, L, {cfg.text_dim}); got {text.shape}")
  if (image is None) != (cfg.image_dim is None):
    raise ValueError("image embeddings (B, 257, image_dim) are required exactly when the model "
                     f"has an image embedder (image_dim={cfg.image_dim})")
  if image is not None and (image.ndim != 3 or image.shape[-1] != cfg.image_dim):
    raise ValueError(f"image must be (B, N, {cfg.image_dim}); got {image.shape}")


def _check_inputs(cfg: Config, latents, timestep, text, image):
  if latents.ndim != 5 or latents.shape[-1] != cfg.in_channels:
    raise ValueError(f"latents must be (B, F, H, W, {cfg.in_channels}) channels-last; got "
                     f"{latents.shape}")
  b, f, h, w, _ = latents.shape
  pt, ph, pw = cfg.patch_size
  if f % pt or h % ph or w % pw:
    raise ValueError(f"latent frames/height/width {(f, h, w)} must be multiples of the patch "
                     f"size {cfg.patch_size}")
  grid = (f // pt, h // ph, w // pw)
  if max(grid) > cfg.rope_max_seq_len:
    raise ValueError(f"latent grid {grid} (frames, height, width after patching) exceeds "
                     f"rope_max_seq_len={cfg.rope_max_seq_len} positions on one axis; use a "
                     "smaller video or a model configured with a larger rope_max_seq_len")
  _check_conditions(cfg, b, math.prod(grid), timestep, text, image)


def _check_packed_inputs(cfg: Config, opts: Options, tokens, positions, segment_ids, timestep,
                         text, text_segment_ids, image, image_segment_ids):
  width = cfg.patch_volume * cfg.in_channels
  if tokens.ndim != 3 or tokens.shape[-1] != width:
    raise ValueError(f"tokens must be (B, S, patch_volume * in_channels = {width}); got "
                     f"{tokens.shape}")
  b, s, _ = tokens.shape
  named = [("positions", positions, (b, s, 3)), ("segment_ids", segment_ids, (b, s)),
           ("text_segment_ids", text_segment_ids, text.shape[:2])]
  if image is not None:
    if image_segment_ids is None:
      raise ValueError("image states come with image_segment_ids (B, N): the clip of each")
    named.append(("image_segment_ids", image_segment_ids, image.shape[:2]))
  for name, ids, shape in named:
    if ids.shape != shape or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"{name} must be integer {shape}; got {ids.dtype} {ids.shape}")
  _check_conditions(cfg, b, s, timestep, text, image)
  if cfg.pos_embed_seq_len is not None:
    raise ValueError("packed sequences do not support the FLF2V image position embedding "
                     "(pos_embed_seq_len); run forward on unpacked batches")
  if opts.attention == "cudnn_flash_te":
    raise ValueError("attention='cudnn_flash_te' masks by key lengths only, which cannot "
                     "separate packed clips; use 'flash', 'ring' or 'dot_product'")


def _image_context(p, image, opts: Options):
  """CLIP states (B, N, image_dim) -> image tokens (B, N, D) for the cross-attention."""
  img = image.astype(jnp.float32)
  if "pos_embed" in p:
    img = img.reshape(-1, 2 * img.shape[1], img.shape[2]) + p["pos_embed"]
  img = layers.layer_norm(img, 1e-5, p["norm1"]["scale"], p["norm1"]["bias"])
  img = _dense(p["fc2"], jax.nn.gelu(_dense(p["fc1"], img, opts), approximate=False), opts)
  return layers.layer_norm(img, 1e-5, p["norm2"]["scale"], p["norm2"]["bias"]).astype(opts.dtype)


def _network(p, cfg: Config, tokens, rope, timestep, text, image, segment_ids: dict,
             opts: Options, dropout_rng):
  """The network on patchified tokens, the one implementation behind both entry points.

  tokens: (B, S, patch_volume * in_channels); rope: cos, sin (S or B, S, head_dim);
  timestep: (B,) or (B, S); text: (B, L, text_dim); image: (B, N, image_dim) or None;
  segment_ids: {"self", "text", "image"} -> None or (q_ids (B, S), kv_ids (B, S | L | N)).
  Returns (B, S, patch_volume * out_channels) in the activation dtype.
  """
  length = tokens.shape[1]
  padded = padded_length(tokens.shape[0], length, opts)
  if padded != length:
    tokens, rope, timestep, segment_ids = _pad_tokens(tokens, rope, timestep, segment_ids,
                                                      padded)
  # Patch embedding: the (pt, ph, pw, C, D) kernel read as a dense over flattened patches.
  kernel = p["patch_embed"]["kernel"].reshape(-1, cfg.dim)
  x = _dense({"kernel": kernel, "bias": p["patch_embed"]["bias"]}, tokens, opts)
  x = sharding.constrain(x, ("batch", "length", "act_embed"))

  # Time: (B,) -> temb (B, D), modulation (B, 6, D); per-token: (B, S, D), (B, S, 6, D).
  t_freq = timestep_embedding(timestep, cfg.freq_dim)
  te = p["time_embed"]
  temb = _dense(te["fc2"], jax.nn.silu(_dense(te["fc1"], t_freq, opts)), opts)
  modulation = _dense(p["time_proj"], jax.nn.silu(temb), opts).astype(jnp.float32)
  modulation = modulation.reshape(*modulation.shape[:-1], 6, cfg.dim)

  tx = p["text_embed"]
  context = _dense(tx["fc2"], layers.gelu_tanh(_dense(tx["fc1"], text, opts)), opts)
  context = sharding.constrain(context, ("batch", "kv_length", "act_embed"))
  image_context = None if image is None else _image_context(p["image_embed"], image, opts)

  ctx = {"modulation": modulation, "rope": rope, "context": context,
         "image_context": image_context, "self_segment_ids": segment_ids["self"],
         "text_segment_ids": segment_ids["text"], "image_segment_ids": segment_ids["image"]}
  x = _run_blocks(p["blocks"], x, ctx, cfg, opts, dropout_rng)

  # Output head: 2-way modulation from temb (not the 6-way projection).
  mod = p["head"]["modulation"] + temb.astype(jnp.float32)[..., None, :]
  shift, scale = mod[..., 0, :], mod[..., 1, :]
  if shift.ndim == 2:
    shift, scale = shift[:, None, :], scale[:, None, :]
  x = (layers.layer_norm(x, cfg.eps) * (1 + scale) + shift).astype(opts.dtype)
  return _dense(p["head"]["proj"], x, opts)[:, :length]


def padded_length(batch: int, length: int, opts: Options) -> int:
  """The token count the network runs at: with the Pallas kernels, where each device holds
  whole samples, a multiple of 128, so that no kernel pads q, k and v to its tiles in every
  layer and direction (a copy of each, and a slice of each result): the patches are padded
  once and the output sliced once. Else `length`.

  Where the tokens split over devices (a batch smaller than data x fsdp, or context
  parallelism), each device's K/V shard is padded before the gather instead
  (kernels.ring_attention): padded here to 128 per device, the shards' matmuls came out
  sequence-minor in the TPU compiler's layouts and cost more than the pads they spared (14B,
  720p, batch 1 on v5p-8: +6 M cycles per layer forward; docs/performance.md).
  """
  if opts.attention not in attention.PALLAS or not attention.runs_kernel(
      opts.attention, length, opts.flash_min_seq_length):
    return length
  mesh = sharding.auto_mesh()
  sizes = {} if mesh is None else sharding.axis_sizes(mesh)
  # Whether the rules split the tokens at all, asked of a length that every split divides.
  if sharding.spec(("batch", "length"), (batch, math.prod(sizes.values())), sizes)[1]:
    return length
  return -(-length // 128) * 128


def _pad_tokens(tokens, rope, timestep, segment_ids: dict, padded: int):
  """The network's per-token inputs padded to `padded` tokens. Padded tokens take segment id
  0 in self-attention, which no real token has (real tokens keep theirs, 1 where there were
  none; packed rows give their own padding 0 already), so no real token attends to them; their
  outputs are finite and sliced off. Padded timesteps are 0."""
  b, length = tokens.shape[:2]
  tail = lambda x, axis: jnp.pad(
      x, [(0, padded - length if i == axis % x.ndim else 0) for i in range(x.ndim)])
  tokens = tail(tokens, 1)
  rope = tuple(tail(r, -2) for r in rope)
  if timestep.ndim == 2:
    timestep = tail(timestep, 1)
  self_ids = segment_ids["self"]
  if self_ids is None:
    self_ids = (jnp.ones((b, length), jnp.int32),) * 2
  segment_ids = dict(segment_ids, self=tuple(tail(ids, 1) for ids in self_ids))
  for key in ("text", "image"):  # padded queries take id 0: they attend whatever matches
    if segment_ids[key] is not None:
      q_ids, kv_ids = segment_ids[key]
      segment_ids[key] = (tail(q_ids, 1), kv_ids)
  return tokens, rope, timestep, segment_ids


def forward(params_, cfg: Config, latents, timestep, text, image=None, *, text_mask=None,
            dropout_rng=None, options: Options = Options()):
  """Predicts the flow (noise - data) for noisy latents.

  latents: (B, F, H, W, in_channels) channels-last latent video.
  timestep: (B,) or per-token (B, S) with S = F/pt * H/ph * W/pw, in [0, 1000].
  text: (B, L, text_dim) text-encoder states. image: (B, N, image_dim) CLIP states (Wan 2.1 I2V).
  text_mask: (B, L) bool, True for real tokens; used only with options.mask_padding_tokens.
  dropout_rng: key for dropout (options.dropout > 0 during training); None disables dropout.
  options: how to run (dtypes, precision, attention, remat, scan); the defaults run float32.
  Returns (B, F, H, W, out_channels) in the activation dtype.
  """
  _check_inputs(cfg, latents, timestep, text, image)
  b, f, h, w, _ = latents.shape
  pt, ph, pw = cfg.patch_size
  grid = (f // pt, h // ph, w // pw)
  tokens = patchify(latents, cfg.patch_size)
  text_segment_ids = None
  if options.mask_padding_tokens and text_mask is not None:
    # Padding tokens get segment 0, which no query carries, so they are never attended.
    text_segment_ids = (jnp.ones(tokens.shape[:2], jnp.int32), text_mask.astype(jnp.int32))
  segment_ids = {"self": None, "text": text_segment_ids, "image": None}
  out = _network(params_, cfg, tokens, rope_cos_sin(cfg, grid_positions(grid)), timestep, text,
                 image, segment_ids, options, dropout_rng)
  return unpatchify(out, grid, cfg.patch_size, cfg.out_channels)


def forward_packed(params_, cfg: Config, tokens, positions, segment_ids, timestep, text,
                   text_segment_ids, image=None, image_segment_ids=None, *,
                   options: Options = Options(), dropout_rng=None):
  """`forward` on packed rows: several clips per row, each attending only within itself.

  tokens: (B, S, patch_volume * in_channels) patchified latents (`patchify`'s order) of the
    clips of each row (wan/data/packing.py puts them one after another, padding last).
  positions: (B, S, 3) int (frame, row, column) of each token within its own clip's token grid
    (`grid_positions`); 3D RoPE is gathered per token, so each clip gets the RoPE it gets alone.
  segment_ids: (B, S) int, 1..n for the n clips of a row, 0 for padding tokens. Self-attention
    stays within a segment; padding tokens give finite outputs, to be ignored (their values
    differ between attention implementations).
  timestep: (B, S) per token (each clip its own sigma; 0 on padding is fine), or (B,).
  text: (B, L, text_dim) the captions of a row's clips concatenated; text_segment_ids (B, L)
    the clip of each text token, 0 for padding. A token reads only its own clip's caption, so
    padding text (id 0) is never attended by a clip, whatever options.mask_padding_tokens says.
  image: (B, N, image_dim) Wan 2.1 I2V CLIP states of a row's clips concatenated (257 each);
    image_segment_ids (B, N) likewise.
  Returns (B, S, patch_volume * out_channels) in the activation dtype (`unpatchify` per clip).
  """
  _check_packed_inputs(cfg, options, tokens, positions, segment_ids, timestep, text,
                       text_segment_ids, image, image_segment_ids)
  segment_ids = jnp.asarray(segment_ids, jnp.int32)
  pairs = {"self": (segment_ids, segment_ids),
           "text": (segment_ids, jnp.asarray(text_segment_ids, jnp.int32)),
           "image": None if image is None else (segment_ids,
                                                jnp.asarray(image_segment_ids, jnp.int32))}
  return _network(params_, cfg, tokens, rope_cos_sin(cfg, positions), timestep, text, image,
                  pairs, options, dropout_rng)


def load(path: str, dtype=jnp.float32, *, expert: str = "high_noise", mesh=None):
  """(cfg, params) of a diffusers or original Wan-AI checkpoint (see wan/weights/transformer.py).

  `path`: a transformer directory, a diffusers model root (`expert="low_noise"` picks the Wan 2.2
  A14B transformer_2/) or an original Wan-AI directory or root; local or bucket. params: in
  `dtype` (norms and modulation tables float32), host NumPy arrays, or with `mesh` jax Arrays
  sharded by `shardings(cfg, mesh)`, each process reading and converting only the parts its
  devices hold (a 14B model is never whole in any host's memory). Any missing, mis-shaped or
  unexpected tensor is named in one CheckpointError.
  """
  ckpt = transformer_weights.read(path, expert)
  cfg = Config.from_diffusers(ckpt.architecture)
  return cfg, transformer_weights.to_params(
      ckpt.tensors, declarations(cfg), ckpt.layout, dtype, ckpt.directory,
      shardings=None if mesh is None else shardings(cfg, mesh))


def save(path: str, cfg: Config, params_, max_shard_bytes: int = 5 * 2**30):
  """Writes a diffusers transformer directory (config.json + safetensors) atomically."""
  transformer_weights.write(path, cfg.to_diffusers(),
                            transformer_weights.to_tensors(params_, declarations(cfg)),
                            max_shard_bytes)

