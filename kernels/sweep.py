"""Finds the fastest flash block sizes on the present device and prints a tuning-table entry.

    python -m kernels.sweep [--smoke] [--seq=16384] [--heads=40] [--head_dim=128]
                            [--dtype=bfloat16] [--reps=5]

Three searches, each over a small candidate grid valid for the kernel body in use (TPU: 128-row
multiples, kv_compute dividing kv; GPU: powers of two, plus Triton num_warps/num_stages):
the forward blocks (timing the forward), then the dK/dV blocks, then the dQ blocks (timing
forward+backward with the forward already fixed), so each kernel gets its own best. With
several --seq/--heads the objective is the summed time over all shapes. A candidate that does
not compile or run (VMEM or shared-memory overflow) is skipped with a note. The winner's output
and gradients are checked against the float32 XLA reference (on at most two heads per shape, so
the check's S×S logits fit), its time compared with the current table entry, and it is printed
as a line to paste into TABLE in kernels/tuning.py.

On GPU the Triton launch parameters (num_warps, num_stages) are one pair for all three kernels;
the forward search picks them. A full sweep is ~60 TPU or ~55 GPU candidates: minutes.
"""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

import kernels
from kernels import bench, tuning

SMOKE = dict(seqs=(256,), heads=(2,), head_dim=64, dtype="float32", reps=1)
FLAGS = flags.FLAGS


def candidates(body: str, smoke: bool = False) -> dict:
  """{"fwd" | "dkv" | "dq": (the BlockSizes fields it sets, [value tuples to try])}."""
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
  # Triton: the kv loop runs in the kernel, so block_kv_compute is block_kv.
  fwd = [(q, kv, kv, w, s) for q, kv, w, s in
         itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))]
  bwd = list(itertools.product((32, 64, 128), (32, 64, 128)))
  return {"fwd": (("block_q", "block_kv", "block_kv_compute", "num_warps", "num_stages"), fwd),
          "dkv": (("block_q_dkv", "block_kv_dkv", "block_kv_dkv_compute"),
                  [(q, kv, kv) for q, kv in bwd]),
          "dq": (("block_q_dq", "block_kv_dq"), bwd)}


def _inputs(seq, heads, head_dim, dtype):
  keys = jax.random.split(jax.random.key(0), 4)
  return tuple(jax.random.normal(key, (1, seq, heads, head_dim), dtype) for key in keys)


def make_timer(shapes, head_dim, dtype, reps, backward):
  """sizes -> summed median seconds over `shapes` [(seq, heads)] of flash fwd (or fwd+bwd)."""
  data = [_inputs(seq, heads, head_dim, dtype) for seq, heads in shapes]

  def time_of(sizes):
    fn = lambda q, k, v: kernels.flash_attention(q, k, v, block_sizes=sizes)
    total = 0.0
    for q, k, v, do in data:
      if backward:
        total += bench.time_call(lambda q, k, v, do: jax.vjp(fn, q, k, v)[1](do),
                                 (q, k, v, do), reps, warmup=1)[1]
      else:
        total += bench.time_call(fn, (q, k, v), reps, warmup=1)[1]
    return total
  return time_of


def search(base, names, values, time_of, log=print):
  """(The fastest of `base` with `names` set to each of `values`, its time), or (None, inf)."""
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


def check_against_reference(sizes, shapes, head_dim, dtype):
  """Max relative error (output, dQ, dK, dV) of flash with `sizes` vs the float32 XLA reference."""
  worst = 0.0
  for seq, heads in shapes:
    q, k, v, do = _inputs(seq, min(heads, 2), head_dim, dtype)
    flash = lambda q, k, v: kernels.flash_attention(q, k, v, block_sizes=sizes)
    ref = lambda q, k, v: bench.xla_attention(q, k, v, precision=jax.lax.Precision.HIGHEST)
    out, vjp = jax.vjp(flash, q, k, v)
    f32 = lambda x: x.astype(jnp.float32)
    ref_out, ref_vjp = jax.vjp(ref, f32(q), f32(k), f32(v))
    for got, want in zip((out, *vjp(do)), (ref_out, *ref_vjp(f32(do)))):
      got, want = np.asarray(f32(got), np.float64), np.asarray(want, np.float64)
      worst = max(worst, float(np.max(np.abs(got - want)) / np.max(np.abs(want))))
  return worst


