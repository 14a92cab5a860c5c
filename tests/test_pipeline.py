"""Generation against diffusers' WanPipeline / WanImageToVideoPipeline (golden files from
tools/golden/pipeline.py): the same tiny random roots, the same initial latents, float32."""

import os

import numpy as np
import pytest
from tests import pipeline_roots
from wan import pipeline, sharding

CASES = pipeline_roots.cases()


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
  directory = tmp_path_factory.mktemp("roots")
  loaded = {}

  def get(name):
    if name not in loaded:
      loaded[name] = pipeline.load(pipeline_roots.assemble(name, directory))
    return loaded[name]
  return get


def _generate(pipe, case, golden, **overrides):
  kwargs = dict(negative_prompt=case["negative_prompt"], height=case["height"],
                width=case["width"], num_frames=case["num_frames"],
                num_inference_steps=case["num_inference_steps"],
                guidance_scale=case["guidance_scale"],
                guidance_scale_2=case.get("guidance_scale_2"), sampler=case["sampler"],
                latents=golden["latents"].transpose(0, 2, 3, 4, 1),
                image=golden["image"] if "image" in golden else None,
                max_sequence_length=case["max_sequence_length"], progress=False)
  kwargs.update(overrides)
  return pipeline.generate(pipe, case["prompts"], **kwargs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_diffusers(pipes, name):
  case = CASES[name]
  golden = dict(np.load(os.path.join(pipeline_roots.PIPELINES, name, "golden.npz")))
  video = _generate(pipes(case["root"]), case, golden)
  want = golden["video"]
  assert video.shape == want.shape and video.dtype == np.float32
  rel = np.linalg.norm(video - want) / np.linalg.norm(want)
  assert rel <= 1e-4, f"{name}: relative error {rel:.2e}"


def test_each_setting_changes_the_video(pipes):
  """Guidance, the negative prompt and the second expert's guidance all reach the output (so the
  parity above could not pass with any of them ignored)."""
  case = CASES["a14b"]
  golden = dict(np.load(os.path.join(pipeline_roots.PIPELINES, "a14b", "golden.npz")))
  pipe = pipes("a14b")
  base = _generate(pipe, case, golden)
  for change in (dict(guidance_scale_2=1.5), dict(negative_prompt="a dog"),
                 dict(guidance_scale=1.0)):
    assert np.abs(_generate(pipe, case, golden, **change) - base).max() > 1e-3, change


def test_bad_requests_are_refused_before_sampling(pipes):
  case = CASES["t2v"]
  pipe = pipes("t2v")
  ok = dict(height=32, width=48, num_frames=9, num_inference_steps=2, progress=False)
  for change, words in ((dict(height=40), "height=40 must be a multiple of 16"),
                        (dict(num_frames=8), r"num_frames=8 must be 4k\+1"),
                        (dict(image=np.zeros((32, 48, 3), np.uint8)), "takes no image"),
                        (dict(guidance_scale_2=2.0), "two-expert"),
                        (dict(latents=np.zeros((1, 3, 4, 6, 4))), "latents have shape"),
                        (dict(sampler="ddim"), "ddim")):
    with pytest.raises(ValueError, match=words):
      pipeline.generate(pipe, case["prompts"], **dict(ok, **change))
  with pytest.raises(ValueError, match="image-to-video model: pass image="):
    pipeline.generate(pipes("i2v"), "a cat", height=32, width=32, num_frames=5, progress=False)


def test_clean_prompt_as_diffusers():
  assert pipeline.clean_prompt("  Waves  crash &amp;amp; the\nrocks \t") == "Waves crash & the rocks"


def test_sharded_like_training_gives_the_same_video(tmp_path):
  """fsdp 2 x context 2 x tensor 2 over the 8 devices: the transformer's weights, heads and
  video tokens split as in training, the same video as diffusers'."""
  case = CASES["t2v"]
  golden = dict(np.load(os.path.join(pipeline_roots.PIPELINES, "t2v", "golden.npz")))
  mesh = sharding.make_mesh(dict(data=1, fsdp=2, context=2, tensor=2),
                            dict(data=1, fsdp=1, context=1, tensor=1))
  pipe = pipeline.load(pipeline_roots.assemble("t2v", tmp_path), mesh=mesh)
  qkv = pipe.experts["high_noise"]["blocks"]["self_attn"]["q"]["kernel"]
  assert len(qkv.sharding.device_set) == 8 and not qkv.sharding.is_fully_replicated
  video = _generate(pipe, case, golden)
  rel = np.linalg.norm(video - golden["video"]) / np.linalg.norm(golden["video"])
  assert rel <= 1e-4, rel
