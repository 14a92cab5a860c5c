"""Wan VAE encode / decode throughput on whatever device exists; prints numbers, asserts nothing.

    python benchmarks/vae.py --preset wan2.1 --frames 81 --height 480 --width 832
    python benchmarks/vae.py --smoke            # tiny model, CPU, seconds

Weights are random (the speed does not depend on them). Peak memory is the device's
`memory_stats()["peak_bytes_in_use"]` where the backend reports it (GPU/TPU, not CPU).
"""

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wan import vae  # noqa: E402


def _peak_bytes():
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _compiled_temp_bytes(fn, *args):
  """Temporary memory of the compiled program (XLA's estimate; reported on every backend)."""
  analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
  return getattr(analysis, "temp_size_in_bytes", None)


def _time(fn, iters):
  """(output, seconds of the first call incl. compile, mean seconds of `iters` later calls)."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(iters):
    jax.block_until_ready(fn())
  return out, first, (time.perf_counter() - start) / iters


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="wan2.1", choices=sorted(vae.PRESETS))
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--frames", type=int, default=17, help="1 + 4k")
  parser.add_argument("--height", type=int, default=480)
  parser.add_argument("--width", type=int, default=832)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--precision", default="default")
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--tile", type=int, default=0,
                      help="spatial tiling: tiles of this many pixels, stride 3/4 of it")
  parser.add_argument("--smoke", action="store_true", help="tiny2.1, 5 frames of 32x48, fp32")
  args = parser.parse_args(argv)
  if args.smoke:
    args.preset, args.frames, args.height, args.width = "tiny2.1", 5, 32, 48
    args.dtype, args.precision, args.iters = "float32", "highest", 1

  cfg = dataclasses.replace(vae.PRESETS[args.preset], dtype=args.dtype, precision=args.precision)
  if args.tile:
    cfg = dataclasses.replace(cfg, use_tiling=True, tile_sample_min_height=args.tile,
                              tile_sample_min_width=args.tile,
                              tile_sample_stride_height=args.tile * 3 // 4,
                              tile_sample_stride_width=args.tile * 3 // 4)
  params = vae.init(cfg, jax.random.key(0))
  video = jax.random.uniform(jax.random.key(1), (args.batch, args.frames, args.height,
                                                 args.width, cfg.video_channels),
                             jnp.float32, -1, 1).astype(cfg.dtype)
  print(f"device {jax.devices()[0].device_kind}; {args.preset} {cfg.dtype}/{cfg.precision}; "
        f"video {video.shape}")

  latents, first, step = _time(lambda: vae.encode(params, cfg, video), args.iters)
  frames = args.batch * args.frames
  print(f"encode: {frames / step:8.2f} frames/s  ({step * 1e3:.1f} ms/call, first call "
        f"{first:.1f} s incl. compile) latents {latents.shape}; peak bytes {_peak_bytes()}")
  _, first, step = _time(lambda: vae.decode(params, cfg, latents), args.iters)
  print(f"decode: {frames / step:8.2f} frames/s  ({step * 1e3:.1f} ms/call, first call "
        f"{first:.1f} s incl. compile); peak bytes {_peak_bytes()}")
  if not cfg.use_tiling:
    enc = _compiled_temp_bytes(lambda p, v: vae.encode(p, cfg, v), params, video)
    dec = _compiled_temp_bytes(lambda p, z: vae.decode(p, cfg, z), params, latents)
    print(f"compiled temporaries: encode {enc} bytes, decode {dec} bytes")


if __name__ == "__main__":
  main()
