"""The data half of the plan: reads the config's data fields (wan/plan.py calls it; nothing else
reads them) and decides what a job reads and writes.

  job=prepare                  sources -> encoders -> a cache (Preparation)
  dataset_type=tfrecord/grain  a cache -> the training stream
  dataset_type=tf/hf           sources -> encoders on the fly -> the training stream (or, with
                               dataset_save_location, a cache made once, then read)

Sources are read and every file probed here (cheap: headers only), so a run knows its buckets,
its steps per epoch and its bad files before it builds a model.
"""

import dataclasses
import math

from wan import families, fs, vae
from wan.data import clips as clips_lib
from wan.data import packing, records, sources
from wan.data.encode import BUILTIN
from wan.errors import ConfigError, MissingFile
from wan.weights import roots

RECORD_FORMATS = {"grain": "arrayrecord"}
# Conditioning kinds whose samples hold the same arrays: TI2V's clean first frame is the first
# latent frame itself, so its T2V and I2V runs read one cache.
_STORED = {"first_frame": "none"}  # dataset_type -> cache format (default tfrecord)


@dataclasses.dataclass(frozen=True)
class Encoding:
  """The encoders that turn clips into training samples, and what their samples look like."""
  family: str
  vae: str  # a model root or VAE directory, or BUILTIN
  text_encoder: str  # a UMT5 directory, or BUILTIN
  tokenizer: str  # its tokenizer directory, or BUILTIN
  image_encoder: str | None  # Wan 2.1 I2V: a model root or CLIP directory, or BUILTIN
  latent_space: str  # wan.vae.PRESETS name of the family's latent space
  conditioning: str  # wan/conditioning.py kind
  text_len: int  # max_sequence_length: captions are cut to it
  text_dim: int
  image_dim: int | None
  fps: float  # the model's training frame rate
  step: int  # bucket step in pixels: VAE spatial factor x patch

  def identity(self) -> dict:
    """What a cache must share with a run that reads it."""
    def ident(path):
      if path in (None, BUILTIN):
        return path
      return roots.fingerprint(path)
    return {"family": self.family, "latent_space": self.latent_space,
            "conditioning": self.conditioning, "text_dim": self.text_dim,
            "image_dim": self.image_dim, "fps": self.fps,
            "vae": ident(self.vae), "text_encoder": ident(self.text_encoder),
            "image_encoder": ident(self.image_encoder)}


@dataclasses.dataclass(frozen=True)
class Preparation:
  """A job=prepare run: which sources go into which cache."""
  encoding: Encoding
  splits: tuple  # (name, (sources.DataSet, ...), cache directory): "train", and "eval"
  record_format: str  # tfrecord | arrayrecord
  records_per_shard: int  # 0: one shard per bucket and process
  settings: dict  # prepared_settings(c), kept in the manifest

  def summary(self) -> str:
    lines = [f"prepare {self.encoding.family} samples ({self.record_format}, encoders: "
             f"{self.encoding.vae})"]
    for name, datasets, out in self.splits:
      count = sum(len(d.items) for d in datasets)
      lines.append(f"  {name}: {count} files from {', '.join(d.source for d in datasets)} "
                   f"-> {out}")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Packing:
  """Row sizes of packed batches (pack_sequences=True), fixed so that the step compiles once.

  A row holds whole clips of any buckets, at most as many as clips of the smallest bucket fit
  its tokens; captions and CLIP states get room for that many, so only tokens ever decide a
  row (the epoch's rows follow from token counts alone, wan/data/packing.py `epoch_rows`).
  """
  seq_len: int  # video tokens per row: the largest bucket's (plan.seq_len)
  max_segments: int  # clips per row at most: seq_len // the smallest bucket's tokens
  caption_len: int  # caption tokens one clip takes: its own length, at most this (padding
  #                   masked, mask_padding_tokens=True), or always this, zero-padded and
  #                   attended as in an unpacked batch (mask_padding_tokens=False)
  text_len: int  # caption tokens per row: max_segments x caption_len
  image_len: int  # CLIP tokens per row: max_segments x 257 (Wan 2.1 I2V), else 0


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """The training stream."""
  kind: str  # dataset_type
  num_samples: int | None = None  # synthetic: samples in one epoch (None: infinite)
  cache: str = ""  # tfrecord / grain: the cache directory read
  manifest: dict | None = dataclasses.field(default=None, compare=False, hash=False)
  encoding: Encoding | None = None  # tf / hf: the encoders run on the fly
  clips: tuple = ()  # tf / hf: the clips (wan/data/clips.py) encoded on the fly
  buckets: tuple = ()  # latent shapes (F', H', W', C) of the stream's batches
  bucket_samples: tuple = ()  # samples per epoch (repeats included) of each bucket
  steps_per_epoch: int | None = None  # packed and shuffled: epoch 0's (epochs differ a little)
  shuffle: bool = True
  pack: bool = False
  packing: Packing | None = None  # the row sizes when pack (set by the plan, `packed`)
  prepared_with: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)


