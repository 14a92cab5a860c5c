"""Sequence packing (wan/data/packing.py + transformer.forward_packed) against running each clip
alone through `forward`: the same predictions, flow-matching losses and parameter gradients."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wan import conditioning, flow, sharding
from wan import transformer as T
from wan.data import packing

PATCH = (1, 2, 2)
GRIDS = ((2, 4, 4), (2, 2, 6), (1, 4, 2))  # latent (F, H, W): 8, 6 and 2 tokens
CAPTIONS = (5, 3, 7)
# First fit: row 0 = clips 0 and 2 (10 tokens), row 1 = clip 1. Row 0's captions fill all of
# TEXT_LEN, so its padding tokens have no caption key at all (a fully masked cross-attention row).
SEQ_LEN, TEXT_LEN = 12, 12
SIGMAS = np.array([0.3, 0.75, 0.55], np.float32)
HIGHEST = T.Options(precision="HIGHEST")
FLASH = dataclasses.replace(HIGHEST, attention="flash")  # interpret mode on CPU
# Measured max relative error (max |packed - alone| / max |alone|, per clip and per parameter
# leaf) on this CPU, float32 HIGHEST:
#   dot_product  predictions 2.7e-7, losses 3.6e-7, gradients 7.6e-7 (worst leaf)
#   flash        predictions 2.0e-7, losses 2.7e-7, gradients 1.2e-6 (interpret mode)
#   tiny-i2v     predictions 2.0e-7
BOUND = 1e-5


def _samples(cfg, seed=0, i2v=False):
  rng = np.random.default_rng(seed)
  c = 16 if i2v else cfg.in_channels
  out = []
  for grid, n_text in zip(GRIDS, CAPTIONS):
    s = {"latents": rng.standard_normal((*grid, c), np.float32),
         "noise": rng.standard_normal((*grid, c), np.float32),
         "text": rng.standard_normal((n_text, cfg.text_dim), np.float32)}
    if i2v:
      s["cond"] = np.zeros_like(s["latents"])
      s["cond"][0] = s["latents"][0]
      s["cond_mask"] = np.zeros((*grid[:3], conditioning.MASK_CHANNELS), np.float32)
      s["cond_mask"][0] = 1.0
      s["image"] = rng.standard_normal((257, cfg.image_dim), np.float32)
    out.append(s)
  return out


def _rel(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@functools.cache
def _params(name):
  return T.init(T.PRESETS[name], jax.random.key(0))


# ----------------------------------------------------------------------------------------------
# The model inputs of both paths, built from flow.noisy / velocity at per-sample sigma.


def _alone_inputs(kind, s, sigma):
  """One clip as `forward` sees it alone: (model input (1, F, H, W, C_in), timestep, target)."""
  x0, noise = s["latents"][None], s["noise"][None]
  sigma = jnp.asarray([sigma])
  cond = {k: s[k][None] for k in ("cond", "cond_mask") if k in s}
  x_in, t, _ = conditioning.model_inputs(kind, flow.noisy(x0, noise, sigma),
                                         flow.NUM_TRAIN_TIMESTEPS * sigma, PATCH, cond)
  return x_in, t, flow.velocity(x0, noise)


def _packed_inputs(kind, samples, packed):
  """The packed rows: (model tokens (R, S, pv * C_in), per-token timestep (R, S), target)."""
  noise = packing.pack([dict(s, latents=s["noise"]) for s in samples], SEQ_LEN, TEXT_LEN, PATCH,
                       image_len=packed["image"].shape[1] if "image" in packed else 0)
  np.testing.assert_array_equal(noise["segment_ids"], packed["segment_ids"])
  x0, eps = packed["tokens"], noise["tokens"]
  per_segment = np.zeros(packed["segment_grid"].shape[:2], np.float32)
  per_segment[packed["placement"][:, 0], packed["placement"][:, 1] - 1] = SIGMAS
  sigma = packing.segment_broadcast(jnp.asarray(per_segment), packed["segment_ids"])
  r, s, p = x0.shape
  x_t = flow.noisy(x0.reshape(r * s, p), eps.reshape(r * s, p), sigma.reshape(-1))
  x_t = x_t.reshape(r, s, p)
  if kind == "concat":
    x_t = packing.concat_channels(
        [x_t, packed["cond_mask_tokens"], packed["cond_tokens"]], math.prod(PATCH))
  return x_t, flow.NUM_TRAIN_TIMESTEPS * sigma, flow.velocity(x0, eps)


def _alone_loss(p, cfg, kind, samples, opts):
  """Per-sample losses (3,) of each clip run alone (caption at its own length, no mask)."""
  losses = []
  for s, sigma in zip(samples, SIGMAS):
    x_in, t, target = _alone_inputs(kind, s, sigma)
    image = s["image"][None] if "image" in s else None
    pred = T.forward(p, cfg, x_in, t, s["text"][None], image, options=opts)
    losses.append(jnp.mean(jnp.square(pred - target)))
  return jnp.stack(losses)


def _packed_loss(p, cfg, kind, samples, packed, opts):
  """Per-sample losses (3,) from one packed forward: per-token error, averaged per segment."""
  x_in, t, target = _packed_inputs(kind, samples, packed)
  pred = T.forward_packed(p, cfg, x_in, packed["positions"], packed["segment_ids"], t,
                          packed["text"], packed["text_segment_ids"], packed.get("image"),
                          packed.get("image_segment_ids"), options=opts)
  err = jnp.mean(jnp.square(pred - target), axis=-1)
  per_segment = packing.segment_mean(err, packed["segment_ids"], packed["segment_grid"].shape[1])
  rows, segs = packed["placement"][:, 0], packed["placement"][:, 1] - 1
  return per_segment[rows, segs], pred


# ----------------------------------------------------------------------------------------------
# Equivalence


@functools.cache
def _t2v_alone():
  """Each tiny-t2v clip alone: (predictions, per-sample losses, gradients of their sum)."""
  cfg, p = T.PRESETS["tiny-t2v"], _params("tiny-t2v")
  samples = _samples(cfg)
  preds = [T.forward(p, cfg, *_alone_inputs("none", s, sigma)[:2], s["text"][None],
                     options=HIGHEST)[0] for s, sigma in zip(samples, SIGMAS)]
  loss = lambda p: _alone_loss(p, cfg, "none", samples, HIGHEST)
  return preds, loss(p), jax.jit(jax.grad(lambda p: loss(p).sum()))(p)


@pytest.mark.parametrize("opts", [HIGHEST, FLASH], ids=["dot_product", "flash"])
def test_packed_losses_and_gradients_match_each_clip_alone(opts):
  cfg, p = T.PRESETS["tiny-t2v"], _params("tiny-t2v")
  samples = _samples(cfg)
  packed = packing.pack(samples, SEQ_LEN, TEXT_LEN, PATCH)
  assert packed["tokens"].shape[:2] == (2, SEQ_LEN) and (packed["segment_ids"] == 0).any()
  alone_preds, alone_losses, alone_grads = _t2v_alone()

  losses, pred = _packed_loss(p, cfg, "none", samples, packed, opts)
  assert np.isfinite(np.asarray(pred)).all()  # padding tokens too
  for got, want in zip(packing.unpack(pred, packed, PATCH, cfg.out_channels), alone_preds):
    assert _rel(got, want) < BOUND
  assert _rel(losses, alone_losses) < BOUND, (losses, alone_losses)

  grads = jax.jit(jax.grad(
      lambda p: _packed_loss(p, cfg, "none", samples, packed, opts)[0].sum()))(p)
  errors = jax.tree.map(_rel, grads, alone_grads)
  assert max(jax.tree.leaves(errors)) < BOUND, errors


def test_packed_i2v_forward_matches_each_clip_alone():
  """Wan 2.1 I2V: [x_t, cond_mask, cond] channels and 257 CLIP states per clip, each in its own
  image cross-attention."""
  cfg, p = T.PRESETS["tiny-i2v"], _params("tiny-i2v")
  samples = _samples(cfg, seed=1, i2v=True)
  packed = packing.pack(samples, SEQ_LEN, TEXT_LEN, PATCH, image_len=2 * 257)
  np.testing.assert_array_equal(packed["image_segment_ids"],
                                np.repeat([[1, 2], [1, 0]], 257, axis=1))
  x_in, t, _ = _packed_inputs("concat", samples, packed)
  pred = T.forward_packed(p, cfg, x_in, packed["positions"], packed["segment_ids"], t,
                          packed["text"], packed["text_segment_ids"], packed["image"],
                          packed["image_segment_ids"], options=HIGHEST)
  assert np.isfinite(np.asarray(pred)).all()
  unpacked = packing.unpack(pred, packed, PATCH, 16)
  for s, sigma, got, (row, seg) in zip(samples, SIGMAS, unpacked, packed["placement"]):
    x_alone, t_alone, _ = _alone_inputs("concat", s, sigma)
    # The token-space concat is the patchified video-space concat.
    mine = np.asarray(x_in)[row, np.asarray(packed["segment_ids"][row]) == seg]
    np.testing.assert_array_equal(mine, packing.patchify(np.asarray(x_alone[0]), PATCH))
    want = T.forward(p, cfg, x_alone, t_alone, s["text"][None], s["image"][None],
                     options=HIGHEST)[0]
    assert _rel(got, want) < BOUND


def test_clips_do_not_see_each_other():
  """Changing one clip (latents, caption) leaves the other clips' predictions bit-identical."""
  cfg, p = T.PRESETS["tiny-t2v"], _params("tiny-t2v")
  samples = _samples(cfg)
  run = lambda packed: packing.unpack(
      T.forward_packed(p, cfg, packed["tokens"], packed["positions"], packed["segment_ids"],
                       jnp.full(packed["segment_ids"].shape, 500.0), packed["text"],
                       packed["text_segment_ids"], options=HIGHEST), packed, PATCH, 16)
  base = run(packing.pack(samples, SEQ_LEN, TEXT_LEN, PATCH))
  other = [dict(s) for s in samples]
  other[2] = dict(other[2], latents=other[2]["latents"] * 3.0, text=other[2]["text"] + 1.0)
  changed = run(packing.pack(other, SEQ_LEN, TEXT_LEN, PATCH))
  np.testing.assert_array_equal(changed[0], base[0])  # shares row 0 with clip 2
  assert _rel(changed[2], base[2]) > 1e-2


