"""Every foreign-format read and write: safetensors files, model roots, and one name map per model.

    safetensors.py   the one safetensors reader / writer (bf16, memory-mapped, local or bucket)
    roots.py         component folders of a model root, A14B experts, the JSON files
    convert.py       checkpoint tensors <-> our parameter trees, and the one checker
    transformer.py vae.py text_encoder.py image_encoder.py tokenizer.py   the per-model names

Model modules import this package; it imports no model module (it reads declaration trees of
`wan.params.Param`, configs by their fields, and dicts).
"""
