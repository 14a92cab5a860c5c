"""The README's capacity table: every variant x resolution x remat policy x slice, each cell one
run of benchmarks/capacity.py (needs libtpu; no TPU).

  python benchmarks/capacity_table.py                 # compile what is missing, print the table
  python benchmarks/capacity_table.py --print_only    # the table of the measured cells

Results are appended to --results as they come (one JSON line per cell), so an interrupted
sweep continues where it stopped. Per-device batch 1 (global batch = the slice's devices), 81
frames, bf16, flash attention with the slice's tuning. It prints the markdown table: GiB per
device and whether it fits for each policy, and the cheapest policy that fits: what
remat_policy=AUTO picks (wan.remat.auto_ladder where the flash kernels run: NONE, then CUSTOM
saving the flash kernels' residuals, then FULL). MATMUL_WITHOUT_BATCH is measured beside them.
"""

import json
import os
import subprocess
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RESULTS = flags.DEFINE_string(
    "results", os.path.join(ROOT, "benchmarks", "results", "capacity.jsonl"),
    "JSON lines of measured cells (the README table's).")
_PRINT_ONLY = flags.DEFINE_bool("print_only", False, "Print the table; compile nothing.")
_SLICES = flags.DEFINE_list("slices", ["v5p-8", "v6e-8", "v5p-128"], "Slices (columns).")

VARIANTS = {
    "Wan 2.1 T2V 1.3B": ("configs/wan21_t2v.py:1.3b", ()),
    "Wan 2.1 T2V 14B": ("configs/wan21_t2v.py:14b", ()),
    "Wan 2.1 I2V 14B": ("configs/wan21_i2v.py:14b", ()),
    "Wan 2.2 A14B, one expert": ("configs/wan22_t2v.py:a14b", ()),
    "Wan 2.2 A14B, both experts": ("configs/wan22_t2v.py:a14b", ("--config.expert=both",)),
    "Wan 2.2 A14B, LoRA rank 32": ("configs/wan22_t2v.py:a14b",
                                   ("--config.enable_lora=True", "--config.lora_config.rank=32")),
    "Wan 2.2 TI2V 5B": ("configs/wan22_ti2v.py:5b", ()),
}
# (height, width) per resolution; TI2V 5B's 720p is its native 704 x 1280 (32-pixel multiples).
RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280)}
TI2V_720P = (704, 1280)
# Column label -> remat flags. AUTO's ladder (least recomputation first) is NONE, FLASH, FULL;
# MATMUL_WITHOUT_BATCH recomputes the attention kernels and needs more memory than FLASH.
POLICIES = {
    "NONE": ("--config.remat_policy=NONE",),
    "MATMUL": ("--config.remat_policy=MATMUL_WITHOUT_BATCH",),
    "FLASH": ("--config.remat_policy=CUSTOM", "--config.names_which_can_be_saved=flash_residuals"),
    "FULL": ("--config.remat_policy=FULL",),
}
LADDER = ("NONE", "FLASH", "FULL")
# Cell keys keep the policy names they were measured under.
_KEY_NAMES = {"MATMUL": "MATMUL_WITHOUT_BATCH", "FLASH": "CUSTOM flash_residuals"}


def _size(variant, resolution):
  if variant.endswith("TI2V 5B") and resolution == "720p":
    return TI2V_720P
  return RESOLUTIONS[resolution]


def _key(variant, resolution, policy, slice_name):
  return f"{variant} | {resolution} | {_KEY_NAMES.get(policy, policy)} | {slice_name}"


def _measure(variant, resolution, policy, slice_name) -> dict:
  config, extra = VARIANTS[variant]
  height, width = _size(variant, resolution)
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks/capacity.py"), f"--config={config}",
         f"--topology={slice_name}", f"--config.height={height}", f"--config.width={width}",
         "--config.num_frames=81", "--config.per_device_batch_size=1", *POLICIES[policy],
         "--top=0", *extra]
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  lines = r.stdout.strip().splitlines()
  if r.returncode or not lines:
    tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": tail[:300]}
  return json.loads(lines[-1])


def _load(path) -> dict:
  done = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        entry = json.loads(line)
        done[entry["key"]] = entry["result"]
  return done


def _cell(result) -> str:
  if result is None:  # not compiled: FULL does not fit, or NONE already does
    return "–"
  if "error" in result:
    return "error"
  if result.get("refused"):  # the compiler stops at the temporaries: a lower bound
    return f">{result['per_device_gib']:.0f} ✗"
  return f"{result['per_device_gib']:.1f}{'' if result['fits'] else ' ✗'}"


def table(done: dict, slices) -> str:
  """The markdown table of the measured cells."""
  head = ["variant", "res"] + [f"{s}: AUTO picks" for s in slices] + [
      f"{s}: GiB {' / '.join(POLICIES)}" for s in slices]
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for variant in VARIANTS:
    for resolution in RESOLUTIONS:
      cheapest, sizes = [], []
      for s in slices:
        results = {p: done.get(_key(variant, resolution, p, s)) for p in POLICIES}
        fitting = [p for p in LADDER if results[p] and results[p].get("fits")]
        if not fitting:
          cheapest.append("–" if results["FULL"] is None else "none fits")
        else:
          unknown = [p for p in LADDER[:LADDER.index(fitting[0])] if results[p] is None]
          cheapest.append(fitting[0] + (f" ({', '.join(unknown)} not compiled)" if unknown
                                        else ""))
        sizes.append(" / ".join(_cell(r) for r in results.values()))
      rows.append(f"| {variant} | {resolution} | " + " | ".join(cheapest + sizes) + " |")
  return "\n".join(rows)


def main(argv):
  del argv
  done = _load(_RESULTS.value)
  if not _PRINT_ONLY.value:
    for s in _SLICES.value:
      for variant in VARIANTS:
        for resolution in RESOLUTIONS:
          while (policy := _next(done, variant, resolution, s)) is not None:
            key = _key(variant, resolution, policy, s)
            done[key] = _measure(variant, resolution, policy, s)
            with open(_RESULTS.value, "a") as f:
              f.write(json.dumps({"key": key, "result": done[key]}) + "\n")
            print(key, "->", _cell(done[key]), flush=True)
  print(table(done, _SLICES.value))


def _next(done, variant, resolution, slice_name):
  """The next policy to compile (None: done), FULL first: memory grows as recomputation
  shrinks, so when FULL does not fit nothing else is compiled, and when NONE fits nothing
  between them is."""
  get = lambda p: done.get(_key(variant, resolution, p, slice_name))
  if get("FULL") is None:
    return "FULL"
  if not get("FULL").get("fits"):
    return None
  if get("NONE") is None:
    return "NONE"
  if get("NONE").get("fits"):
    return None
  return next((p for p in ("FLASH", "MATMUL") if get(p) is None), None)


if __name__ == "__main__":
  app.run(main)