@pytest.mark.parametrize("attention", ["dot_product", "ring"])
def test_sharded_packed_forward_matches_unsharded(attention):
  """Rows over fsdp, tokens over context (ring: K/V and segment ids travel round the ring)."""
  cfg, p = T.PRESETS["tiny-t2v"], _params("tiny-t2v")
  packed = packing.pack(_samples(cfg), SEQ_LEN, TEXT_LEN, PATCH)
  args = [packed[k] for k in ("tokens", "positions", "segment_ids")]
  args += [np.full(packed["segment_ids"].shape, 400.0, np.float32), packed["text"],
           packed["text_segment_ids"]]
  want = T.forward_packed(p, cfg, *args, options=HIGHEST)
  mesh = sharding.make_mesh(dict(data=1, fsdp=2, context=2, tensor=2),
                            dict(data=1, fsdp=1, context=1, tensor=1))
  opts = dataclasses.replace(HIGHEST, attention=attention)
  with jax.set_mesh(mesh):
    got = jax.jit(lambda p, *a: T.forward_packed(p, cfg, *a, options=opts))(
        jax.device_put(p, T.shardings(cfg, mesh)), *args)
  real = packed["segment_ids"] > 0  # padding outputs are unused and differ between kernels
  assert _rel(np.asarray(got)[real], np.asarray(want)[real]) < BOUND