def _fail(message):
  raise ConfigError(message)


def reads_sources(c) -> bool:
  return c.job == "prepare" or c.dataset_type in ("tf", "hf")


def _source_settings(c) -> sources.Settings:
  height, width = (c.resolution, c.resolution) if c.resolution > 0 else (c.height, c.width)
  try:
    return sources.Settings(
        height=height, width=width, enable_bucket=c.enable_bucket,
        bucket_no_upscale=c.bucket_no_upscale, target_frames=(int(c.num_frames),),
        frame_extraction=c.frame_extraction, frame_stride=int(c.frame_stride),
        frame_sample=int(c.frame_sample), max_frames=int(c.max_frames),
        source_fps=float(c.source_fps), num_repeats=int(c.num_repeats),
        caption_extension=c.caption_extension)
  except ValueError as e:
    _fail(str(e))


def _datasets(c, directory: str, field: str) -> tuple:
  """The data sets a job reads: an HF data set, a musubi TOML, or a folder / CSV / JSONL."""
  defaults = _source_settings(c)
  if c.dataset_type == "hf" and field == "train_data_dir":
    if not c.dataset_name:
      _fail("dataset_type=hf needs dataset_name: a Hugging Face data set on local disk")
    return (sources.read_hf(fs.absolute(c.dataset_name), c.train_split, c.image_column,
                            c.caption_column, defaults),)
  if field == "train_data_dir" and c.dataset_config:
    if directory:
      _fail("set train_data_dir or dataset_config (a musubi-tuner TOML), not both")
    directory = c.dataset_config
  if not directory:
    _fail(f"job=prepare and dataset_type=tf read clips: set {field} to a folder of clips with "
          "captions, a metadata.csv or a .jsonl (or dataset_config to a musubi-tuner TOML)")
  path = fs.absolute(directory)
  if not fs.exists(path):
    raise MissingFile(f"{field}: {path} does not exist")
  datasets = tuple(sources.read(path, defaults, image_column=c.image_column,
                                caption_column=c.caption_column))
  if not any(d.items for d in datasets):
    _fail(f"{field}: {path} holds no videos or images ({', '.join(sources.VIDEO_EXTENSIONS)}, "
          f"{', '.join(sources.IMAGE_EXTENSIONS)})")
  return datasets


def encoders(c, family: families.Family, model) -> Encoding:
  """The VAE, text encoder (and CLIP) of the run: the root's, or the tiny configs' built-in ones."""
  root = fs.absolute(c.pretrained_model_name_or_path)
  latent = vae.PRESETS[family.vae]
  if root:
    vae_dir = roots.resolve(root, "vae")
    text_dir = roots.resolve(root, "text_encoder")
    tokenizer_dir = roots.resolve(root, "tokenizer")
    image_dir = roots.resolve(root, "image_encoder") if family.image_tokens else None
    _check_encoders(root, family, model, latent, vae_dir, text_dir)
  elif c.model_preset.startswith("tiny-"):
    vae_dir = text_dir = tokenizer_dir = BUILTIN
    image_dir = BUILTIN if family.image_tokens else None
  else:
    _fail("encoding clips needs the VAE and text encoder: set pretrained_model_name_or_path to "
          "a diffusers model root (vae/, text_encoder/, tokenizer/"
          f"{', image_encoder/' if family.image_tokens else ''}); the tiny configs use "
          "built-in tiny encoders")
  step = latent.scale_factor_spatial * model.patch_size[1]
  if c.resolution % step:
    _fail(f"resolution={c.resolution} must be a multiple of {step} (VAE "
          f"{latent.scale_factor_spatial}x times patch {model.patch_size[1]}); use "
          f"{c.resolution // step * step or step} or {(c.resolution // step + 1) * step}")
  return Encoding(
      family=family.name, vae=vae_dir, text_encoder=text_dir, tokenizer=tokenizer_dir,
      image_encoder=image_dir,
      latent_space=family.vae, conditioning=family.conditioning(c.model_type),
      text_len=int(c.max_sequence_length), text_dim=model.text_dim, image_dim=model.image_dim,
      fps=family.fps, step=step)


