"""CLIP vision checkpoints (transformers' CLIPVisionModel / CLIPModel names).

transformers 4 saved CLIPVisionModel under `vision_model.` (as Wan's released image_encoder
is); transformers 5 saves the vision tower's names bare; both are read. PyTorch names of our
parameters (`wan.image_encoder.declarations`), under that prefix:
  patch_embed/kernel (p, p, 3, D)    embeddings.patch_embedding.weight (D, 3, p, p)
  class_embed (D,)                   embeddings.class_embedding
  pos_embed (T, D)                   embeddings.position_embedding.weight
  pre_norm/{scale, bias}             pre_layrnorm.{weight, bias}
  layers/ (one tensor per layer i)   encoder.layers.i.*
    ln1, ln2                          layer_norm1, layer_norm2
    q, k, v/kernel (D, H, hd), bias (H, hd)   self_attn.{q,k,v}_proj (D, D), (D,)
    o/kernel (H, hd, D), bias (D,)    self_attn.out_proj
    fc1, fc2                          mlp.fc1, mlp.fc2
The post layer norm, projections and text tower are never used by Wan and are ignored.
"""

import dataclasses
import math
import re

from wan import fs
from wan.weights import convert, roots, safetensors

STEM = "model"
PREFIX = "vision_model."
_TOP = {"patch_embed": "embeddings.patch_embedding", "class_embed": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding.weight", "pre_norm": "pre_layrnorm"}
_LAYER = {"ln1": "layer_norm1", "ln2": "layer_norm2", "o": "self_attn.out_proj",
          **{n: f"self_attn.{n}_proj" for n in ("q", "k", "v")},
          **{n: f"mlp.{n}" for n in ("fc1", "fc2")}}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}
# Unused by Wan's penultimate features: in the vision tower (under the prefix), and in a
# CLIPVisionModelWithProjection / CLIPModel beside it.
_UNUSED_IN_TOWER = ("post_layernorm.", "embeddings.position_ids")
_UNUSED_BESIDE = ("visual_projection.", "text_model.", "text_projection.", "logit_scale")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A CLIP vision checkpoint as read: its directory, config.json, the image processor's
  preprocessor_config.json (None when there is none) and its tensors (PyTorch names)."""
  directory: str
  config: dict
  processor: dict | None
  tensors: dict


def read(path) -> Checkpoint:
  """A transformers CLIP directory (config.json + model.safetensors or its shards), or a model
  root with image_encoder/ (and image_processor/)."""
  directory = roots.resolve(path, "image_encoder")
  config = roots.read_json(fs.join(directory, "config.json"))
  processor_dir = roots.find(path, "image_processor") or roots.find(directory, "image_processor")
  processor = None
  if processor_dir is not None:
    processor = roots.read_json(fs.join(processor_dir, "preprocessor_config.json"))
  return Checkpoint(directory, config, processor, safetensors.read_dir(directory, STEM))


def _prefix(tensor_names) -> str:
  return PREFIX if any(n.startswith(PREFIX) for n in tensor_names) else ""


def _layout(path: str, leaf: str | None, shape: tuple) -> convert.Layout:
  if path == "patch_embed/kernel":
    return convert.conv(shape)
  if leaf == "kernel":  # the attention output o/kernel (H, hd, D) contracts two axes
    return convert.linear(shape, in_dims=2 if path.startswith("o/") else 1)
  if leaf == "bias":  # (D,) in PyTorch; ours are split into heads for q, k, v: (H, hd)
    return convert.Layout((math.prod(shape),))
  return convert.Layout(shape)


def names(decls, tensor_names=()) -> dict[str, convert.Tensor]:
  """{our path: checkpoint tensor}; the prefix follows `tensor_names`."""
  prefix = _prefix(tensor_names)
  top = {k: prefix + v for k, v in _TOP.items()}
  layer = {k: f"{prefix}encoder.layers.{{layer}}.{v}" for k, v in _LAYER.items()}
  return convert.names_by_tables(decls, top, layer, _LEAF, _layout)


def to_params(tensors: dict, decls, dtype, source: str = "checkpoint"):
  """Our parameter tree (host NumPy, `dtype` unless a declaration pins one)."""
  ignore = tuple(re.escape(n) for n in (*(_prefix(tensors) + n for n in _UNUSED_IN_TOWER),
                                         *_UNUSED_BESIDE))
  return convert.to_params(tensors, decls, names(decls, tensors), dtype, source=source,
                           what="CLIP vision encoder", ignore=ignore)