def test_packed_inputs_are_checked():
  cfg, p = T.PRESETS["tiny-t2v"], _params("tiny-t2v")
  packed = packing.pack(_samples(cfg), SEQ_LEN, TEXT_LEN, PATCH)
  args = [packed[k] for k in ("tokens", "positions", "segment_ids")]
  t = np.zeros(packed["segment_ids"].shape, np.float32)
  text = (packed["text"], packed["text_segment_ids"])
  with pytest.raises(ValueError, match="tokens must be"):
    T.forward_packed(p, cfg, args[0][..., :5], *args[1:], t, *text)
  with pytest.raises(ValueError, match="segment_ids must be integer"):
    T.forward_packed(p, cfg, *args[:2], args[2].astype(np.float32), t, *text)
  with pytest.raises(ValueError, match="text_segment_ids must be integer"):
    T.forward_packed(p, cfg, *args, t, text[0], text[1][:, :3])
  with pytest.raises(ValueError, match="cudnn_flash_te"):
    T.forward_packed(p, cfg, *args, t, *text, options=T.Options(attention="cudnn_flash_te"))


# ----------------------------------------------------------------------------------------------
# Host-side packing


def test_pack_layout_is_order_preserving_first_fit():
  cfg = T.PRESETS["tiny-t2v"]
  samples = _samples(cfg)
  packed = packing.pack(samples, SEQ_LEN, TEXT_LEN, PATCH)
  # Clip 1 (6 tokens) does not fit after clip 0 (8); clip 2 (2) goes back into row 0.
  np.testing.assert_array_equal(packed["placement"], [[0, 1], [1, 1], [0, 2]])
  np.testing.assert_array_equal(packed["segment_ids"],
                                [[1] * 8 + [2] * 2 + [0] * 2, [1] * 6 + [0] * 6])
  np.testing.assert_array_equal(packed["text_segment_ids"],
                                [[1] * 5 + [2] * 7, [1] * 3 + [0] * 9])
  np.testing.assert_array_equal(packed["segment_grid"],
                                [[[2, 2, 2], [1, 2, 1]], [[2, 1, 3], [0, 0, 0]]])
  np.testing.assert_array_equal(packed["text"][0, 5:], samples[2]["text"])
  np.testing.assert_array_equal(packed["text"][1, 3:], 0.0)
  np.testing.assert_array_equal(packed["tokens"][0, 8:10],
                                packing.patchify(samples[2]["latents"], PATCH))
  np.testing.assert_array_equal(packed["tokens"][0, 10:], 0.0)
  np.testing.assert_array_equal(packed["positions"][0, 8:10], [[0, 0, 0], [0, 1, 0]])
  for got, s in zip(packing.unpack(packed["tokens"], packed, PATCH, 16), samples):
    np.testing.assert_array_equal(got, s["latents"])
  again = packing.pack(samples, SEQ_LEN, TEXT_LEN, PATCH)
  jax.tree.map(np.testing.assert_array_equal, again, packed)  # deterministic


