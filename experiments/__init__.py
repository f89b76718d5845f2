"""Training runs and benchmarks for adarank: data, a LLaMA-style decoder, the pre-training loop.

Run modules with ``python -m experiments.<name>``; see ``experiments/pretrain.py``.
"""