def _check_encoders(root, family, model, latent, vae_dir, text_dir):
  """The root's VAE must make the family's latents and its text encoder the model's widths."""
  made = vae.Config.from_diffusers(roots.read_json(fs.join(vae_dir, "config.json")))
  got = (made.z_dim, made.scale_factor_spatial, made.scale_factor_temporal)
  want = (latent.z_dim, latent.scale_factor_spatial, latent.scale_factor_temporal)
  if got != want:
    _fail(f"{vae_dir}: a VAE of {got[0]} channels, {got[1]}x / {got[2]}x compression; "
          f"{family.name} trains on {want[0]} channels, {want[1]}x / {want[2]}x (the "
          f"{family.vae} VAE): use that family's model root")
  width = roots.read_json(fs.join(text_dir, "config.json")).get("d_model")
  if width != model.text_dim:
    _fail(f"{text_dir}: a text encoder of width {width}; the transformer takes text_dim="
          f"{model.text_dim}: use the model root of this transformer ({root})")


def preparation(c, family, model) -> Preparation:
  """The plan of a job=prepare run."""
  if not c.tfrecords_dir:
    _fail("job=prepare writes its cache to tfrecords_dir: set it (e.g. "
          "--config.tfrecords_dir=cache/)")
  if c.no_records_per_shard < 0:
    _fail(f"no_records_per_shard={c.no_records_per_shard} must be >= 0 (0: one shard per "
          "bucket and process)")
  encoding = encoders(c, family, model)
  out = fs.absolute(c.tfrecords_dir)
  splits = [("train", _datasets(c, c.train_data_dir, "train_data_dir"), out)]
  if c.eval_data_dir:
    splits.append(("eval", _datasets(c, c.eval_data_dir, "eval_data_dir"), fs.join(out, "eval")))
  for _, _, path in splits:
    records.check_writable(path, encoding.identity())
  return Preparation(encoding=encoding, splits=tuple(splits),
                     record_format=RECORD_FORMATS.get(c.dataset_type, "tfrecord"),
                     records_per_shard=int(c.no_records_per_shard),
                     settings=prepared_settings(c))


def prepared_settings(c) -> dict:
  """The fields that shaped a cache's samples (a run reading it must agree on the sizes)."""
  return {f: c[f] for f in ("height", "width", "num_frames", "resolution", "enable_bucket",
                            "bucket_no_upscale", "frame_extraction", "frame_stride",
                            "frame_sample", "max_frames", "source_fps", "num_repeats",
                            "max_sequence_length", "caption_extension")}


def check_cache(c, manifest: dict, path: str, family, model):
  """A cache (train_data_dir or eval_data_dir) that this run can read: the same latent space,
  conditioning and widths, made by the root's encoders, with the run's sizes."""
  encoding_like = {"latent_space": family.vae, "conditioning": family.conditioning(c.model_type),
                   "text_dim": model.text_dim, "image_dim": model.image_dim}
  root = fs.absolute(c.pretrained_model_name_or_path)
  if root:
    for key in ("vae", "text_encoder") + (("image_encoder",) if family.image_tokens else ()):
      found = roots.find(root, key)
      if found is not None:
        encoding_like[key] = roots.fingerprint(found)
  made = manifest["identity"]
  want_format = RECORD_FORMATS.get(c.dataset_type, "tfrecord")
  if manifest["record_format"] != want_format:
    other = "grain" if manifest["record_format"] == "arrayrecord" else "tfrecord"
    _fail(f"{path} holds {manifest['record_format']} records; read it with "
          f"dataset_type={other} (or prepare again with dataset_type={c.dataset_type})")
  for key, what in (("latent_space", "VAE latent space"), ("conditioning", "conditioning"),
                    ("text_dim", "text-state width"), ("image_dim", "CLIP state width")):
    stored = lambda v: _STORED.get(v, v) if key == "conditioning" else v
    if stored(made[key]) != stored(encoding_like[key]):
      _fail(f"{path} was prepared for {made['family']} ({what} {made[key]}); this run trains "
            f"{family.name} ({what} {encoding_like[key]}): prepare it again with this run's "
            "config")
  for key in ("vae", "text_encoder", "image_encoder"):
    if encoding_like.get(key) is not None and made[key] != encoding_like[key]:
      _fail(f"{path} was prepared with another {key.replace('_', ' ')} ({made[key]}) than "
            f"pretrained_model_name_or_path's ({encoding_like[key]}): prepare it again with "
            "this model")
  prepared = manifest["settings"]
  for field in ("height", "width", "num_frames"):
    if prepared.get(field) is not None and prepared[field] != c[field]:
      _fail(f"{field}={c[field]} but {path} was prepared with {field}={prepared[field]}: "
            f"{field} describes the clips at preparation; set it to {prepared[field]} or "
            "prepare again")
  longest = manifest["max_text_length"]
  if longest > c.max_sequence_length:
    _fail(f"{path} holds captions of up to {longest} tokens, more than max_sequence_length="
          f"{c.max_sequence_length}; set max_sequence_length >= {longest}")


