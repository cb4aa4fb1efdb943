"""Hugging Face interchange: ``moe-arch export CKPT --hf DIR`` writes a folder that
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads (``export.py``), and
``moe-arch train --init-from DIR`` starts training from one. The modeling code in such a folder is this package's
own model code, copied with its imports made relative: one definition of the model."""