def test_pack_fixed_shapes_and_refusals():
  cfg = T.PRESETS["tiny-t2v"]
  samples = _samples(cfg)
  fixed = packing.pack(samples, SEQ_LEN, TEXT_LEN, PATCH, num_rows=4, max_segments=3)
  assert fixed["tokens"].shape[:2] == (4, SEQ_LEN) and fixed["segment_grid"].shape == (4, 3, 3)
  assert not fixed["segment_ids"][2:].any()
  one_each = packing.pack(samples, 64, 64, PATCH, max_segments=1)
  np.testing.assert_array_equal(one_each["placement"], [[0, 1], [1, 1], [2, 1]])
  with pytest.raises(ValueError, match="has 8 tokens but a row holds seq_len=6; it needs "
                                       "seq_len >= 8"):
    packing.pack(samples, 6, TEXT_LEN, PATCH)
  with pytest.raises(ValueError, match="7 caption tokens .* needs text_len >= 7"):
    packing.pack(samples, SEQ_LEN, 6, PATCH)
  with pytest.raises(ValueError, match="257 image tokens .* needs image_len >= 257"):
    packing.pack(_samples(T.PRESETS["tiny-i2v"], i2v=True), SEQ_LEN, TEXT_LEN, PATCH)
  with pytest.raises(ValueError, match="need 2 rows .* num_rows=1"):
    packing.pack(samples, SEQ_LEN, TEXT_LEN, PATCH, num_rows=1)
  with pytest.raises(ValueError, match="multiples of the patch size"):
    packing.pack([dict(samples[0], latents=np.zeros((2, 3, 4, 16), np.float32))], 64, 8, PATCH)
  with pytest.raises(ValueError, match="caption has no tokens"):
    packing.pack([dict(samples[0], text=samples[0]["text"][:0])], 64, 8, PATCH)


