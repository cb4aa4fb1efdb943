import pytest
import torch
from conftest import small_overrides

from moe_arch.config import ModelConfig
from moe_arch.model.mamba import use_compiled_scan
from moe_arch.model.transformer import build_model


def _compiled_matches_eager(seed: int, checkpointing: str = "none") -> None:
    """Loss and gradients of the compiled model (with the given activation checkpointing) equal eager's."""
    cfg = ModelConfig(**small_overrides())
    eager, compiled = build_model(cfg, seed=0), build_model(cfg, seed=0)
    tok = torch.randint(0, 512, (4, 34), generator=torch.Generator().manual_seed(seed))
    try:
        use_compiled_scan(False)
        ref = eager(tok[:, :32], tok[:, 1:])
        ref.loss.backward()
        compiled.compile_blocks().set_activation_checkpointing(checkpointing)
        out = compiled(tok[:, :32], tok[:, 1:])
        out.loss.backward()
    finally:
        use_compiled_scan(False)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.slow
def test_compiled_blocks_compute_what_eager_computes():
    _compiled_matches_eager(0)


@pytest.mark.slow
def test_compiled_blocks_with_activation_checkpointing():
    """train.compile and train.activation_checkpointing together: the compiled parts run inside the checkpointed
    blocks, twice in a step (forward and recomputation); loss and gradients are eager's."""
    _compiled_matches_eager(1, "full")
