"""Clips to training samples on the accelerators: VAE latents, UMT5 text states and the
conditioning each family needs, sharded over the local devices (each process encodes its own
clips; nothing crosses hosts).

A sample (host NumPy, float32) holds
  latents  (F', H', W', C)  normalised as training reads them (wan/data/batch.py)
  text     (n, D)           the caption's n token states (n <= max_sequence_length), unpadded
  cond     (F', H', W', C)  concat kinds: the latents of [first frame, grey frames...], as
                            diffusers' Wan I2V pipelines build their condition
  image    (257, D_img)     Wan 2.1 I2V: CLIP states of the first frame
The first-frame mask of the concat kinds and TI2V's clean first frame follow from the latents
and are not stored.

The tiny configs use built-in encoders: the tiny VAE / UMT5 / CLIP architectures with random
weights from a fixed seed (so every process and every run makes the same ones) and the tiny
tokenizer in wan/data/tiny_tokenizer/.
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from wan import image_encoder, sharding, text_encoder, tokenizer, vae
BUILTIN = "builtin-tiny"  # the tiny configs' encoders (see above), in place of a model root
TINY_TOKENIZER = os.path.join(os.path.dirname(__file__), "tiny_tokenizer", "spiece.model")


@dataclasses.dataclass(frozen=True)
class Encoders:
  vae_cfg: vae.Config
  vae_params: dict
  text_cfg: text_encoder.Config
  text_params: dict
  tokenize: tokenizer.Tokenizer
  image_cfg: image_encoder.Config | None
  image_params: dict | None
  encoding: object  # wan.plan_data.Encoding
  mesh: jax.sharding.Mesh


def local_mesh() -> jax.sharding.Mesh:
  """This process's devices as a data-parallel mesh (the batch split over all of them)."""
  devices = np.array(jax.local_devices()).reshape(-1, 1, 1, 1)
  return jax.sharding.Mesh(devices, sharding.MESH_AXES)


def _builtin(encoding):
  latent = vae.PRESETS[encoding.latent_space]
  tiny = vae.PRESETS["tiny2.1" if encoding.latent_space == "wan2.1" else "tiny2.2"]
  vae_cfg = dataclasses.replace(tiny, z_dim=latent.z_dim, latents_mean=(0.0,) * latent.z_dim,
                                latents_std=(1.0,) * latent.z_dim)
  text_cfg = dataclasses.replace(text_encoder.TINY, d_model=encoding.text_dim)
  keys = jax.random.split(jax.random.key(20261201), 3)
  out = dict(vae_cfg=vae_cfg, vae_params=vae.init(vae_cfg, keys[0]), text_cfg=text_cfg,
             text_params=text_encoder.init(text_cfg, keys[1]),
             tokenize=tokenizer.load(TINY_TOKENIZER), image_cfg=None, image_params=None)
  if encoding.image_encoder:
    # At 224 px in 14 px patches, as ViT-H/14: the 257 tokens the transformer is planned for.
    image_cfg = dataclasses.replace(image_encoder.TINY, hidden_size=encoding.image_dim,
                                    image_size=224, patch_size=14)
    out.update(image_cfg=image_cfg, image_params=image_encoder.init(image_cfg, keys[2]))
  return out


def parts(encoding, dtype: str = "float32", text_dtype: str | None = None) -> dict:
  """The encoders of `encoding` (wan.plan_data.Encoding), not yet placed: vae_cfg, vae_params,
  text_cfg, text_params, tokenize, image_cfg, image_params (None without CLIP). dtype: the VAE's
  (and the text encoder's unless text_dtype is given)."""
  if encoding.vae == BUILTIN:
    return _builtin(encoding)
  text_dtype = text_dtype or dtype
  vae_cfg, vae_params = vae.load(encoding.vae, dtype)
  text_cfg, text_params, tokenize = text_encoder.load(
      encoding.text_encoder, encoding.tokenizer, weights_dtype=text_dtype,
      activations_dtype=text_dtype)
  out = dict(vae_cfg=vae_cfg, vae_params=vae_params, text_cfg=text_cfg,
             text_params=text_params, tokenize=tokenize, image_cfg=None, image_params=None)
  if encoding.image_encoder:
    out["image_cfg"], out["image_params"] = image_encoder.load(encoding.image_encoder)
  return out


def load(encoding, dtype: str = "float32") -> Encoders:
  """The encoders of `encoding` (wan.plan_data.Encoding), placed on this process's devices."""
  mesh = local_mesh()
  held = parts(encoding, dtype)
  replicated = jax.NamedSharding(mesh, jax.P())
  for name in ("vae_params", "text_params", "image_params"):
    if held[name] is not None:
      held[name] = jax.device_put(held[name], replicated)
  return Encoders(**held, encoding=encoding, mesh=mesh)


@functools.partial(jax.jit, static_argnames=("vae_cfg", "with_cond"))
def _encode_video(vae_params, vae_cfg, video, with_cond: bool):
  """uint8 (B, F, H, W, 3) -> normalised latents, and the condition latents when asked."""
  x = video.astype(jnp.float32) / 127.5 - 1.0
  latents = vae.normalize(vae_cfg, vae.encode(vae_params, vae_cfg, x))
  if not with_cond:
    return latents, None
  first_only = x.at[:, 1:].set(0.0)  # the pipelines' condition: first frame, then grey
  return latents, vae.normalize(vae_cfg, vae.encode(vae_params, vae_cfg, first_only))


@functools.partial(jax.jit, static_argnames="cfg")
def _encode_text(params, cfg, token_ids, mask):
  return text_encoder.encode(params, cfg, token_ids, mask)


@functools.partial(jax.jit, static_argnames="cfg")
def _encode_image(params, cfg, frames):
  return image_encoder.encode(params, cfg, frames.astype(jnp.float32) / 255.0)


def _padded(x: np.ndarray, multiple: int) -> np.ndarray:
  """Rows repeated at the end so the batch splits over the devices (results of the repeats are
  dropped)."""
  extra = -len(x) % multiple
  return np.concatenate([x, np.repeat(x[-1:], extra, axis=0)]) if extra else x


def encode(enc: Encoders, videos: np.ndarray, captions: list[str]) -> list[dict]:
  """Samples of a batch of clips of one bucket: videos (B, F, H, W, 3) uint8, one caption each."""
  n = len(captions)
  devices = enc.mesh.devices.size
  batch = jax.NamedSharding(enc.mesh, jax.P(sharding.MESH_AXES[:2]))
  kind = enc.encoding.conditioning
  with jax.set_mesh(enc.mesh):
    video = jax.device_put(_padded(videos, devices), batch)
    latents, cond = _encode_video(enc.vae_params, enc.vae_cfg, video, kind == "concat")
    ids, mask = enc.tokenize(list(captions), enc.encoding.text_len)
    text = _encode_text(enc.text_params, enc.text_cfg, jax.device_put(_padded(ids, devices), batch),
                        jax.device_put(_padded(mask, devices), batch))
    image = None
    if enc.image_params is not None:
      image = _encode_image(enc.image_params, enc.image_cfg,
                            jax.device_put(_padded(videos[:, 0], devices), batch))
  latents, text = np.asarray(latents, np.float32)[:n], np.asarray(text, np.float32)[:n]
  lengths = mask.sum(axis=1)
  out = []
  for i in range(n):
    sample = {"latents": latents[i], "text": text[i, :lengths[i]]}
    if cond is not None:
      sample["cond"] = np.asarray(cond[i], np.float32)
    if image is not None:
      sample["image"] = np.asarray(image[i], np.float32)
    out.append(sample)
  return out
