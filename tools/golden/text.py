"""Golden files for the UMT5 text encoder and its tokenizer, from transformers.

Writes under tests/golden/:

    umt5_tiny/          a tiny random `UMT5EncoderModel` (save_pretrained, safetensors, float32)
    umt5_tiny.npz       token_ids (B, L) int32, mask (B, L) bool,
                        hidden (B, L, D) float32 last_hidden_state with rows past each mask
                        zeroed, as Wan's pipelines do;
                        buckets (1201,) int32 transformers' bucket of relative positions
                        -600..600
    spiece_tiny/        spiece.model (a unigram sentencepiece model trained here on a small
                        corpus) and tokenizer.json (the transformers tokenizer built from it)
    spiece_tiny.npz     texts, and for each max_length in MAX_LENGTHS: ids_<n>, mask_<n> from
                        transformers' T5Tokenizer(padding="max_length", truncation=True)

Every weight, norm scales included, is randomised so that a mixed-up tensor shows in the output.
"""

import json
import os

import numpy as np
import sentencepiece
import torch
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

CONFIG = dict(vocab_size=300, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
              relative_attention_num_buckets=32, relative_attention_max_distance=128,
              layer_norm_epsilon=1e-6, dense_act_fn="gelu_new", feed_forward_proj="gated-gelu",
              is_encoder_decoder=False, use_cache=False)
# Long enough (with max distance 128 > 40 but > max_exact) that both the exact and the log
# buckets are used in both directions.
SEQ_LEN = 40
LENGTHS = (40, 23, 1)
BUCKET_RANGE = 600

CORPUS = [
    "A cat walks slowly across a sunny wooden floor.",
    "The camera pans over a misty mountain valley at dawn.",
    "Two children play with a red ball in the park.",
    "A chef chops fresh vegetables on a marble counter.",
    "Waves crash against black rocks under a stormy sky.",
    "Ein Hund läuft durch den Schnee im Winterwald.",
    "Un oiseau chante sur une branche près de la rivière.",
    "City lights flicker as traffic moves through the rainy night.",
    "A dancer spins gracefully on a dimly lit stage.",
    "Steam rises from a cup of coffee beside an open book.",
]
TEXTS = [
    "A cat walks across the floor.",
    "",
    "The camera pans over a rainy city at night, lights flicker, "
    "children play, a dancer spins, and waves crash against the rocks.",
    "Ein Hund   läuft, un oiseau chante!  Ünïcödé ①② <extra_id_0>",
]
MAX_LENGTHS = (16, 64)


def _tokenizer(out_dir):
  spm_dir = os.path.join(out_dir, "spiece_tiny")
  os.makedirs(spm_dir, exist_ok=True)
  corpus_path = os.path.join(spm_dir, "corpus.txt")
  with open(corpus_path, "w") as f:
    f.write("\n".join(CORPUS * 4) + "\n")
  # T5's id layout: pad 0, eos 1, unk 2, then pieces.
  sentencepiece.SentencePieceTrainer.train(
      input=corpus_path, model_prefix=os.path.join(spm_dir, "spiece"), vocab_size=100,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
      num_threads=1, seed_sentencepiece_size=10000, minloglevel=2)
  os.remove(corpus_path)
  os.remove(os.path.join(spm_dir, "spiece.vocab"))

  # Converted from spiece.model by transformers itself (as for google/umt5-xxl's slow files).
  tok = T5Tokenizer.from_pretrained(spm_dir)
  tok.backend_tokenizer.save(os.path.join(spm_dir, "tokenizer.json"))
  record = {"texts": np.array(TEXTS)}
  for n in MAX_LENGTHS:
    enc = tok(TEXTS, padding="max_length", truncation=True, max_length=n,
              add_special_tokens=True, return_attention_mask=True, return_tensors="np")
    record[f"ids_{n}"] = enc["input_ids"].astype(np.int32)
    record[f"mask_{n}"] = enc["attention_mask"].astype(bool)
  assert record[f"ids_{MAX_LENGTHS[0]}"].max() > 3, "the tokenizer must have loaded the model"
  assert (~record[f"mask_{MAX_LENGTHS[0]}"]).sum() > 0, "some text must be padded"
  assert record[f"mask_{MAX_LENGTHS[0]}"].all(axis=1).any(), "some text must be truncated"
  np.savez(os.path.join(out_dir, "spiece_tiny.npz"), **record)
  print("tokenizer ids", record[f"ids_{MAX_LENGTHS[0]}"].tolist())


def _encoder(out_dir):
  torch.manual_seed(0)
  model = UMT5EncoderModel(UMT5Config(**CONFIG)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("layer_norm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif "relative_attention_bias" in name:
        p.copy_(torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / np.sqrt(p.shape[-1]))
  model.save_pretrained(os.path.join(out_dir, "umt5_tiny"))

  gen = torch.Generator().manual_seed(1)
  ids = torch.randint(3, CONFIG["vocab_size"], (len(LENGTHS), SEQ_LEN), generator=gen)
  mask = torch.arange(SEQ_LEN)[None, :] < torch.tensor(LENGTHS)[:, None]
  ids = torch.where(mask, ids, torch.zeros_like(ids))  # pad id 0 past the end, as a tokenizer would
  with torch.no_grad():
    hidden = model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
  # Wan's pipeline: keep each prompt's first `length` rows, zero-pad to the full length.
  hidden = hidden * mask[..., None]
  # transformers' bucket of every relative position a 512-token prompt can have (the buckets
  # and max distance are umt5-xxl's, so this checks the real model's table too).
  relative = torch.arange(-BUCKET_RANGE, BUCKET_RANGE + 1)
  attention = model.encoder.block[0].layer[0].SelfAttention
  buckets = attention._relative_position_bucket(relative).numpy().astype(np.int32)
  np.savez(os.path.join(out_dir, "umt5_tiny.npz"), token_ids=ids.numpy().astype(np.int32),
           mask=mask.numpy(), hidden=hidden.numpy().astype(np.float32), buckets=buckets)
  print("umt5 hidden", hidden.shape, float(hidden.abs().max()))


def make(out_dir):
  _tokenizer(out_dir)
  _encoder(out_dir)
