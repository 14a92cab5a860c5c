"""Attention microbenchmark on the present device: flash kernel vs XLA (and cuDNN on GPU).

    python -m kernels.bench [--smoke] [--seq=4096,8192] [--heads=12,40] [--head_dim=128]
                            [--dtype=bfloat16] [--batch=1] [--block_sizes=block_q=256,...]
                            [--reps=10] [--json=kernels_bench.json]

For each (sequence, heads) shape it times the forward and the forward+backward (a vjp with a
fixed cotangent) of every implementation: compile ahead of time (reported separately, never
in the timings), two warm-up calls, then the median of --reps calls, each ended by
`jax.block_until_ready`. It reports milliseconds, TFLOP/s and the speed of flash relative to
XLA and cuDNN (their time over flash's, i.e. flash TFLOP/s over theirs: 0.9 = 90% of cuDNN).

FLOPs follow the FlashAttention-2 convention, non-causal: forward 4·B·H·Sq·Skv·D (the two
matmuls QKᵀ and PV, 2 FLOPs per multiply-add); backward 2.5× forward (five matmuls, QKᵀ
recomputed); forward+backward 3.5× forward. Softmax and exp are not counted.

A shape an implementation cannot run gets a row saying why (cuDNN unavailable or unsupported,
out of memory, or the XLA reference skipped because its S×S float32 logits would not fit)
instead of stopping the table. Writes {"header": {...}, "rows": [...]} as JSON.
On CPU the Pallas kernel runs in interpret mode: its times there say nothing about speed.
"""

import datetime
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags, logging

import kernels

WAN_SEQS = (4096, 8192, 16384, 32768, 75600)  # 75,600: 720p, 81 frames
IMPLS = ("flash", "xla", "cudnn")
SMOKE = dict(seqs=(256, 384), heads=(2,), head_dim=64, dtype="float32", reps=3)
FLAGS = flags.FLAGS


def attention_flops(batch, heads, sq, skv, head_dim, backward=False) -> float:
  """FLOPs of non-causal softmax attention: forward 4·B·H·Sq·Skv·D; with backward 3.5× that.

  The FlashAttention-2 count: QKᵀ and PV are 2·B·H·Sq·Skv·D each; the backward's five matmuls
  (QKᵀ recomputed, dV, dP, dQ, dK) are 2.5× the forward.
  """
  forward = 4.0 * batch * heads * sq * skv * head_dim
  return forward * 3.5 if backward else forward


def xla_attention(q, k, v, precision=None):
  """The XLA reference: einsum softmax attention with float32 logits. (B, S, H, D) -> same."""
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32,
                 precision=precision)
  p = jax.nn.softmax(s * q.shape[-1] ** -0.5, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32,
                    precision=precision).astype(q.dtype)


def cudnn_attention(q, k, v):
  """cuDNN's fused attention through jax (NVIDIA GPUs only). (B, S, H, D) -> same."""
  return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


def parse_block_sizes(items):
  """["block_q=256", ...] -> {"block_q": 256, ...} (None when empty)."""
  if not items:
    return None
  out = {}
  for item in items:
    name, sep, value = item.partition("=")
    if not sep or not value.strip().isdigit():
      raise ValueError(f"--block_sizes entries are name=integer, got {item!r}")
    out[name.strip()] = int(value)
  kernels.BlockSizes.make(out)  # unknown names fail here, before any work
  return out


