"""The Wan 2.1 / 2.2 video VAE: causal 3D conv encoder and decoder, streamed chunk by chunk.

Both versions are one model chosen by `Config`: Wan 2.1 (z_dim 16, 4x8x8 compression) and Wan 2.2
(z_dim 48, 4x16x16: a 2x2 patchify in front of an 8x network, residual avg-down / dup-up paths).

Streaming: the encoder sees the first frame alone, then chunks of 4 frames; the decoder sees one
latent frame at a time. The chunks after the first share one shape and run in a `lax.scan` whose
carry is the cache of every causal convolution (its last input frames), so activation memory is
bounded by the chunk, not by the video length.

Arrays are channels-last: video (B, F, H, W, 3) in [-1, 1], latents (B, F', H', W', z_dim) with
F = 1 + 4 (F' - 1), H = H' * scale_factor_spatial.

Layers and their declarations: wan/vae/blocks.py; spatial tiling: wan/vae/tiling.py; checkpoint
names (diffusers and Wan-AI): wan/weights/vae.py.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from wan import params as params_lib
from wan import sharding
from wan.vae import blocks, tiling
from wan.weights import vae as weights

# Frames per encoder chunk after the first frame; also the temporal compression factor.
CHUNK_FRAMES = 4


@dataclasses.dataclass(frozen=True)
class Config:
  """VAE architecture (field names as in diffusers' config.json) plus runtime settings."""
  base_dim: int = 96
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_scales: tuple[float, ...] = ()
  temperal_downsample: tuple[bool, ...] = (False, True, True)
  dropout: float = 0.0
  latents_mean: tuple[float, ...] = ()
  latents_std: tuple[float, ...] = ()
  is_residual: bool = False
  in_channels: int = 3
  out_channels: int = 3
  patch_size: int | None = None
  decoder_base_dim: int | None = None
  scale_factor_temporal: int = 4
  scale_factor_spatial: int = 8
  # Clamp decoded video to [-1, 1]. diffusers 0.42 always clamps and ignores this key; the
  # released Wan 2.2 config.json sets it false, which we honour (values outside [-1, 1] only).
  clip_output: bool = True
  # runtime
  dtype: str = "float32"  # compute and parameter dtype
  precision: str = "highest"  # matmul / conv precision ("default" lets TPUs use bf16 passes)
  # Spatial tiling (diffusers' enable_tiling): sizes in video pixels (patchified pixels for the
  # encoder's tiles, as in diffusers).
  use_tiling: bool = False
  tile_sample_min_height: int = 256
  tile_sample_min_width: int = 256
  tile_sample_stride_height: int = 192
  tile_sample_stride_width: int = 192

  @property
  def patch(self) -> int:
    return self.patch_size or 1

  @property
  def video_channels(self) -> int:
    return self.in_channels // (self.patch * self.patch)

  @classmethod
  def from_diffusers(cls, config: dict, **runtime) -> "Config":
    """From a diffusers config.json dict; unknown keys (``_class_name`` ...) are ignored."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()
              if k in fields and v is not None}
    # Older config.json files omit the scale factors; they follow from the architecture.
    stages = len(kwargs.get("dim_mult", cls.dim_mult))
    kwargs.setdefault("scale_factor_spatial",
                      2 ** (stages - 1) * (kwargs.get("patch_size") or 1))
    kwargs.setdefault("scale_factor_temporal",
                      2 ** sum(kwargs.get("temperal_downsample", cls.temperal_downsample)))
    return cls(**kwargs, **runtime)


WAN21_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
WAN22_MEAN = (-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
              -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
              -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
              -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
              -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
              0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
WAN22_STD = (0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
             0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
             0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
             0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
             0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
             0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)

PRESETS = {
    "wan2.1": Config(latents_mean=WAN21_MEAN, latents_std=WAN21_STD),
    "wan2.2": Config(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True,
                     in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                     latents_mean=WAN22_MEAN, latents_std=WAN22_STD, clip_output=False),
    # Tiny models with the real structure, for tests and smoke runs.
    "tiny2.1": Config(base_dim=4, z_dim=4, dim_mult=(1, 2, 2, 2),
                      latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4),
    "tiny2.2": Config(base_dim=4, decoder_base_dim=6, z_dim=6, dim_mult=(1, 2, 2, 2),
                      num_res_blocks=1, is_residual=True, in_channels=12, out_channels=12,
                      patch_size=2, scale_factor_spatial=16,
                      latents_mean=(0.0,) * 6, latents_std=(1.0,) * 6),
}


def validate_config(cfg: Config):
  """Checks the architecture before anything is built."""
  stages = len(cfg.dim_mult)
  if len(cfg.temperal_downsample) != stages - 1:
    raise ValueError(f"temperal_downsample needs one entry per downsampling stage "
                     f"({stages - 1} for dim_mult {cfg.dim_mult}); got {cfg.temperal_downsample}")
  if cfg.attn_scales:
    raise ValueError(f"attn_scales {cfg.attn_scales} is not supported (the released Wan VAEs "
                     "use []; diffusers cannot run encoder attention either); set attn_scales=[]")
  if 2 ** sum(cfg.temperal_downsample) != cfg.scale_factor_temporal:
    raise ValueError(f"temperal_downsample {cfg.temperal_downsample} compresses time by "
                     f"{2 ** sum(cfg.temperal_downsample)} but scale_factor_temporal is "
                     f"{cfg.scale_factor_temporal}")
  if 2 ** (stages - 1) * cfg.patch != cfg.scale_factor_spatial:
    raise ValueError(f"{stages - 1} downsampling stages x patch_size {cfg.patch} compress space by "
                     f"{2 ** (stages - 1) * cfg.patch} but scale_factor_spatial is "
                     f"{cfg.scale_factor_spatial}")
  if cfg.in_channels % (cfg.patch * cfg.patch) or cfg.out_channels != cfg.in_channels:
    raise ValueError(f"in_channels {cfg.in_channels} / out_channels {cfg.out_channels} must be "
                     f"equal and a multiple of patch_size^2 = {cfg.patch ** 2}")
  for name in ("latents_mean", "latents_std"):
    if len(getattr(cfg, name)) not in (0, cfg.z_dim):
      raise ValueError(f"{name} has {len(getattr(cfg, name))} entries; z_dim is {cfg.z_dim}")


# ---------------------------------------------------------------- architecture plan

def _encoder_stages(cfg: Config):
  """Per encoder stage: (in_dim, out_dim, downsample: None | '2d' | '3d')."""
  dims = [cfg.base_dim * m for m in (1,) + tuple(cfg.dim_mult)]
  stages = []
  for i in range(len(cfg.dim_mult)):
    down = None
    if i < len(cfg.dim_mult) - 1:
      down = "3d" if cfg.temperal_downsample[i] else "2d"
    stages.append((dims[i], dims[i + 1], down))
  return stages


def _decoder_stages(cfg: Config):
  """Per decoder stage: (in_dim, out_dim, upsample: None | '2d' | '3d', upsample_out_dim)."""
  base = cfg.decoder_base_dim or cfg.base_dim
  mult = tuple(cfg.dim_mult)
  dims = [base * m for m in (mult[-1],) + mult[::-1]]
  temperal_upsample = tuple(cfg.temperal_downsample)[::-1]
  stages = []
  for i in range(len(mult)):
    in_dim, out_dim = dims[i], dims[i + 1]
    # Wan 2.1's upsamplers halve the channels, so the next stage starts from half.
    if i > 0 and not cfg.is_residual:
      in_dim //= 2
    up = None
    if i < len(mult) - 1:
      up = "3d" if temperal_upsample[i] else "2d"
    stages.append((in_dim, out_dim, up, out_dim if cfg.is_residual else out_dim // 2))
  return stages


def declarations(cfg: Config) -> dict:
  """The parameter declaration tree (see wan/params.py)."""
  validate_config(cfg)
  z2 = 2 * cfg.z_dim
  enc_stages = _encoder_stages(cfg)
  encoder = {"conv_in": blocks.conv_decl(cfg.in_channels, cfg.base_dim, (3, 3, 3)),
             "down_blocks": []}
  for in_dim, out_dim, down in enc_stages:
    resnets = [blocks.resnet_decl(in_dim if j == 0 else out_dim, out_dim)
               for j in range(cfg.num_res_blocks)]
    stage = {"resnets": resnets}
    if down:
      stage["downsampler"] = blocks.downsample_decl(out_dim, down == "3d")
    encoder["down_blocks"].append(stage)
  top = enc_stages[-1][1]
  encoder.update(mid_block=blocks.mid_block_decl(top), norm_out=blocks.norm_decl(top),
                 conv_out=blocks.conv_decl(top, z2, (3, 3, 3)))

  dec_stages = _decoder_stages(cfg)
  first = dec_stages[0][0]
  decoder = {"conv_in": blocks.conv_decl(cfg.z_dim, first, (3, 3, 3)),
             "mid_block": blocks.mid_block_decl(first), "up_blocks": []}
  for in_dim, out_dim, up, up_out in dec_stages:
    resnets = [blocks.resnet_decl(in_dim if j == 0 else out_dim, out_dim)
               for j in range(cfg.num_res_blocks + 1)]
    stage = {"resnets": resnets}
    if up:
      stage["upsampler"] = blocks.upsample_decl(out_dim, up_out, up == "3d")
    decoder["up_blocks"].append(stage)
  last = dec_stages[-1][1]
  decoder.update(norm_out=blocks.norm_decl(last),
                 conv_out=blocks.conv_decl(last, cfg.out_channels, (3, 3, 3)))
  return {"encoder": encoder, "decoder": decoder,
          "quant_conv": blocks.conv_decl(z2, z2, (1, 1, 1)),
          "post_quant_conv": blocks.conv_decl(cfg.z_dim, cfg.z_dim, (1, 1, 1))}


@functools.partial(jax.jit, static_argnames="cfg")
def init(cfg: Config, key: jax.Array) -> dict:
  """Random parameters (one compiled program, not one dispatch per leaf)."""
  return params_lib.init(declarations(cfg), key, jnp.dtype(cfg.dtype))


def abstract(cfg: Config) -> dict:
  return params_lib.abstract(declarations(cfg), jnp.dtype(cfg.dtype))


# ---------------------------------------------------------------- one chunk

def _resnets(resnets, x, stage_cache, precision):
  """The resnets of one stage in order: (x, {"resnets": [their caches]}), the start of the
  stage's cache (its resampler adds its own)."""
  caches = []
  for j, rp in enumerate(resnets):
    x, c = blocks.resnet(rp, x, blocks.cache_at(stage_cache, "resnets", j), precision)
    caches.append(c)
  return x, {"resnets": caches}


def encoder_chunk(p, cfg: Config, x, cache):
  """Encoder over one chunk (B, T, H, W, Cin) -> ((B, T', h, w, 2 z_dim), cache).

  `cache=None` on the first chunk (one frame); the returned cache has the same structure and
  shapes for every later chunk of CHUNK_FRAMES frames.
  """
  prec, sub = cfg.precision, blocks.cache_at
  new = {"down_blocks": []}
  x, new["conv_in"] = blocks.causal_conv(p["conv_in"], x, sub(cache, "conv_in"), prec)
  for i, (sp, (_, out_dim, down)) in enumerate(zip(p["down_blocks"], _encoder_stages(cfg))):
    stage_in = x
    x, stage_cache = _resnets(sp["resnets"], x, sub(cache, "down_blocks", i), prec)
    if down:
      x, stage_cache["downsampler"] = blocks.downsample(
          sp["downsampler"], x, sub(cache, "down_blocks", i, "downsampler"), prec)
    if cfg.is_residual:
      x = x + blocks.avg_down(stage_in, out_dim, 2 if down == "3d" else 1, 2 if down else 1)
    new["down_blocks"].append(stage_cache)
  x, new["mid_block"] = blocks.mid_block(p["mid_block"], x, sub(cache, "mid_block"), prec)
  x = jax.nn.silu(blocks.rms_norm(p["norm_out"], x))
  x, new["conv_out"] = blocks.causal_conv(p["conv_out"], x, sub(cache, "conv_out"), prec)
  return x, new


def decoder_chunk(p, cfg: Config, z, cache):
  """Decoder over one latent frame (B, 1, h, w, z_dim) -> ((B, T, H, W, Cout), cache).

  T is 1 on the first chunk (`cache=None`) and scale_factor_temporal afterwards.
  """
  prec, sub = cfg.precision, blocks.cache_at
  first = cache is None
  new = {"up_blocks": []}
  x, new["conv_in"] = blocks.causal_conv(p["conv_in"], z, sub(cache, "conv_in"), prec)
  x, new["mid_block"] = blocks.mid_block(p["mid_block"], x, sub(cache, "mid_block"), prec)
  for i, (sp, (_, out_dim, up, _)) in enumerate(zip(p["up_blocks"], _decoder_stages(cfg))):
    stage_in = x
    x, stage_cache = _resnets(sp["resnets"], x, sub(cache, "up_blocks", i), prec)
    if up:
      x, stage_cache["upsampler"] = blocks.upsample(
          sp["upsampler"], x, sub(cache, "up_blocks", i, "upsampler"), prec)
      if cfg.is_residual:
        x = x + blocks.dup_up(stage_in, out_dim, 2 if up == "3d" else 1, 2, first)
    new["up_blocks"].append(stage_cache)
  x = jax.nn.silu(blocks.rms_norm(p["norm_out"], x))
  x, new["conv_out"] = blocks.causal_conv(p["conv_out"], x, sub(cache, "conv_out"), prec)
  return x, new


def _stream(chunk_fn, first, rest):
  """Runs `chunk_fn(x, cache) -> (y, cache)` on `first` (cache None), then scans it over the
  leading axis of `rest` (N, B, T, ...); returns the outputs joined along time (B, F, ...)."""
  y0, cache = chunk_fn(first, None)
  if rest.shape[0] == 0:
    return y0

  def step(cache, x):
    y, cache = chunk_fn(x, cache)
    return cache, y

  _, ys = jax.lax.scan(step, cache, rest)
  ys = jnp.moveaxis(ys, 0, 1)  # (B, N, T, ...)
  ys = ys.reshape((ys.shape[0], -1) + ys.shape[3:])
  return jnp.concatenate([y0, ys], axis=1)


def _cast(params, cfg):
  return jax.tree.map(lambda a: a.astype(cfg.dtype), params)


# ---------------------------------------------------------------- public API

def _check_video(cfg: Config, video):
  validate_config(cfg)
  if video.ndim != 5:
    raise ValueError(f"video must be (B, F, H, W, C) channels-last; got shape {video.shape}")
  _, f, h, w, c = video.shape
  if c != cfg.video_channels:
    raise ValueError(f"video has {c} channels but this VAE takes {cfg.video_channels} "
                     f"(channels-last: (B, F, H, W, {cfg.video_channels}))")
  t = cfg.scale_factor_temporal
  if f < 1 or (f - 1) % t:
    raise ValueError(f"video has {f} frames; the VAE needs 1 + {t}k frames: use "
                     f"{1 + (f - 1) // t * t} or {1 + (max(f - 1, 0) // t + 1) * t}")
  s = cfg.scale_factor_spatial
  if h % s or w % s:
    raise ValueError(f"video size {h}x{w} is not divisible by the spatial factor {s}; crop or "
                     f"resize to {h // s * s}x{w // s * s} or {-(-h // s) * s}x{-(-w // s) * s}")


def _check_latents(cfg: Config, latents):
  validate_config(cfg)
  if latents.ndim != 5 or latents.shape[-1] != cfg.z_dim:
    raise ValueError(f"latents must be (B, F, H, W, {cfg.z_dim}) channels-last; got shape "
                     f"{latents.shape}")


@functools.partial(jax.jit, static_argnames="cfg")
def _encode_moments(params, cfg: Config, x):
  """Patchified video (B, F, H/p, W/p, Cin) -> quantised moments (B, F', h, w, 2 z_dim)."""
  p = _cast(params, cfg)
  x = sharding.constrain(x.astype(cfg.dtype), ("batch", None, None, None, None))
  b, f = x.shape[:2]
  rest = x[:, 1:].reshape((b, (f - 1) // CHUNK_FRAMES, CHUNK_FRAMES) + x.shape[2:])
  rest = jnp.moveaxis(rest, 1, 0)  # (k, B, 4, ...): one scan step per chunk
  h = _stream(lambda c, cache: encoder_chunk(p["encoder"], cfg, c, cache), x[:, :1], rest)
  return blocks.conv3d(p["quant_conv"], h, cfg.precision)


@functools.partial(jax.jit, static_argnames="cfg")
def _decode_patches(params, cfg: Config, latents):
  """Latents (B, F', h, w, z_dim) -> decoder output (B, F, H/p, W/p, Cout), not unpatchified."""
  p = _cast(params, cfg)
  z = blocks.conv3d(p["post_quant_conv"], latents.astype(cfg.dtype), cfg.precision)
  z = sharding.constrain(z, ("batch", None, None, None, None))
  rest = jnp.moveaxis(z[:, 1:, None], 1, 0)  # (F' - 1, B, 1, h, w, z): one latent frame a step
  return _stream(lambda c, cache: decoder_chunk(p["decoder"], cfg, c, cache), z[:, :1], rest)


def encode(params, cfg: Config, video):
  """Posterior mean (not normalised) of a video.

  video: (B, F, H, W, C) in [-1, 1] with F = 1 + 4k, H and W multiples of scale_factor_spatial.
  Returns latents (B, 1 + k, H / s, W / s, z_dim). With cfg.use_tiling and frames larger than
  the tile, each tile is a separate compiled call (bounded memory) and the tiles are blended.
  """
  _check_video(cfg, video)
  x = blocks.patchify(video, cfg.patch)
  height, width = x.shape[2:4]
  tile = (cfg.tile_sample_min_height, cfg.tile_sample_min_width)
  if cfg.use_tiling and (height > tile[0] or width > tile[1]):
    # Tiles are cut from the patchified video, in its pixels (as diffusers does).
    ratio = cfg.scale_factor_spatial // cfg.patch
    _check_tile_stride(cfg, ratio, "the encoder")
    stride = (cfg.tile_sample_stride_height, cfg.tile_sample_stride_width)
    out_stride = (stride[0] // ratio, stride[1] // ratio)
    blend = (tile[0] // ratio - out_stride[0], tile[1] // ratio - out_stride[1])
    h = tiling.tiled(lambda t: _encode_moments(params, cfg, t), x, tile, stride,
                     out_stride, blend, (height // ratio, width // ratio))
  else:
    h = _encode_moments(params, cfg, x)
  return h[..., :cfg.z_dim]


def decode(params, cfg: Config, latents):
  """Video from (not normalised) latents.

  latents: (B, F', h, w, z_dim). Returns video (B, 1 + 4 (F' - 1), h s, w s, C), clamped to
  [-1, 1] when cfg.clip_output. Tiled like `encode` when cfg.use_tiling.
  """
  _check_latents(cfg, latents)
  height, width = latents.shape[2:4]
  s, p = cfg.scale_factor_spatial, cfg.patch
  tile = (cfg.tile_sample_min_height // s, cfg.tile_sample_min_width // s)
  if cfg.use_tiling and (height > tile[0] or width > tile[1]):
    _check_tile_stride(cfg, s, "the decoder")
    stride = (cfg.tile_sample_stride_height // s, cfg.tile_sample_stride_width // s)
    out_stride = (cfg.tile_sample_stride_height // p, cfg.tile_sample_stride_width // p)
    blend = (cfg.tile_sample_min_height // p - out_stride[0],
             cfg.tile_sample_min_width // p - out_stride[1])
    out = tiling.tiled(lambda t: _decode_patches(params, cfg, t), latents, tile, stride,
                       out_stride, blend, (height * s // p, width * s // p))
  else:
    out = _decode_patches(params, cfg, latents)
  out = blocks.unpatchify(out, p)
  return jnp.clip(out, -1.0, 1.0) if cfg.clip_output else out


def _check_tile_stride(cfg: Config, minimum: int, what: str):
  stride = (cfg.tile_sample_stride_height, cfg.tile_sample_stride_width)
  if min(stride) < minimum:
    raise ValueError(f"tile strides {stride} are below one latent pixel for {what}; use "
                     f"tile_sample_stride_height/width of at least {minimum}")


def _stats(cfg: Config, dtype):
  if not cfg.latents_mean or not cfg.latents_std:
    raise ValueError("this Config has no latents_mean / latents_std; set them (diffusers' "
                     "config.json has both) to normalise latents")
  return jnp.asarray(cfg.latents_mean, dtype), jnp.asarray(cfg.latents_std, dtype)


def normalize(cfg: Config, latents):
  """(latents - mean) / std per channel, as diffusers' Wan pipelines prepare latents.

  latents: (..., z_dim)."""
  mean, std = _stats(cfg, latents.dtype)
  return (latents - mean) / std


def denormalize(cfg: Config, latents):
  """Inverse of `normalize`: latents * std + mean (what the pipelines do before decoding)."""
  mean, std = _stats(cfg, latents.dtype)
  return latents * std + mean


# ---------------------------------------------------------------- placement

def shardings(cfg: Config, mesh: jax.sharding.Mesh) -> dict:
  """NamedSharding tree of the parameters from their declared logical axes (all None: the VAE
  is small next to its activations, so it is replicated and the batch is split instead)."""
  return params_lib.shardings(declarations(cfg), mesh)


def replicate_vae(params, cfg: Config, mesh: jax.sharding.Mesh):
  """Places VAE parameters on `mesh` by their declarations (replicated)."""
  return jax.device_put(params, shardings(cfg, mesh))


def shard_batch(x, mesh: jax.sharding.Mesh):
  """Places a video or latent batch (B, ...) split over the mesh's batch axes (data, fsdp)."""
  spec = sharding.spec(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh)
  return jax.device_put(x, jax.NamedSharding(mesh, spec))


# ---------------------------------------------------------------- loading

def load(path: str, dtype: str = "float32", config: Config | None = None):
  """(cfg, params) from a diffusers directory (config.json + diffusion_pytorch_model.safetensors,
  or a model root with a vae/ subdirectory) or an original Wan-AI VAE .safetensors file
  (Wan2.1_VAE / Wan2.2_VAE converted from .pth; its config is the released one unless `config`
  is given); local or bucket paths. Params are host NumPy arrays in `dtype`; any missing,
  mis-shaped or unexpected tensor is named in one CheckpointError."""
  ckpt = weights.read(path)
  if ckpt.config is not None:
    cfg = Config.from_diffusers(ckpt.config, dtype=dtype)
  else:
    cfg = dataclasses.replace(config or weights.original_preset(ckpt.tensors, PRESETS),
                              dtype=dtype)
  params = weights.to_params(ckpt.tensors, declarations(cfg), cfg, jnp.dtype(cfg.dtype),
                             source=ckpt.source)
  return cfg, params
