"""Models: editors and teacher (``editors``), tokenizer and text encoder (``text``), autoencoders,
tiny configs, LoRA helpers (``lora``), hub/local loaders (``loaders``) and the VLM judge.

Import the submodule you need (``from nb_edit.models.editors import UNetEditor``); this package
file imports nothing, so ``import nb_edit.models`` stays cheap.
"""