def time_call(fn, args, reps, warmup=2):
  """(compile seconds, median seconds of `reps` calls after `warmup` calls) of jax.jit(fn)."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return compile_s, statistics.median(times)


def _memory_limit():
  """Bytes the first device may allocate (16 GiB when the backend does not say, as on CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_limit", 16 << 30)


def _skip_reason(impl, batch, heads, seq):
  if impl == "cudnn" and jax.default_backend() != "gpu":
    return "unavailable (cuDNN needs an NVIDIA GPU)"
  # The XLA backward holds about three S×S float32 arrays per head (logits, probabilities, dP).
  need, limit = 3 * 4 * batch * heads * seq * seq, _memory_limit()
  if impl == "xla" and need > 0.8 * limit:
    return f"skipped (memory: ~{need / 2**30:.0f} GiB of S x S logits > {limit / 2**30:.0f} GiB)"
  return None


def _short(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f"failed: {type(error).__name__}: {text[0][:120] if text else ''}"


def measure(impl, batch, heads, seq, head_dim, dtype, block_sizes, reps) -> dict:
  """One row: forward and forward+backward times and TFLOP/s of `impl` at one shape."""
  row = dict(impl=impl, batch=batch, heads=heads, seq=seq, head_dim=head_dim,
             dtype=jnp.dtype(dtype).name, status="ok")
  reason = _skip_reason(impl, batch, heads, seq)
  if reason:
    return dict(row, status=reason)
  fn = {"flash": lambda q, k, v: kernels.flash_attention(q, k, v, block_sizes=block_sizes),
        "xla": xla_attention, "cudnn": cudnn_attention}[impl]
  try:  # one failing shape (out of memory, unsupported by cuDNN) must not end the table
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(key, (batch, seq, heads, head_dim), dtype) for key in keys)
    compile_fwd, fwd = time_call(fn, (q, k, v), reps)
    compile_bwd, fwd_bwd = time_call(lambda q, k, v, do: jax.vjp(fn, q, k, v)[1](do),
                                     (q, k, v, do), reps)
  except Exception as e:
    return dict(row, status=_short(e))
  return dict(row, fwd_ms=fwd * 1e3,
              fwd_tflops=attention_flops(batch, heads, seq, seq, head_dim) / fwd / 1e12,
              fwd_bwd_ms=fwd_bwd * 1e3,
              fwd_bwd_tflops=attention_flops(batch, heads, seq, seq, head_dim, True)
              / fwd_bwd / 1e12,
              compile_fwd_s=compile_fwd, compile_fwd_bwd_s=compile_bwd)


def add_ratios(rows):
  """Flash rows get `fwd_vs_{xla,cudnn}` / `fwd_bwd_vs_*`: the other's time over flash's."""
  by_shape = {(r["impl"], r["heads"], r["seq"]): r for r in rows}
  for r in rows:
    if r["impl"] != "flash" or r["status"] != "ok":
      continue
    for other in ("xla", "cudnn"):
      o = by_shape.get((other, r["heads"], r["seq"]))
      if o and o["status"] == "ok":
        r[f"fwd_vs_{other}"] = o["fwd_ms"] / r["fwd_ms"]
        r[f"fwd_bwd_vs_{other}"] = o["fwd_bwd_ms"] / r["fwd_bwd_ms"]


def format_table(header, rows) -> str:
  """The header line and an aligned table, one row per (shape, implementation)."""
  cols = ("seq", "heads", "impl", "fwd ms", "fwd TF/s", "f+b ms", "f+b TF/s", "vs cuDNN",
          "vs XLA", "compile s", "note")
  device = header["device"]
  if header["platform"] not in device.lower():
    device += f" ({header['platform']})"
  lines = [f"device: {device}  jax {header['jax']}  "
           f"dtype {header['dtype']}  D={header['head_dim']}  B={header['batch']}  "
           f"blocks: {header['block_sizes']}", ""]
  table = []
  for r in rows:
    num = lambda key: f"{r[key]:.2f}" if key in r else "-"
    ratio = lambda other: (f"{r[f'fwd_vs_{other}']:.2f}/{r[f'fwd_bwd_vs_{other}']:.2f}"
                           if f"fwd_vs_{other}" in r else "-")
    compile_s = (f"{r['compile_fwd_s']:.1f}/{r['compile_fwd_bwd_s']:.1f}"
                 if "compile_fwd_s" in r else "-")
    table.append((str(r["seq"]), str(r["heads"]), r["impl"], num("fwd_ms"), num("fwd_tflops"),
                  num("fwd_bwd_ms"), num("fwd_bwd_tflops"), ratio("cudnn"), ratio("xla"),
                  compile_s, "" if r["status"] == "ok" else r["status"]))
  widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
  fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
  lines += [fmt(cols), fmt(["-" * w for w in widths])] + [fmt(t) for t in table]
  lines.append("vs: flash speed over theirs, fwd/fwd+bwd (>1: flash faster); compile: fwd/fwd+bwd;"
               " FLOPs: fwd 4*B*H*S^2*D, fwd+bwd 3.5x (FA2)")
  return "\n".join(lines)


def run(seqs, heads_list, head_dim, batch, dtype, block_sizes, reps, progress=None):
  """All rows for the shape grid, ratios added; progress(line) after each measurement."""
  grid = [(seq, heads, impl) for seq in seqs for heads in heads_list for impl in IMPLS]
  rows = []
  start = time.perf_counter()
  for i, (seq, heads, impl) in enumerate(grid):
    rows.append(measure(impl, batch, heads, seq, head_dim, dtype, block_sizes, reps))
    if progress:
      r = rows[-1]
      took = (f"fwd {r['fwd_ms']:.1f} ms, fwd+bwd {r['fwd_bwd_ms']:.1f} ms" if "fwd_ms" in r
              else r["status"])
      progress(f"[{i + 1}/{len(grid)}] seq {seq} heads {heads} {impl}: {took} "
               f"({time.perf_counter() - start:.0f} s so far)")
  add_ratios(rows)
  return rows


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
  block_sizes = parse_block_sizes(FLAGS.block_sizes)
  device = jax.devices()[0]
  if device.platform == "cpu":
    print("warning: on CPU the Pallas kernel runs in interpret mode (emulated, block by "
          "block): these times are not kernel performance, and the default Wan shapes take "
          "many minutes; --smoke (seconds) or --seq=1024 --heads=2 for a quick look",
          flush=True)
  header = dict(device=device.device_kind, platform=device.platform, jax=jax.__version__,
                dtype=dtype.name, head_dim=head_dim, batch=FLAGS.batch, reps=reps,
                block_sizes=block_sizes or f"tuning table {kernels.device_key()!r}",
                flops="fwd 4*B*H*Sq*Skv*D; fwd+bwd 3.5x fwd (FlashAttention-2)",
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
  rows = run(seqs, heads, head_dim, FLAGS.batch, dtype, block_sizes, reps,
             progress=lambda line: print(line, file=sys.stderr, flush=True))
  print(format_table(header, rows))
  with open(FLAGS.json, "w") as f:
    json.dump({"header": header, "rows": rows}, f, indent=1)
  print(f"wrote {FLAGS.json}")


def define_flags():
  """The command-line flags (defined only when run as a program, so the module imports cleanly)."""
  flags.DEFINE_list("seq", [str(s) for s in WAN_SEQS], "sequence lengths (Sq = Skv)")
  flags.DEFINE_list("heads", ["12", "40"], "head counts (Wan 1.3B: 12, 14B: 40)")
  flags.DEFINE_integer("head_dim", 128, "head dimension")
  flags.DEFINE_integer("batch", 1, "batch size")
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "input dtype")
  flags.DEFINE_list("block_sizes", [], "flash block sizes as name=value (default: tuning table)")
  flags.DEFINE_integer("reps", 10, "timed repetitions per measurement (the median is reported)")
  flags.DEFINE_string("json", "kernels_bench.json", "where to write the header and rows")
  flags.DEFINE_bool("smoke", False, "tiny float32 shapes, seconds on CPU (for tests)")


if __name__ == "__main__":
  define_flags()
  app.run(main)
