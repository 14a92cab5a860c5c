"""UMT5 encoder checkpoints (transformers' UMT5EncoderModel / UMT5ForConditionalGeneration names).

PyTorch names of our parameters (`wan.text_encoder.declarations`):
  token_embed (vocab, D)                 shared.weight, or encoder.embed_tokens.weight
  layers/ (one tensor per layer i)       encoder.block.i.layer.0.* (attention), .layer.1.* (FFN)
    attn_norm/scale (D,)                  layer.0.layer_norm.weight
    q, k, v/kernel (D, H, d_kv)           layer.0.SelfAttention.{q,k,v}.weight (H*d_kv, D)
    o/kernel (H, d_kv, D)                 layer.0.SelfAttention.o.weight (D, H*d_kv)
    rel_bias (num_buckets, H)             layer.0.SelfAttention.relative_attention_bias.weight
    ffn_norm/scale (D,)                   layer.1.layer_norm.weight
    wi_0, wi_1 | wi/kernel (D, d_ff); wo/kernel (d_ff, D)   layer.1.DenseReluDense.*.weight
  final_norm/scale (D,)                  encoder.final_layer_norm.weight
Decoder and LM-head tensors of an encoder-decoder checkpoint are ignored.
"""

import dataclasses
import re

from wan import fs
from wan.weights import convert, roots, safetensors

STEM = "model"
_EMBEDS = ("shared.weight", "encoder.embed_tokens.weight")  # tied: either may be saved
_LAYER = {"attn_norm": "layer.0.layer_norm", "ffn_norm": "layer.1.layer_norm",
          "rel_bias": "layer.0.SelfAttention.relative_attention_bias.weight",
          **{n: f"layer.0.SelfAttention.{n}" for n in ("q", "k", "v", "o")},
          **{n: f"layer.1.DenseReluDense.{n}" for n in ("wi_0", "wi_1", "wi", "wo")}}
_LEAF = {"kernel": "weight", "scale": "weight"}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A UMT5 checkpoint as read: its directory, config.json and tensors (PyTorch names)."""
  directory: str
  config: dict
  tensors: dict


def read(path) -> Checkpoint:
  """A transformers UMT5 directory (config.json + model.safetensors or its shards), or a model
  root holding text_encoder/."""
  directory = roots.resolve(path, "text_encoder")
  config = roots.read_json(fs.join(directory, "config.json"))
  return Checkpoint(directory, config, safetensors.read_dir(directory, STEM))


def _embed_name(tensor_names) -> str:
  return next((n for n in _EMBEDS if n in tensor_names), _EMBEDS[0])


def _layout(path: str, leaf: str | None, shape: tuple) -> convert.Layout:
  if leaf == "kernel":  # the attention output o/kernel (H, d_kv, D) contracts two axes
    return convert.linear(shape, in_dims=2 if path.startswith("o/") else 1)
  return convert.Layout(shape)


def names(decls, tensor_names=()) -> dict[str, convert.Tensor]:
  """{our path: checkpoint tensor}; `tensor_names` picks which tied embedding name is used."""
  top = {"token_embed": _embed_name(tensor_names), "final_norm": "encoder.final_layer_norm"}
  layer = {k: f"encoder.block.{{layer}}.{v}" for k, v in _LAYER.items()}
  return convert.names_by_tables(decls, top, layer, _LEAF, _layout)


def to_params(tensors: dict, decls, dtype, source: str = "checkpoint"):
  """Our parameter tree (host NumPy, `dtype` unless a declaration pins one)."""
  unused_embed = [n for n in _EMBEDS if n != _embed_name(tensors)]
  ignore = (r"decoder\.", r"lm_head\.", *(re.escape(n) + "$" for n in unused_embed))
  return convert.to_params(tensors, decls, names(decls, tensors), dtype, source=source,
                           what="UMT5 encoder", ignore=ignore)
