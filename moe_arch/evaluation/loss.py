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

from moe_arch.config import Config
from moe_arch.data.dataset import eval_batches, eval_windows
from moe_arch.data.tokenizer import TextTokenizer


@dataclass
class LoadedCheckpoint:
    model: torch.nn.Module
    cfg: Config
    tokenizer: TextTokenizer
    step: int | None
    path: Path


def load_for_eval(path: str | Path, device: torch.device) -> LoadedCheckpoint:
    """A single-file checkpoint (ours, or one ``moe-arch export`` made from a distributed one) or a distributed
    checkpoint folder, as a model in eval mode with its tokenizer."""
    from moe_arch.parallel.dcp import is_dcp_dir, load_dcp_run
    from moe_arch.training.checkpoint import CheckpointError, load_checkpoint

    path = Path(path)
    if is_dcp_dir(path):
        model, cfg, _, state = load_dcp_run(path, "evaluated")
        model.to(device)
    else:
        state = load_checkpoint(path)
        if "config" not in state or "model" not in state:
            raise CheckpointError(f"{path}: not a moe_arch checkpoint (no 'config'/'model'); `moe-arch diagnose` "
                                  "reads other stacks' checkpoints")
        cfg = Config.from_dict(state["config"], f"{path} (config)")
        model = checked_model(path, cfg, state["model"], device)
    model.eval()
    tok = TextTokenizer.from_checkpoint(state, str(path))
    return LoadedCheckpoint(model, cfg, tok, state.get("step"), path)


def checked_model(path: str | Path, cfg: Config, saved, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model of ``cfg`` holding the saved weights, once they are known to fit it: every state dict that
    ``eval``, ``generate``, ``lm-eval`` and ``export`` load comes through here, so a missing, extra or misshapen
    tensor is one line naming it (as on ``--resume``), not load_state_dict's multi-line RuntimeError."""
    from moe_arch.model.transformer import HybridLM, materialize
    from moe_arch.training.checkpoint import CheckpointError, check_model_state

    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: 'model' is a {type(saved).__name__}, not a state dict")
    with torch.device("meta"):  # shapes only
        expected = HybridLM(cfg.model).state_dict()
    try:
        check_model_state(path, saved, expected)
    except CheckpointError as e:
        raise CheckpointError(f"{e}: the weights do not fit the model the checkpoint's own config describes "
                              f"(edited, or written by other code); `moe-arch diagnose {path}` reads it as it "
                              "is") from None
    model, _, _ = materialize(cfg.model, saved, device)
    return model


@torch.no_grad()
def evaluate_streams(model, streams, seq_len: int, batch_size: int, device: torch.device, autocast,
                     byte_lengths: np.ndarray | None = None, max_tokens: int = 0) -> dict:
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
            nll += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                         reduction="sum").double())
            n += tgt.numel()
            if byte_lengths is not None:
                n_bytes += int(byte_lengths[tgt.cpu().numpy()].sum())
        left = max_tokens - n
    out = {"tokens": n, "loss": nll / max(n, 1), "perplexity": math.exp(min(nll / max(n, 1), 700.0))}
    if byte_lengths is not None:
        out["bytes"] = n_bytes
        out["bits_per_byte"] = nll / math.log(2) / n_bytes if n_bytes else None
    return out


def run_eval(checkpoint: str, data_overrides: dict, split: str | None, max_tokens: int, device: str = "auto",
             seq_len: int = 0, batch_size: int = 0, log=print) -> dict:
    from moe_arch.data.dataset import prepare_data
    from moe_arch.training.precision import resolve_policy

    from moe_arch.utils import resolve_device

    dev = resolve_device(device, "--device")
    ck = load_for_eval(checkpoint, dev)
    cfg = ck.cfg
    if seq_len > cfg.model.max_seq_len:
        # Positions beyond max_seq_len were never trained (and a huge window makes one attention matrix of
        # seq_len**2): the loss there would measure extrapolation, not the model.
        raise ValueError(f"--seq-len {seq_len}: must be <= model.max_seq_len={cfg.model.max_seq_len} of the "
                         "checkpoint (0: its train.seq_len)")
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
    res = evaluate_streams(ck.model, td.split(split), T, B, dev, policy.autocast(dev), ck.tokenizer.byte_lengths(),
                           max_tokens)
    return {"checkpoint": str(ck.path), "step": ck.step, "data": td.meta.get("describe", data_cfg.source),
            "split": split, "seq_len": T, **res}