def sweep(shapes, head_dim, dtype, reps, smoke=False, log=print):
  """(table key, winning BlockSizes, {search: (table entry ms, best ms)}, max relative error)."""
  key = tuning.device_key()
  best = kernels.block_sizes_for(key)
  grid = candidates("gpu" if jax.default_backend() == "gpu" else "tpu", smoke)
  timers = {"fwd": make_timer(shapes, head_dim, dtype, reps, backward=False)}
  timers["dkv"] = timers["dq"] = make_timer(shapes, head_dim, dtype, reps, backward=True)
  report = {}
  for name, time_of in timers.items():
    log(f"{name}:")
    try:
      old = time_of(best)
      log(f"  table entry: {old * 1e3:.3f} ms")
    except Exception as e:  # the current entry may itself not fit; any candidate then wins
      old = float("inf")
      log(f"  table entry fails: {bench._short(e)}")
    found, t = search(best, *grid[name], time_of, log)
    if found is None and old == float("inf"):
      raise RuntimeError(f"no {name} candidate runs on this device; see the skip notes above")
    if t < old:
      best = found
    report[name] = (old * 1e3, min(t, old) * 1e3)
  err = check_against_reference(best, shapes, head_dim, dtype)
  # bf16 inputs round to 8 bits; accelerators may also run float32 matmuls in reduced precision.
  tol = 1e-4 if jnp.dtype(dtype) == jnp.float32 and jax.default_backend() == "cpu" else 2e-2
  if err > tol:
    raise RuntimeError(f"the winning block sizes give relative error {err:.2e} > {tol}: {best}")
  return key, best, report, err


def entry_line(key: str, sizes: tuning.BlockSizes) -> str:
  """`    "key": BlockSizes(block_q=..., ...),` with every field that is set."""
  fields = ", ".join(f"{f.name}={getattr(sizes, f.name)}" for f in dataclasses.fields(sizes)
                     if getattr(sizes, f.name) is not None)
  return f'    "{key}": BlockSizes({fields}),'


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if FLAGS.smoke:
    seqs, heads, head_dim, dtype, reps = (SMOKE[k] for k in ("seqs", "heads", "head_dim",
                                                             "dtype", "reps"))
  else:
    seqs, heads = [int(s) for s in FLAGS.seq], [int(h) for h in FLAGS.heads]
    head_dim, dtype, reps = FLAGS.head_dim, FLAGS.dtype, FLAGS.reps
  dtype = jnp.dtype(dtype)
  shapes = [(s, h) for s in seqs for h in heads]
  if jax.devices()[0].platform == "cpu":
    print("warning: on CPU the Pallas kernel runs in interpret mode; the winner means nothing "
          "for a real device")
  key, best, report, err = sweep(shapes, head_dim, dtype, reps, FLAGS.smoke)
  print(f"\ndevice {jax.devices()[0].device_kind} (table key {key!r}), jax {jax.__version__}, "
        f"(S, H) {shapes} D={head_dim} {dtype.name}")
  for name, (old, new) in report.items():
    print(f"  {name}: table entry {old:.3f} ms -> best {new:.3f} ms ({old / new:.2f}x)")
  print(f"winner vs float32 XLA reference: max relative error {err:.1e} (output, dQ, dK, dV)")
  print("paste into TABLE in kernels/tuning.py:")
  print(entry_line(key, best))


def define_flags():
  """The command-line flags (defined only when run as a program, so the module imports cleanly)."""
  flags.DEFINE_list("seq", ["16384"], "sequence lengths (Sq = Skv); times are summed over shapes")
  flags.DEFINE_list("heads", ["40"], "head counts")
  flags.DEFINE_integer("head_dim", 128, "head dimension")
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "input dtype")
  flags.DEFINE_integer("reps", 5, "timed repetitions per candidate (the median is used)")
  flags.DEFINE_bool("smoke", False, "a handful of tiny candidates, seconds on CPU (for tests)")


if __name__ == "__main__":
  define_flags()
  app.run(main)