def stream(c, family, model, global_batch: int) -> DataSettings:
  """The training stream of a real data set."""
  if not c.load_tfrecord_cached:
    _fail("load_tfrecord_cached=False: caches always hold encoded latents and text states; "
          "to encode clips while training use dataset_type=tf (or hf)")
  shuffle, pack = bool(c.enable_data_shuffling), bool(c.pack_sequences)
  if c.dataset_type in ("tfrecord", "grain"):
    if not c.train_data_dir:
      _fail(f"dataset_type={c.dataset_type} reads a cache that job=prepare wrote: set "
            "train_data_dir to it")
    path = fs.absolute(c.train_data_dir)
    manifest = records.read_manifest(path)
    check_cache(c, manifest, path, family, model)
    groups = records.bucket_counts(manifest)
    return DataSettings(kind=c.dataset_type, cache=path, manifest=manifest,
                        buckets=tuple(tuple(s) for s in groups),
                        bucket_samples=tuple(groups.values()),
                        steps_per_epoch=steps_per_epoch(groups.values(), global_batch),
                        shuffle=shuffle, pack=pack)
  encoding = encoders(c, family, model)
  datasets = _datasets(c, c.train_data_dir, "train_data_dir")
  found, skipped = clips_lib.index(datasets, encoding.fps, encoding.step)
  if not found:
    _fail(f"no usable clips in train_data_dir: {len(skipped)} skipped, e.g. "
          f"{skipped[0][0]}: {skipped[0][1]}" if skipped else "no clips in train_data_dir")
  save = fs.absolute(c.dataset_save_location)
  if save:
    # Encoded once into a cache there (wan/data/__init__.py), then read like job=prepare's.
    records.check_writable(save, encoding.identity())
    if fs.exists(fs.join(save, records.MANIFEST)):
      held = {r["key"] for s in records.read_manifest(save)["shards"] for r in s["records"]}
      if held != set(saved_keys(found)):
        _fail(f"dataset_save_location={save} holds a cache of other clips than these "
              f"({len(held)} vs {len(found)}); choose another location, or delete it to "
              "encode again")
  groups = clips_lib.bucket_counts(found, vae.PRESETS[family.vae])
  return DataSettings(kind=c.dataset_type, encoding=encoding, clips=tuple(found),
                      cache=save,
                      buckets=tuple(groups), bucket_samples=tuple(groups.values()),
                      manifest={"skipped": skipped},
                      steps_per_epoch=steps_per_epoch(groups.values(), global_batch),
                      shuffle=shuffle, pack=pack, prepared_with=prepared_settings(c))


def saved_keys(clips) -> list[str]:
  """The record keys of on-the-fly clips in a dataset_save_location cache."""
  return [f"{i}/{clip.key}" for i, clip in enumerate(clips)]


def steps_per_epoch(counts, global_batch: int) -> int:
  """Batches of one bucket each: a bucket's last batch is filled from its own samples."""
  return sum(-(-n // global_batch) for n in counts)


def packed(data: DataSettings, patch_size, seq_len: int, text_len: int, image_len: int,
           mask_padding: bool, global_batch: int, seed: int) -> DataSettings:
  """`data` with the row sizes of pack_sequences=True and its packed steps per epoch.

  seq_len: tokens per row (the largest bucket's); text_len: max_sequence_length; image_len:
  CLIP tokens per clip (0 without). A cache knows its longest caption: with masked padding a
  clip's caption takes only its own tokens, so the rows make room for that many, not text_len.
  """
  tokens = lambda s: math.prod(n // k for n, k in zip(s[:3], patch_size))
  max_segments = seq_len // min(tokens(s) for s in data.buckets)
  caption_len = text_len
  if mask_padding and data.kind in ("tfrecord", "grain"):
    caption_len = min(text_len, max(1, data.manifest["max_text_length"]))
  rows = Packing(seq_len=seq_len, max_segments=max_segments, caption_len=caption_len,
                 text_len=max_segments * caption_len, image_len=max_segments * image_len)
  data = dataclasses.replace(data, packing=rows)
  return dataclasses.replace(data, steps_per_epoch=packed_steps(data, patch_size, global_batch,
                                                                seed, 0))


def packed_steps(data: DataSettings, patch_size, global_batch: int, seed: int,
                 epoch: int) -> int:
  """Batches of a packed epoch: its rows (first fit in the epoch's order) by global_batch."""
  rows = packing.epoch_rows(dict(zip(data.buckets, data.bucket_samples)), patch_size,
                            data.packing.seq_len, seed, epoch, data.shuffle)
  return -(-len(rows) // global_batch)
