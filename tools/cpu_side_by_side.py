"""Our train step against diffusers + PyTorch eager on this CPU, side by side, in one go.

  python tools/cpu_side_by_side.py --torch_python=/tmp/golden-venv/bin/python [--steps=5]

The performance issue's configuration: a 32M-parameter Wan DiT (8 layers, 8 heads x 64, FFN
1536, text dim 256, freq dim 256), latents 16 x 5 x 24 x 32 (960 video tokens), 64 text tokens,
batch 1, float32, AdamW. One random model is written as a diffusers transformer directory and
both sides load it: this process times `transformer.forward` (jitted), its forward + backward,
and the full `train.make_step` of a run on those weights; then `--torch_python` (a venv with
torch and diffusers, the golden venv of tools/make_golden.py; never a project dependency) runs
this file with `--torch_side` and times `WanTransformer3DModel` eagerly with
`torch.optim.AdamW`, on `--threads` threads. Prints both sides, the step-time ratio and each
side's (forward + backward) / forward; the last line is one JSON object.

The two sides run one after the other, never at once; run it on an idle machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = dict(num_attention_heads=8, attention_head_dim=64, ffn_dim=1536, text_dim=256,
            freq_dim=256, num_layers=8, in_channels=16, out_channels=16)
LATENTS = (5, 24, 32, 16)  # frames, height, width, channels (channels-last)
TEXT_LEN = 64


def _timed(result: dict, name: str, fn, steps: int, warmup: int = 2):
  """result[name + "_s"]: the median of `steps` timed calls of fn; result[name + "_min_s"]:
  the fastest (on a shared machine the least disturbed)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  result[name + "_s"], result[name + "_min_s"] = statistics.median(times), min(times)


# ----------------------------------------------------------------------------------------------
# PyTorch side (runs in the torch venv; imports neither jax nor the project)


def torch_side(model_dir: str, steps: int, threads: int) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  from diffusers import WanTransformer3DModel  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = WanTransformer3DModel.from_pretrained(model_dir, torch_dtype=torch.float32)
  f, h, w, ch = LATENTS
  latents = torch.randn(1, ch, f, h, w)
  target = torch.randn(1, ch, f, h, w)
  text = torch.randn(1, TEXT_LEN, ARCH["text_dim"])
  t = torch.tensor([500.0])
  opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)

  def forward():
    with torch.no_grad():
      model(latents, t, text, return_dict=False)

  def forward_backward():
    out = model(latents, t, text, return_dict=False)[0]
    torch.nn.functional.mse_loss(out, target).backward()

  def step():
    opt.zero_grad(set_to_none=True)
    forward_backward()
    opt.step()

  result = {"torch": torch.__version__, "threads": threads}
  for name, fn in (("forward", forward), ("forward_backward", forward_backward), ("step", step)):
    _timed(result, name, fn, steps)
  return result


# ----------------------------------------------------------------------------------------------
# JAX side


def _write_model(directory: str):
  import jax  # pylint: disable=import-outside-toplevel
  from wan import transformer  # pylint: disable=import-outside-toplevel
  cfg = transformer.Config(**ARCH)
  transformer.save(directory, cfg, jax.device_get(transformer.init(cfg, jax.random.key(0))))
  return cfg


def _run_config(model_dir: str, out_dir: str):
  from configs import wan21_t2v  # pylint: disable=import-outside-toplevel
  c = wan21_t2v.get_config("tiny")
  f, h, w, _ = LATENTS
  c.update(dict(transformer_pretrained_model_name_or_path=model_dir, output_dir=out_dir,
                height=8 * h, width=8 * w, num_frames=4 * (f - 1) + 1,
                max_sequence_length=TEXT_LEN, global_batch_size=1, ici_fsdp=1,
                mask_padding_tokens=False, learning_rate=1e-5, write_metrics=False))
  return c


