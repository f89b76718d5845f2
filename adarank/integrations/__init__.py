"""adarank where users already train: Hugging Face ``Trainer`` (``adarank.integrations.hf``) and
Lightning (``adarank.integrations.lightning``).

Each submodule imports its framework; this package imports neither, so ``import adarank`` never
pulls in transformers or lightning. Install them with ``pip install "adarank[integrations]"``.
"""
