"""Model families: what a Wan model is beyond its network.

The transformer's `Config` says what the network is; the family says which latent space it works
in (the VAE), how it is conditioned for image-to-video, whether it is one of two experts split
at a noise level, and which `model_name` it belongs to. The plan decides the family once, from
`model_preset`, checks a checkpoint's architecture against it and derives everything else
(latent shapes, conditioning, sigma ranges) from it, never from channel counts.
"""

import dataclasses

from wan import conditioning


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  model_name: str  # the config's model_name: wan2.1 | wan2.2
  vae: str  # wan.vae.PRESETS name of its latent space: wan2.1 (16 ch, 8x) | wan2.2 (48 ch, 16x)
  model_types: tuple[str, ...]  # T2V / I2V runs it supports
  i2v: str  # conditioning kind of an I2V run (wan/conditioning.py); "none" for T2V-only models
  image_tokens: int = 0  # CLIP states per sample (Wan 2.1 I2V: 257 of ViT-H/14 at 224 px)
  boundary: float | None = None  # two experts: sigma where the high-noise one hands over
  fps: float = 16.0  # the frame rate it was trained at (clips are resampled to it)

  @property
  def experts(self) -> bool:
    return self.boundary is not None

  def conditioning(self, model_type: str) -> str:
    return "none" if model_type == "T2V" else self.i2v


FAMILIES = {f.name: f for f in (
    Family("wan2.1-t2v", "wan2.1", "wan2.1", ("T2V",), "none"),
    Family("wan2.1-i2v", "wan2.1", "wan2.1", ("I2V",), "concat", image_tokens=257),
    # Wan 2.2 A14B works in the Wan 2.1 VAE's latent space; boundaries as released
    # (model_index.json boundary_ratio: 0.875 T2V, 0.9 I2V).
    Family("wan2.2-t2v-a14b", "wan2.2", "wan2.1", ("T2V",), "none", boundary=0.875),
    Family("wan2.2-i2v-a14b", "wan2.2", "wan2.1", ("I2V",), "concat", boundary=0.9),
    Family("wan2.2-ti2v-5b", "wan2.2", "wan2.2", ("T2V", "I2V"), "first_frame", fps=24.0),
)}

# wan.transformer.PRESETS name -> family.
PRESET_FAMILIES = {
    "wan2.1-t2v-1.3b": "wan2.1-t2v", "wan2.1-t2v-14b": "wan2.1-t2v",
    "wan2.1-i2v-14b": "wan2.1-i2v", "wan2.2-t2v-a14b": "wan2.2-t2v-a14b",
    "wan2.2-i2v-a14b": "wan2.2-i2v-a14b", "wan2.2-ti2v-5b": "wan2.2-ti2v-5b",
    "tiny-t2v": "wan2.1-t2v", "tiny-i2v": "wan2.1-i2v", "tiny-t2v-a14b": "wan2.2-t2v-a14b",
    "tiny-i2v-a14b": "wan2.2-i2v-a14b", "tiny-ti2v": "wan2.2-ti2v-5b",
}


def architecture_problems(family: Family, cfg, latent_channels: int) -> list[str]:
  """What in a transformer architecture `cfg` does not fit `family` (empty when it fits).

  latent_channels: the family's VAE latent width (16 or 48).
  """
  want_in = conditioning.input_channels(family.i2v, latent_channels)
  problems = []
  if (cfg.in_channels, cfg.out_channels) != (want_in, latent_channels):
    problems.append(f"it takes {cfg.in_channels} input and gives {cfg.out_channels} output "
                    f"channels; the {family.name} family has {want_in} and {latent_channels}")
  if (cfg.image_dim is not None) != (family.image_tokens > 0):
    problems.append("it has a CLIP image embedder, which the family does not use"
                    if cfg.image_dim is not None else
                    "it has no CLIP image embedder (image_dim), which the family needs")
  if family.i2v == "first_frame" and cfg.patch_size[0] != 1:
    problems.append(f"first-frame conditioning needs a temporal patch size of 1, not "
                    f"{cfg.patch_size[0]}")
  return problems
