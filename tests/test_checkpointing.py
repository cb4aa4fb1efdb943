"""Activation checkpointing: the same loss, gradients and routing statistics as without it, with fewer
activations kept for the backward."""

from __future__ import annotations

import pytest
import torch
from conftest import small_overrides

from moe_arch.config import ModelConfig
from moe_arch.model.transformer import build_model


def _step(model, tokens, targets):
    model.zero_grad(set_to_none=True)
    saved = {"bytes": 0}

    def pack(t):
        saved["bytes"] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens, targets)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    stats = {k: v.clone() for k, v in out.aux.moe_load.items()}
    stats.update({f"mod{k}": v.clone() for k, v in out.aux.mod_frac.items()})
    return out.loss.detach(), grads, stats, saved["bytes"], len(out.aux.moe_lb), len(out.aux.mod_bce)


@pytest.mark.parametrize("mode", ["full", "selective", "sequence"])
def test_checkpointed_gradients_are_bitwise_equal(mode):
    cfg = ModelConfig(**small_overrides(n_layers=4))
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 48))
    targets = torch.randint(0, cfg.vocab_size, (2, 48 + cfg.n_predict - 1))
    model = build_model(cfg, seed=1).train()
    ref = _step(model, tokens, targets)
    model.set_activation_checkpointing(mode)
    got = _step(model, tokens, targets)
    assert torch.equal(ref[0], got[0])
    assert ref[1].keys() == got[1].keys() and len(ref[1]) > 20
    for name in ref[1]:
        assert torch.equal(ref[1][name], got[1][name]), name
    # Routing statistics are recorded once per forward, not again by the recomputation.
    assert ref[4:] == got[4:] and ref[2].keys() == got[2].keys()
    for k in ref[2]:
        assert torch.equal(ref[2][k], got[2][k])
    # Fewer bytes kept for the backward; full keeps fewer than selective.
    assert got[3] < ref[3]
    if mode == "full":
        model.set_activation_checkpointing("selective")
        assert got[3] < _step(model, tokens, targets)[3]
    # Not in eval or without gradients (generation, validation): nothing to recompute.
    model.eval()
    with torch.no_grad():
        assert torch.equal(
            model(tokens, return_logits=True).logits,
            model.set_activation_checkpointing("none")(tokens, return_logits=True).logits,
        )


def test_the_trainer_setting(small_cfg):
    from moe_arch.config import Config, ConfigError
    from moe_arch.training.trainer import Trainer

    d = small_cfg.to_dict()
    d["train"]["activation_checkpointing"] = "everything"
    with pytest.raises(ConfigError, match="train.activation_checkpointing.*allowed: none, full, selective, sequence"):
        Config.from_dict(d)
    losses = {}
    for mode in ("none", "full"):
        d["train"].update(activation_checkpointing=mode, steps=3, run_name=mode)
        t = Trainer(Config.from_dict(d))
        assert t.raw_model.checkpointing == mode
        losses[mode] = t.run()
    assert losses["none"].val_loss == losses["full"].val_loss
