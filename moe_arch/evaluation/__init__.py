"""Evaluating a checkpoint outside a training run: next-token loss, perplexity and bits-per-byte on any data
source (``loss.py``), and an lm-evaluation-harness model adapter (``harness.py``)."""
