"""The UMT5 tokenizer: prompts to fixed-length token ids and masks, as Wan's pipelines make them.

Built from a `tokenizer.json` (the `tokenizers` format, as google/umt5-xxl and Wan's diffusers
repos ship it) or a sentencepiece `spiece.model`, both read by wan/weights/tokenizer.py. A
`spiece.model` is turned into the same `tokenizers` pipeline that transformers' T5Tokenizer
builds from it: a unigram model over the sentencepiece pieces followed by `extra_ids` sentinel
pieces, sentencepiece's precompiled normalizer, whitespace split + metaspace pre-tokenizer,
and `</s>` appended to every sequence. Then, as
`tokenizer(texts, padding="max_length", truncation=True, max_length=n)` does, sequences are cut
to n - 1 pieces plus `</s>` and padded with the pad id to n.
"""

import dataclasses

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from wan.weights import tokenizer as tokenizer_files

MAX_LENGTH = 512  # Wan's max_sequence_length for the text encoder
EXTRA_IDS = 100  # T5/UMT5 sentinel tokens <extra_id_0..99> after the sentencepiece pieces
EOS, PAD = "</s>", "<pad>"


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """Call as `tokenizer(texts, max_length) -> (token_ids, mask)`.

  token_ids: (B, max_length) int32, pad id past each text's end; mask: (B, max_length) bool.
  """
  backend: tokenizers.Tokenizer
  pad_id: int
  eos_id: int

  def __call__(self, texts, max_length: int = MAX_LENGTH):
    if isinstance(texts, str):
      texts = [texts]
    if max_length < 1:
      raise ValueError(f"max_length must be at least 1 (room for </s>), got {max_length}")
    token_ids = np.full((len(texts), max_length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), max_length), bool)
    for row, encoding in enumerate(self.backend.encode_batch(list(texts),
                                                             add_special_tokens=False)):
      # Truncate the text's pieces, not the </s>: the last kept position is always </s>.
      ids = encoding.ids[:max_length - 1] + [self.eos_id]
      token_ids[row, :len(ids)] = ids
      mask[row, :len(ids)] = True
    return token_ids, mask


def load(path: str) -> Tokenizer:
  """Tokenizer from a directory holding tokenizer.json or spiece.model, either file itself, or a
  model root with tokenizer/ (local or bucket paths; the files are read by wan/weights).

  tokenizer.json is preferred when both are present (it is what transformers loads then). For a
  spiece.model, the number of sentinels is tokenizer_config.json's extra_ids when the directory
  has one (as transformers reads it), else T5's 100.
  """
  files = tokenizer_files.read(path)
  if files.kind == "tokenizer.json":
    backend = tokenizers.Tokenizer.from_str(files.data.decode("utf-8"))
  else:
    extra_ids = EXTRA_IDS if files.extra_ids is None else files.extra_ids
    backend = _from_sentencepiece(files.data, files.path, extra_ids)
  ids = {token: backend.token_to_id(token) for token in (PAD, EOS)}
  missing = [token for token, i in ids.items() if i is None]
  if missing:
    raise ValueError(f"{files.path}: tokenizer has no {missing} token; not a T5/UMT5 tokenizer")
  return Tokenizer(backend, pad_id=ids[PAD], eos_id=ids[EOS])


def _from_sentencepiece(proto_bytes: bytes, path: str,
                        extra_ids: int = EXTRA_IDS) -> tokenizers.Tokenizer:
  """The `tokenizers` pipeline of a sentencepiece model (its serialized proto, read from `path`)."""
  # The proto is read with sentencepiece's own bindings (no protobuf schema of our own).
  from sentencepiece import sentencepiece_model_pb2
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(proto_bytes)
  if proto.trainer_spec.model_type != 1:  # 1 = UNIGRAM; T5/UMT5 models are unigram
    raise ValueError(f"{path}: sentencepiece model type {proto.trainer_spec.model_type} is not "
                     "unigram; T5/UMT5 tokenizers are unigram models")
  vocab = [(piece.piece, piece.score) for piece in proto.pieces]
  sentinels = [f"<extra_id_{i}>" for i in range(extra_ids - 1, -1, -1)]
  vocab += [(token, 0.0) for token in sentinels]
  backend = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=proto.trainer_spec.unk_id,
                                                byte_fallback=proto.trainer_spec.byte_fallback))
  charsmap = proto.normalizer_spec.precompiled_charsmap
  if charsmap:
    backend.normalizer = normalizers.Precompiled(charsmap)
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.WhitespaceSplit(),
      pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
  backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
  # Control pieces (<pad>, </s>) and <unk> are matched whole in the text, before normalisation,
  # like the sentinels; sentencepiece piece types: 2 = UNKNOWN, 3 = CONTROL.
  special = [piece.piece for piece in proto.pieces if piece.type in (2, 3)] + sentinels
  backend.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True)
                              for t in special])
  backend.post_processor = processors.TemplateProcessing(
      single=["$A", EOS], special_tokens=[(EOS, backend.token_to_id(EOS))])
  return backend
