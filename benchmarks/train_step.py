"""Train-step benchmark for any config on whatever devices exist (CPU, GPU, TPU). Not a test.

  python benchmarks/train_step.py --config=configs/wan21_t2v.py:1.3b --config.ici_fsdp=8 \
      --config.hardware=gpu --steps=10 --warmup=3

Prints compile time, step time, tokens/s, TFLOP/s per device (3 x forward FLOPs, remat
recomputation not counted), MFU where the device's peak is known, and peak device memory.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file[:variant].")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax
  from wan import data, metrics, plan as plan_lib, train

  c = _CONFIG.value
  plan = plan_lib.make(c, plan_lib.Devices.of(jax.devices()))
  t0 = time.perf_counter()
  run = train.setup(plan)  # remat_policy=AUTO compiles the step (each policy it tries) here
  setup_s = time.perf_counter() - t0
  plan = run.plan
  state = train.init_state(run)
  it = data.make(plan, run.mesh)
  with jax.set_mesh(run.mesh):
    batch = next(it)
    t0 = time.perf_counter()
    compiled = run.compiled_step or train.make_step(run).lower(state, batch).compile()
    compile_s = setup_s if run.compiled_step else time.perf_counter() - t0
    for _ in range(_WARMUP.value):
      state, stats = compiled(state, batch)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(_STEPS.value):
      state, stats = compiled(state, batch)
    jax.block_until_ready((state, stats))
    step_s = (time.perf_counter() - t0) / _STEPS.value

  devices = run.mesh.devices.size
  tflops = metrics.step_flops(plan) / step_s / devices / 1e12
  peak = metrics.peak_tflops(jax.devices()[0])
  mem = [d.memory_stats() or {} for d in jax.local_devices()]
  peak_mem = max((m.get("peak_bytes_in_use", 0) for m in mem), default=0)
  print(f"devices          {devices} x {jax.devices()[0].device_kind} (jax {jax.__version__})")
  print(f"mesh             {dict(run.mesh.shape)}")
  print(f"model            {plan.weights or c.model_preset} ({plan.family.name})"
        f", {plan.seq_len} tokens/sample, global batch {plan.global_batch}")
  print(f"remat            {plan.options.remat_policy}")
  print(f"compile          {compile_s:.1f} s"
        + (" (remat_policy=AUTO: every policy it tried)" if run.compiled_step else ""))
  print(f"step time        {step_s * 1e3:.1f} ms")
  print(f"tokens/s         {plan.seq_len * plan.global_batch / step_s:.1f}")
  print(f"TFLOP/s/device   {tflops:.3f}")
  print(f"MFU              {'n/a (unknown peak)' if peak is None else f'{100 * tflops / peak:.1f}%'}")
  print(f"peak memory      {'n/a' if not peak_mem else f'{peak_mem / 2**30:.2f} GiB'}")
  print(f"final loss       {float(stats['loss']):.5f}")


if __name__ == "__main__":
  app.run(main)