def jax_side(model_dir: str, out_dir: str, steps: int) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from wan import data, numerics, params as params_lib, plan as plan_lib, train, transformer  # pylint: disable=import-outside-toplevel

  plan = plan_lib.make(_run_config(model_dir, out_dir), plan_lib.Devices.of(jax.devices()[:1]))
  run = train.setup(plan, jax.devices()[:1])
  state = train.init_state(run)
  batch = next(data.make(plan, run.mesh))
  cfg, opts = run.plan.model, run.plan.options  # remat_policy=AUTO resolved
  params = state["params"]
  f, h, w, ch = LATENTS
  keys = jax.random.split(jax.random.key(1), 3)
  latents = jax.random.normal(keys[0], (1, f, h, w, ch))
  target = jax.random.normal(keys[1], (1, f, h, w, ch))
  text = jax.random.normal(keys[2], (1, TEXT_LEN, cfg.text_dim))
  t = jnp.array([500.0])

  xla = numerics.compiler_options("cpu")  # as the train step compiles
  forward = jax.jit(lambda p: transformer.forward(p, cfg, latents, t, text, options=opts),
                    compiler_options=xla)
  grads = jax.jit(jax.value_and_grad(lambda p: jnp.mean(jnp.square(
      transformer.forward(p, cfg, latents, t, text, options=opts) - target))),
                  compiler_options=xla)
  step = train.make_step(run)
  with jax.set_mesh(run.mesh):
    compiled = step.lower(state, batch).compile()
    holder = {"state": state}

    def one_step():
      holder["state"], stats = compiled(holder["state"], batch)
      jax.block_until_ready(stats)

    result = {"jax": jax.__version__}
    _timed(result, "forward", lambda: jax.block_until_ready(forward(params)), steps)
    _timed(result, "forward_backward", lambda: jax.block_until_ready(grads(params)), steps)
    _timed(result, "step", one_step, steps)
  result["parameters"] = params_lib.count(transformer.declarations(cfg))
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--torch_python", help="python of a venv with torch and diffusers")
  parser.add_argument("--steps", type=int, default=5, help="timed repetitions (median, min)")
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch threads")
  parser.add_argument("--torch_side", metavar="MODEL_DIR", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.torch_side:
    print(json.dumps(torch_side(args.torch_side, args.steps, args.threads)))
    return
  if not args.torch_python:
    sys.exit("--torch_python=PATH: the python of a venv with torch and diffusers (the recipe is "
             "in tools/make_golden.py's docstring)")
  sys.path.insert(0, ROOT)
  with tempfile.TemporaryDirectory() as tmp:
    model_dir = os.path.join(tmp, "transformer")
    _write_model(model_dir)
    ours = jax_side(model_dir, os.path.join(tmp, "run"), args.steps)
    done = subprocess.run([args.torch_python, os.path.abspath(__file__), "--torch_side",
                           model_dir, f"--steps={args.steps}", f"--threads={args.threads}"],
                          capture_output=True, text=True, check=False)
    if done.returncode:
      sys.exit(f"the PyTorch side failed:\n{done.stderr[-3000:]}")
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
  print(f"{ours['parameters'] / 1e6:.1f}M parameters, latents {LATENTS} (960 tokens), "
        f"{TEXT_LEN} text tokens, batch 1, float32")
  print(f"{'median (min)':24}{'ours (jax ' + ours['jax'] + ')':>24}"
        f"{'diffusers (torch ' + theirs['torch'] + ')':>32}")
  for name, key in (("forward", "forward"), ("forward + backward", "forward_backward"),
                    ("train step", "step")):
    cell = lambda side, key=key: f"{side[key + '_s'] * 1e3:.0f} ({side[key + '_min_s'] * 1e3:.0f}) ms"
    print(f"{name:24}{cell(ours):>24}{cell(theirs):>32}")
  summary = {"ours": ours, "diffusers": theirs}
  for stat in ("", "_min"):
    summary["step_speedup" + stat] = theirs[f"step{stat}_s"] / ours[f"step{stat}_s"]
    for side, name in ((ours, "ours"), (theirs, "theirs")):
      summary[f"{name}_fwd_bwd_over_fwd{stat}"] = (side[f"forward_backward{stat}_s"]
                                                   / side[f"forward{stat}_s"])
  print(f"train step: ours is {summary['step_speedup']:.2f}x as fast (min: "
        f"{summary['step_speedup_min']:.2f}x); (forward + backward) / forward: ours "
        f"{summary['ours_fwd_bwd_over_fwd']:.2f}, theirs {summary['theirs_fwd_bwd_over_fwd']:.2f}")
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
