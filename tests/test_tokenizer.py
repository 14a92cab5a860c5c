"""UMT5 tokenizer vs transformers' T5Tokenizer (ids and masks from tools/golden/text.py)."""

import json
import os
import shutil

import numpy as np
import pytest

from tests.conftest import GOLDEN_DIR
from wan import tokenizer as tokenizer_lib
from wan.errors import CheckpointError

SPM_DIR = os.path.join(GOLDEN_DIR, "spiece_tiny")


@pytest.fixture(scope="module")
def golden():
  return np.load(os.path.join(GOLDEN_DIR, "spiece_tiny.npz"))


@pytest.mark.parametrize("source", ["spiece.model", "tokenizer.json"])
@pytest.mark.parametrize("max_length", [16, 64])
def test_ids_and_mask_match_transformers(golden, source, max_length):
  tok = tokenizer_lib.load(os.path.join(SPM_DIR, source))
  ids, mask = tok([str(t) for t in golden["texts"]], max_length)
  assert ids.dtype == np.int32 and mask.dtype == bool
  np.testing.assert_array_equal(ids, golden[f"ids_{max_length}"])
  np.testing.assert_array_equal(mask, golden[f"mask_{max_length}"])


def test_truncation_keeps_eos_and_padding_uses_pad_id(golden):
  tok = tokenizer_lib.load(SPM_DIR)
  ids, mask = tok(["a " * 100, ""], 8)
  assert mask[0].all() and ids[0, -1] == tok.eos_id
  assert ids[1, 0] == tok.eos_id and (ids[1, 1:] == tok.pad_id).all() and mask[1].sum() == 1


def test_directory_without_tokenizer_files_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor spiece.model"):
    tokenizer_lib.load(str(tmp_path))


def test_spiece_sentinel_count_follows_tokenizer_config(tmp_path):
  shutil.copy(os.path.join(SPM_DIR, "spiece.model"), tmp_path / "spiece.model")
  default = tokenizer_lib.load(str(tmp_path))
  assert default.backend.get_vocab_size() == 100 + tokenizer_lib.EXTRA_IDS
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 0}))
  none = tokenizer_lib.load(str(tmp_path))
  assert none.backend.get_vocab_size() == 100 and none.backend.token_to_id("<extra_id_0>") is None


def test_model_root_with_tokenizer_folder(tmp_path, golden):
  shutil.copytree(SPM_DIR, tmp_path / "tokenizer")
  ids, _ = tokenizer_lib.load(str(tmp_path))([str(t) for t in golden["texts"]], 16)
  np.testing.assert_array_equal(ids, golden["ids_16"])


def test_invalid_tokenizer_config_is_an_error_naming_the_file(tmp_path):
  shutil.copy(os.path.join(SPM_DIR, "spiece.model"), tmp_path / "spiece.model")
  (tmp_path / "tokenizer_config.json").write_text("{'extra_ids': 0}")
  with pytest.raises(CheckpointError, match="tokenizer_config.json is not valid JSON"):
    tokenizer_lib.load(str(tmp_path))
