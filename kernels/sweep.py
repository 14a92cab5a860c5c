"""Finds the fastest flash block sizes on the present device and prints a tuning-table entry.

    python -m kernels.sweep [--smoke] [--seq=16384] [--heads=40] [--head_dim=128]
                            [--dtype=bfloat16] [--reps=5]

Three searches, each over a small candidate grid valid for the kernel body in use (TPU: 128-row
multiples; GPU: powers of two plus Triton num_warps/num_stages): the forward blocks (timing the
forward), then the dK/dV blocks and then the dQ blocks (timing forward+backward with the
forward already fixed), so each kernel gets its own best. A candidate that does not compile or
run (VMEM or shared-memory overflow) is skipped with a note. The winner is checked against the
XLA reference, compared with the current table entry, and printed as a line to paste into
TABLE in kernels/tuning.py.
"""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
from absl import app, flags, logging

import kernels
from kernels import bench, tuning

FLAGS = flags.FLAGS


def candidates(body: str, smoke: bool = False) -> dict:
  """Per search: the field names it sets and the list of value tuples to try."""
  if smoke:
    pair = [(128, 128), (256, 128)]
    return {"fwd": (("block_q", "block_kv", "block_kv_compute"),
                    [(q, kv, kv) for q, kv in pair]),
            "dkv": (("block_q_dkv", "block_kv_dkv", "block_kv_dkv_compute"),
                    [(q, kv, kv) for q, kv in pair]),
            "dq": (("block_q_dq", "block_kv_dq"), pair)}
  if body == "tpu":
    sizes = (512, 1024, 2048)
    fwd = [(q, kv, c) for q, kv in itertools.product(sizes + (3072,), sizes)
           for c in (512, 1024) if c <= kv]
    dkv = [(q, kv, c) for q, kv in itertools.product(sizes, sizes + (3072,))
           for c in (256, 512, 1024) if c <= kv]
    return {"fwd": (("block_q", "block_kv", "block_kv_compute"), fwd),
            "dkv": (("block_q_dkv", "block_kv_dkv", "block_kv_dkv_compute"), dkv),
            "dq": (("block_q_dq", "block_kv_dq"), list(itertools.product(sizes, sizes)))}
  fwd = [(q, kv, kv, w, s) for q, kv, w, s in
         itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))]
  bwd = list(itertools.product((32, 64, 128), (32, 64, 128)))
  return {"fwd": (("block_q", "block_kv", "block_kv_compute", "num_warps", "num_stages"), fwd),
          "dkv": (("block_q_dkv", "block_kv_dkv", "block_kv_dkv_compute"),
                  [(q, kv, kv) for q, kv in bwd]),
          "dq": (("block_q_dq", "block_kv_dq"), bwd)}


def _timer(seq, heads, head_dim, dtype, reps, backward):
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, do = (jax.random.normal(key, (1, seq, heads, head_dim), dtype) for key in keys)

  def time_of(sizes):
    fn = lambda q, k, v: kernels.flash_attention(q, k, v, block_sizes=sizes)
    if backward:
      call, args = jax.jit(lambda q, k, v, do: jax.vjp(fn, q, k, v)[1](do)), (q, k, v, do)
    else:
      call, args = jax.jit(fn), (q, k, v)
    return bench.time_call(call, args, reps)[1]
  return time_of, (q, k, v)


def search(base, names, values, time_of, log=print):
  """The fastest BlockSizes of `base` with `names` set to one of `values` (None if all fail)."""
  best, best_time = None, float("inf")
  for value in values:
    sizes = dataclasses.replace(base, **dict(zip(names, value)))
    try:
      t = time_of(sizes)
    except Exception as e:  # a candidate that does not fit the device is skipped
      log(f"  skip {dict(zip(names, value))}: {bench._short(e)}")
      continue
    log(f"  {dict(zip(names, value))}: {t * 1e3:.3f} ms")
    if t < best_time:
      best, best_time = sizes, t
  return best, best_time


def entry_line(key: str, sizes: tuning.BlockSizes) -> str:
  fields = ", ".join(f"{f.name}={getattr(sizes, f.name)}" for f in dataclasses.fields(sizes)
                     if getattr(sizes, f.name) is not None)
  return f'    "{key}": BlockSizes({fields}),'


def sweep(seq, heads, head_dim, dtype, reps, smoke=False, log=print):
  """(table key, winning BlockSizes, {search: (old ms, new ms)}) for the present device."""
  key = tuning.device_key()
  current = kernels.block_sizes_for(key)
  body = "gpu" if jax.default_backend() == "gpu" else "tpu"
  grid = candidates(body, smoke)
  fwd_time, args = _timer(seq, heads, head_dim, dtype, reps, backward=False)
  bwd_time, _ = _timer(seq, heads, head_dim, dtype, reps, backward=True)
  best, report = current, {}
  for name, time_of in (("fwd", fwd_time), ("dkv", bwd_time), ("dq", bwd_time)):
    log(f"{name}:")
    old = time_of(best)
    found, t = search(best, *grid[name], time_of, log)
    if found is not None and t < old:
      best = found
    report[name] = (old * 1e3, min(t, old) * 1e3)
  out = kernels.flash_attention(*args, block_sizes=best).astype(jnp.float32)
  err = float(jnp.max(jnp.abs(out - bench.xla_attention(*(a.astype(jnp.float32) for a in args))
                              )))
  tol = 2e-2 if jnp.dtype(dtype) == jnp.bfloat16 else 1e-4
  if err > tol:
    raise RuntimeError(f"the winning block sizes give max error {err:.2e} > {tol}: "
                       f"{best}")
  return key, best, report


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if FLAGS.smoke:
    seq, heads, head_dim, dtype, reps = 256, 2, 64, jnp.float32, 1
  else:
    seq, heads, head_dim = FLAGS.seq, FLAGS.heads, FLAGS.head_dim
    dtype, reps = jnp.dtype(FLAGS.dtype), FLAGS.reps
  if jax.devices()[0].platform == "cpu":
    print("warning: CPU runs the Pallas kernel in interpret mode; the winner means nothing "
          "for a real device")
  key, best, report = sweep(seq, heads, head_dim, dtype, reps, FLAGS.smoke)
  print(f"\ndevice {jax.devices()[0].device_kind} (table key {key!r}), jax {jax.__version__}, "
        f"S={seq} H={heads} D={head_dim} {jnp.dtype(dtype).name}")
  for name, (old, new) in report.items():
    print(f"  {name}: table entry {old:.3f} ms -> best {new:.3f} ms ({old / new:.2f}x)")
  print("paste into TABLE in kernels/tuning.py:")
  print(entry_line(key, best))


def define_flags():
  """The command-line flags (defined only when run as a program, so the module imports cleanly)."""
  flags.DEFINE_integer("seq", 16384, "sequence length (Sq = Skv)")
  flags.DEFINE_integer("heads", 40, "heads")
  flags.DEFINE_integer("head_dim", 128, "head dimension")
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "input dtype")
  flags.DEFINE_integer("reps", 5, "timed repetitions per candidate")
  flags.DEFINE_bool("smoke", False, "a handful of tiny candidates, seconds on CPU (for tests)")


if __name__ == "__main__":
  define_flags()
  app.run(main)
