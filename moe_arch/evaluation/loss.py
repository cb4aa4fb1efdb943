"""``moe-arch eval``: next-token loss, perplexity and bits-per-byte of a checkpoint on any data source.

Windows are the in-training validation's (``eval_windows``: non-overlapping, every token after the first of a
stream predicted exactly once), batched the same way (``train.batch_size`` full windows, the short last window
alone), under the checkpoint's precision policy: on the validation split this reproduces the validation loss the
run logged. Bits-per-byte divides the summed loss (in bits) by the UTF-8 bytes the predicted tokens stand for,
which makes models with different tokenizers comparable; special tokens (EOS, BOS) count 0 bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moe_arch import checkpoint
from moe_arch.config import Config
from moe_arch.data.dataset import eval_batches, eval_windows, prepare_data
from moe_arch.data.tokenizer import TextTokenizer
from moe_arch.precision import resolve_policy
from moe_arch.utils import resolve_device


@dataclass
class LoadedCheckpoint:
    model: torch.nn.Module
    cfg: Config
    tokenizer: TextTokenizer
    step: int | None
    path: Path


def load_for_eval(path: str | Path, device: torch.device) -> LoadedCheckpoint:
    """One of our checkpoints, either format (a single file, one ``moe-arch export`` made, or a distributed
    folder), as a model in eval mode with its tokenizer; no optimizer is built."""
    model, w = checkpoint.load_model(path, device, "evaluated")
    model.eval()
    tok = TextTokenizer.from_checkpoint(w.meta, str(w.path))
    return LoadedCheckpoint(model, w.config, tok, w.meta.get("step"), w.path)


@torch.no_grad()
def evaluate_streams(
    model,
    streams,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    autocast,
    byte_lengths: np.ndarray | None = None,
    max_tokens: int = 0,
) -> dict:
    """Summed next-token loss over every window of every token stream (each stream on its own: no window
    crosses from one into the next). ``max_tokens`` > 0 stops after that many predicted tokens in all."""
    nll, n, n_bytes = 0.0, 0, 0
    left = max_tokens
    for tokens in streams:
        if max_tokens and left <= 0:
            break
        windows = list(eval_windows(tokens, seq_len, left if max_tokens else 0))
        for gb in eval_batches(windows, seq_len, batch_size):
            inp = torch.stack([w[0] for w in gb]).to(device)
            tgt = torch.stack([w[1] for w in gb]).to(device)
            with autocast:
                logits = model(inp, return_logits=True, mtp=False).logits
            nll += float(
                F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum").double()
            )
            n += tgt.numel()
            if byte_lengths is not None:
                n_bytes += int(byte_lengths[tgt.cpu().numpy()].sum())
        left = max_tokens - n
    out = {"tokens": n, "loss": nll / max(n, 1), "perplexity": math.exp(min(nll / max(n, 1), 700.0))}
    if byte_lengths is not None:
        out["bytes"] = n_bytes
        out["bits_per_byte"] = nll / math.log(2) / n_bytes if n_bytes else None
    return out


def run_eval(
    checkpoint: str,
    data_overrides: dict,
    split: str | None,
    max_tokens: int,
    device: str = "auto",
    seq_len: int = 0,
    batch_size: int = 0,
    log=print,
) -> dict:
    dev = resolve_device(device, "--device")
    ck = load_for_eval(checkpoint, dev)
    cfg = ck.cfg
    if seq_len > cfg.model.max_seq_len:
        # Positions beyond max_seq_len were never trained (and a huge window makes one attention matrix of
        # seq_len**2): the loss there would measure extrapolation, not the model.
        raise ValueError(
            f"--seq-len {seq_len}: must be <= model.max_seq_len={cfg.model.max_seq_len} of the "
            "checkpoint (0: its train.seq_len)"
        )
    data = cfg.to_dict()["data"]
    other_source = "source" in data_overrides and data_overrides["source"] != data["source"]
    if other_source:  # a different source: its own text field / HF options, unless given
        for k in ("hf_config", "split", "streaming", "max_documents", "max_tokens"):
            data[k] = type(data[k])()
    data.update(data_overrides)
    data_cfg = Config.from_dict({**cfg.to_dict(), "data": data}, "eval data").data
    split = split or ("all" if other_source else "val")
    td = prepare_data(data_cfg, cfg.model.vocab_size, log=log, tokenizer=ck.tokenizer)
    if td.tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError("the checkpoint's tokenizer is larger than its model")
    policy = resolve_policy(cfg.train.precision, dev)
    T = seq_len or cfg.train.seq_len
    B = batch_size or cfg.train.batch_size
    res = evaluate_streams(
        ck.model, td.split(split), T, B, dev, policy.autocast(dev), ck.tokenizer.byte_lengths(), max_tokens
    )
    return {
        "checkpoint": str(ck.path),
        "step": ck.step,
        "data": td.meta.get("describe", data_cfg.source),
        "split": split,
        "seq_len": T,
        **res,
    }
