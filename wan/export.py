"""job=export: a training run's newest checkpoint as a diffusers model root.

    export_dir/transformer/    the trained transformer (transformer_2/ for the Wan 2.2 A14B
                               low-noise expert; the other expert is copied from the root, or
                               written too by an expert=both run)
    export_dir/...             every other entry of the base root (vae/, text_encoder/,
                               tokenizer/, scheduler/, image_encoder/, image_processor/,
                               model_index.json with its boundary_ratio), copied
    export_dir/lora/           a LoRA run's adapters in the three formats (wan/weights/lora.py;
                               expert=both: lora/high_noise/ and lora/low_noise/);
                               alone, or with export_merged beside the root above whose
                               transformer is the base with the adapters merged
The directory is written under a temporary name and renamed when complete. Diffusers'
`WanPipeline.from_pretrained(export_dir)` loads it (docs/lora.md says how this was checked).
"""

import jax

from wan import checkpoint, experts, fs, lora, params as params_lib, sharding, transformer
from wan.errors import MissingFile
from wan.numerics import DTYPES
from wan.plan import Export

_TRANSFORMERS = {"high_noise": "transformer", "low_noise": "transformer_2"}


def _restore(exp: Export, mesh):
  """(step, {expert: host tree}) of the run's newest checkpoint: the transformer, or a LoRA
  run's adapters, of each expert it trained."""
  dtype = DTYPES[exp.options.weights_dtype]
  decls = (lora.declarations(exp.model, exp.lora) if exp.lora
           else transformer.declarations(exp.model))
  one = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                     params_lib.abstract(decls, dtype), params_lib.shardings(decls, mesh))
  like = {name: one for name in experts.held(exp.expert)} if exp.expert == "both" else one
  found = checkpoint.latest_params(exp.checkpoint_dir, like)
  if found is None:
    raise MissingFile(f"{exp.checkpoint_dir} holds no training checkpoint to export; train "
                      "first, or set checkpoint_dir to the run's checkpoints")
  step, restored = found
  restored = jax.tree.map(sharding.to_host, restored)
  return step, restored if exp.expert == "both" else {exp.expert: restored}


def _base(exp: Export, expert: str):
  """A LoRA run's frozen base of one expert on the host, as training built it."""
  return experts.pretrained(exp.model, exp.weights, DTYPES[exp.options.weights_dtype], expert,
                            experts.init_key(exp.seed, exp.expert, expert),
                            experts.lora_loads(exp.lora_loads[1:], exp.expert, expert))


def run(exp: Export) -> str:
  """Writes the export (process 0; every process takes part in reading the checkpoint)."""
  mesh = sharding.make_mesh(exp.ici, exp.dcn)
  step, restored = _restore(exp, mesh)
  models = {}
  if exp.lora is None:
    models = restored
  elif exp.merged:
    models = {name: lora.merge(_base(exp, name), restored[name], exp.lora.scale)
              for name in restored}
  if jax.process_index() != 0:
    return exp.export_dir
  folders = {_TRANSFORMERS[name] for name in models}

  def fill(tmp):
    if models:
      for name in fs.listdir(exp.root) if exp.root else ():
        if name not in folders:  # the other A14B expert and every other component, as they are
          fs.copy(fs.join(exp.root, name), fs.join(tmp, name))
      for name, model in models.items():
        transformer.save(fs.join(tmp, _TRANSFORMERS[name]), exp.model, model)
    if exp.lora is not None:
      for name, adapters in restored.items():
        lora.save(fs.join(tmp, "lora", *((name,) if exp.expert == "both" else ())), adapters,
                  exp.lora.alpha)
  fs.write_dir(exp.export_dir, fill)
  print(f"exported step {step} to {exp.export_dir}", flush=True)
  return exp.export_dir