def test_positions_and_patchify_round_trip():
  np.testing.assert_array_equal(packing.positions((2, 1, 3)),
                                [[0, 0, 0], [0, 0, 1], [0, 0, 2], [1, 0, 0], [1, 0, 1], [1, 0, 2]])
  assert packing.positions((3, 4, 5)).dtype == np.int32
  x = np.random.default_rng(0).standard_normal((2, 4, 6, 3)).astype(np.float32)
  for patch in ((1, 2, 2), (2, 2, 1), (1, 1, 3)):
    tokens = packing.patchify(x, patch)
    grid = tuple(n // k for n, k in zip(x.shape[:3], patch))
    assert isinstance(tokens, np.ndarray) and tokens.shape == (np.prod(grid), np.prod(patch) * 3)
    np.testing.assert_array_equal(packing.unpatchify(tokens, grid, patch, 3), x)
  # Token (f, h, w) is the patch at those grid coordinates, flattened (pt, ph, pw, C).
  tokens = packing.patchify(x, (1, 2, 2))
  np.testing.assert_array_equal(tokens[1 * 6 + 1 * 3 + 2], x[1, 2:4, 4:6].reshape(-1))
  # concat_channels == patchify of the channel concatenation
  y = x[..., :2] + 1.0
  np.testing.assert_array_equal(
      packing.concat_channels([packing.patchify(x, (1, 2, 2)), packing.patchify(y, (1, 2, 2))],
                              4),
      packing.patchify(np.concatenate([x, y], -1), (1, 2, 2)))


def test_rope_gathered_by_position_is_the_grid_rope():
  """Each clip's RoPE in a packed row equals its table alone (positions restart per clip)."""
  cfg = T.PRESETS["tiny-t2v"]
  packed = packing.pack(_samples(cfg), SEQ_LEN, TEXT_LEN, PATCH)
  cos, sin = T.rope_cos_sin(cfg, packed["positions"])
  alone_cos, alone_sin = T.rope_cos_sin(cfg, packing.positions((1, 2, 1)))
  np.testing.assert_array_equal(cos[0, 8:10], alone_cos)
  np.testing.assert_array_equal(sin[0, 8:10], alone_sin)
  # Independent float64 check of one pair: frame part, pair 1 (channels 2 and 3), at frame 1.
  part = cfg.attention_head_dim - 2 * (2 * (cfg.attention_head_dim // 6))
  angle = 1 * 10000.0 ** (-2 / part)
  np.testing.assert_allclose(cos[0, 4, 2:4], [np.cos(angle)] * 2, rtol=1e-6)
  np.testing.assert_allclose(sin[0, 4, 2:4], [np.sin(angle)] * 2, rtol=1e-6)


def test_segment_mean_and_broadcast():
  values = jnp.asarray([[1.0, 2.0, 3.0, 10.0, 99.0], [4.0, 5.0, 6.0, 7.0, 8.0]])
  ids = jnp.asarray([[1, 1, 2, 2, 0], [1, 1, 1, 1, 1]])
  np.testing.assert_allclose(packing.segment_mean(values, ids, 3),
                             [[1.5, 6.5, 0.0], [6.0, 0.0, 0.0]])
  np.testing.assert_array_equal(packing.segment_broadcast(jnp.asarray([[0.5, 0.25]]), ids[:1]),
                                [[0.5, 0.5, 0.25, 0.25, 0.0]])
