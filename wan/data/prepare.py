"""job=prepare: data sets to a cache of encoded samples (wan/data/records.py).

Each process takes every P-th file, probes and cuts it into clips (wan/data/clips.py), encodes
its clips bucket by bucket on its own devices (wan/data/encode.py) and writes its own shards;
then process 0 merges the per-process parts into manifest.json. Files that cannot be used are
skipped and listed with their reason, in the summary and the manifest. A killed job keeps every
finished shard (progress-p{P}.jsonl lists them) and a rerun encodes only what is missing.
"""

import collections
import dataclasses
import json
import time

import jax
import numpy as np

from wan import fs
from wan.data import clips as clips_lib
from wan.data import encode as encode_lib
from wan.data import records
from wan.errors import BadSample


def _barrier(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def _log(message: str):
  if jax.process_index() == 0:
    print(message, flush=True)


def share(datasets, process: int, count: int):
  """This process's part of the data sets: every count-th file, in the sources' order (so every
  process agrees without talking); the data sets' own problems are process 0's to report."""
  out, i = [], 0
  for ds in datasets:
    items = []
    for item in ds.items:
      if i % count == process:
        items.append(item)
      i += 1
    out.append(dataclasses.replace(ds, items=tuple(items),
                                   problems=ds.problems if process == 0 else ()))
  return out


def keyed_clips(datasets, encoding):
  """([(key, clip)], skipped) of data sets; keys are unique across data sets."""
  keyed, skipped = [], []
  for d, ds in enumerate(datasets):
    found, bad = clips_lib.index([ds], encoding.fps, encoding.step)
    keyed.extend((f"{d}/{c.key}", c) for c in found)
    skipped.extend(bad)
  return keyed, skipped


def _progress(path: str, header: dict) -> list[dict]:
  """Finished shards of an earlier, killed run of the same job (and the header written)."""
  if fs.exists(path):
    with fs.open_file(path, "r") as f:
      lines = [json.loads(line) for line in f if line.strip()]
    if lines and lines[0] == header:
      return lines[1:]
  with fs.open_file(path, "w") as f:
    f.write(json.dumps(header) + "\n")
  return []


def write(enc, keyed, skipped, out: str, record_format: str, records_per_shard: int,
          about: dict) -> dict | None:
  """Encodes this process's clips into shards under `out`; process 0 returns the merged
  manifest (other processes None). `about`: the sources and settings the manifest records."""
  process = jax.process_index()
  fs.makedirs(out)
  header = {"identity": enc.encoding.identity(), "about": about, "format": record_format}
  progress_path = fs.join(out, f"progress-p{process:03d}.jsonl")
  done = _progress(progress_path, header)
  for name in fs.listdir(out):  # a killed run's unfinished shard
    if name.endswith(".tmp") and f"-p{process:03d}-" in name:
      fs.remove(fs.join(out, name))
  finished = {r["key"] for shard in done for r in shard["records"]}
  vae_cfg = enc.vae_cfg
  by_bucket = collections.defaultdict(list)
  for key, clip in keyed:
    if key not in finished:
      by_bucket[records.bucket_name(clip.latent_shape(vae_cfg))].append((key, clip))
  numbers = collections.Counter(s["bucket"] for s in done)
  devices = enc.mesh.devices.size
  skipped = list(skipped)
  for bucket, todo in sorted(by_bucket.items()):
    writer = None
    for start in range(0, len(todo), devices):
      chunk, pixels = [], []
      for key, clip in todo[start:start + devices]:
        try:
          pixels.append(clips_lib.read_pixels(clip))
          chunk.append((key, clip))
        except BadSample as e:
          skipped.append((e.path, e.reason))
      if not chunk:
        continue
      samples = encode_lib.encode(enc, np.stack(pixels), [c.item.caption for _, c in chunk])
      for (key, clip), sample in zip(chunk, samples):
        if writer is None:
          writer = records.ShardWriter(fs.join(out, records.shard_name(
              bucket, process, numbers[bucket], record_format)), record_format)
        writer.write(records.to_bytes(key, clip.item.caption, sample), key, bucket,
                     clip.repeats, len(sample["text"]))
        if records_per_shard and len(writer) >= records_per_shard:
          done.append(_finish(writer, bucket, progress_path))
          numbers[bucket] += 1
          writer = None
    if writer is not None:
      done.append(_finish(writer, bucket, progress_path))
      numbers[bucket] += 1
  shapes = {records.bucket_name(c.latent_shape(vae_cfg)): c.latent_shape(vae_cfg)
            for _, c in keyed}
  part = {"shards": done, "skipped": skipped, "shapes": shapes}
  records.write_json(fs.join(out, f"part-p{process:03d}.json"), part)
  _barrier(f"prepare {out}")
  manifest = None
  if process == 0:
    manifest = _merge(out, header, jax.process_count())
  _barrier(f"prepared {out}")
  return manifest


def _finish(writer, bucket, progress_path) -> dict:
  shard = dict(writer.close(), bucket=bucket)
  with fs.open_file(progress_path, "a") as f:  # after the rename: listed means complete
    f.write(json.dumps(shard) + "\n")
  return shard


def _merge(out: str, header: dict, processes: int) -> dict:
  shards, skipped, shapes = [], [], {}
  for p in range(processes):
    with fs.open_file(fs.join(out, f"part-p{p:03d}.json"), "r") as f:
      part = json.load(f)
    shards += part["shards"]
    skipped += [tuple(s) for s in part["skipped"]]
    shapes.update(part["shapes"])
  buckets = {}
  for shard in shards:
    b = buckets.setdefault(shard["bucket"], {"latent_shape": list(shapes[shard["bucket"]]),
                                             "records": 0, "samples": 0})
    b["records"] += len(shard["records"])
    b["samples"] += sum(r["repeats"] for r in shard["records"])
  lengths = [r["text_length"] for s in shards for r in s["records"]]
  manifest = {"format": records.FORMAT, "record_format": header["format"],
              "identity": header["identity"], "settings": header["about"]["settings"],
              "sources": header["about"]["sources"], "buckets": dict(sorted(buckets.items())),
              "max_text_length": max(lengths, default=0),
              "shards": sorted(shards, key=lambda s: s["file"]),
              "skipped": [list(s) for s in sorted(set(skipped))]}
  records.write_json(fs.join(out, records.MANIFEST), manifest)
  return manifest


def describe(manifest: dict, out: str) -> str:
  """The job's summary: samples per bucket, shards, and every skipped file with its reason."""
  total = sum(b["records"] for b in manifest["buckets"].values())
  lines = [f"{out}: {total} samples in {len(manifest['buckets'])} buckets, "
           f"{len(manifest['shards'])} shards"]
  lines += [f"  bucket {name} (latents {'x'.join(map(str, b['latent_shape']))}): "
            f"{b['records']} samples" for name, b in manifest["buckets"].items()]
  if manifest["skipped"]:
    lines.append(f"  skipped {len(manifest['skipped'])} files:")
    lines += [f"    {path}: {reason}" for path, reason in manifest["skipped"]]
  return "\n".join(lines)


def about(datasets, settings: dict) -> dict:
  return {"sources": [d.source for d in datasets], "settings": settings}


def run(prep):
  """Runs a Preparation (wan.plan_data); returns {split: manifest} on process 0."""
  start = time.perf_counter()
  enc = encode_lib.load(prep.encoding)
  out = {}
  for name, datasets, path in prep.splits:
    if fs.exists(fs.join(path, records.MANIFEST)):
      manifest = records.read_manifest(path)
      _log(f"{name}: {path} is already complete")
    else:
      mine = share(datasets, jax.process_index(), jax.process_count())
      keyed, skipped = keyed_clips(mine, prep.encoding)
      manifest = write(enc, keyed, skipped, path, prep.record_format, prep.records_per_shard,
                       about(datasets, prep.settings))
    if manifest is not None:
      _log(f"{name}: " + describe(manifest, path))
    out[name] = manifest
  _log(f"prepared in {time.perf_counter() - start:.1f} s")
  return out
