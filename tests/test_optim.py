import pytest
import torch
from conftest import small_overrides
from torch import nn

from moe_arch.config import Config, ModelConfig, OptimConfig, TrainConfig
from moe_arch.model.roles import named_parameter_roles
from moe_arch.model.transformer import build_model
from moe_arch.training.optim import build_optimizers, build_schedulers, lr_factor, plan_parameters

EXPECTED = {  # role -> (optimizer, decays)
    "embedding": ("adamw", True),
    "output_head": ("adamw", True),
    "norm": ("adamw", False),
    "bias": ("adamw", False),
    "router": ("adamw", False),
    "conv": ("adamw", True),
    "ssm": ("adamw", False),
    "hidden_matrix": ("muon", True),
    "expert_matrix": ("expert_muon", True),
}


def test_every_tensor_kind_is_routed_by_role():
    model = build_model(ModelConfig(**small_overrides()), seed=0)
    plans = plan_parameters(model, OptimConfig(weight_decay=0.1))
    seen = set()
    for p in plans:
        opt, decays = EXPECTED[p.role]
        assert p.optimizer == opt, p.name
        assert (p.weight_decay > 0) == decays, p.name
        seen.add(p.role)
    assert seen == set(EXPECTED)  # the small model has every kind
    by_name = {p.name: p for p in plans}
    assert by_name["layers.2.seq_layer.A_log"].role == "ssm"
    assert by_name["layers.2.seq_layer.dt_proj.bias"].role == "bias"
    assert by_name["layers.1.mod_router.weight"].role == "router"
    assert by_name["layers.1.ffn.router.weight"].role == "router"
    assert by_name["mtp_heads.0.out.weight"].role == "output_head"
    assert by_name["mtp_heads.0.proj.weight"].role == "hidden_matrix"
    # Muon's lr is shape-adjusted (Moonlight): 0.2 * sqrt(max(A, B)) * lr
    q = by_name["layers.0.seq_layer.q_proj.weight"]
    assert q.effective_lr == pytest.approx(0.2 * max(q.shape) ** 0.5 * q.lr)


def test_optimizers_cover_each_parameter_exactly_once():
    model = build_model(ModelConfig(**small_overrides()), seed=0)
    opts = build_optimizers(model, OptimConfig())
    ids = [id(p) for o in opts.values() for g in o.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    for o in opts.values():
        assert all("param_names" in g for g in o.state_dict()["param_groups"])
    assert opts["adamw"].defaults["fused"] is True  # plain tensors take PyTorch's fused AdamW kernel


def test_newton_schulz_precision_routes_2d_matrices():
    """CPU default: float32 Newton-Schulz in BatchedMuon; bfloat16 keeps torch.optim.Muon for 2-D matrices."""
    from moe_arch.training.optim import BatchedMuon

    model = build_model(ModelConfig(**small_overrides()), seed=0)
    cpu = build_optimizers(model, OptimConfig())
    assert type(cpu["muon"]) is BatchedMuon and cpu["muon"].ns_dtype == torch.float32
    assert cpu["expert_muon"].ns_dtype == torch.float32
    bf16 = build_optimizers(model, OptimConfig(muon_ns_dtype="bfloat16"))
    assert type(bf16["muon"]) is torch.optim.Muon
    assert bf16["expert_muon"].ns_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="optim.muon_ns_dtype"):
        OptimConfig(muon_ns_dtype="float16")


@pytest.mark.parametrize("max_batch", [None, 200])
def test_batched_muon_shape_groups_give_the_per_matrix_result(max_batch, monkeypatch):
    """Same-shape matrices (also transposed ones, and expert slices) share one batched Newton-Schulz: the result
    must be that of orthogonalising each matrix alone, also when batches are cut at MAX_BATCH_ELEMENTS (200: the
    three 8x12 matrices and the 3x8x12 stack go in separate batches)."""
    from moe_arch.training import optim
    from moe_arch.training.optim import BatchedMuon

    if max_batch:
        monkeypatch.setattr(optim, "MAX_BATCH_ELEMENTS", max_batch)

    torch.manual_seed(0)
    shapes = [(8, 12), (8, 12), (12, 8), (3, 8, 12), (5, 7)]
    init = [torch.randn(s) for s in shapes]
    together = [nn.Parameter(w.clone()) for w in init]
    alone = [nn.Parameter(w.clone()) for w in init]
    kw = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", ns_dtype=torch.float32)
    opt = BatchedMuon(together, **kw)
    singles = [BatchedMuon([p], **kw) for p in alone]
    for _ in range(3):
        for a, b in zip(together, alone):
            g = torch.randn(a.shape)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        for o in singles:
            o.step()
    for a, b, w in zip(together, alone, init):
        torch.testing.assert_close(a.data, b.data, rtol=0, atol=1e-6)
        assert not torch.equal(a.data, w)


def test_float32_newton_schulz_tracks_torch_muon():
    """The float32 path is the same algorithm as torch.optim.Muon (bf16): updates agree to bf16's precision."""
    from moe_arch.training.optim import BatchedMuon

    torch.manual_seed(2)
    w = torch.randn(48, 32)
    a, b = nn.Parameter(w.clone()), nn.Parameter(w.clone())
    ours = BatchedMuon([a], lr=0.01, weight_decay=0.0, ns_dtype=torch.float32)
    ref = torch.optim.Muon([b], lr=0.01, weight_decay=0.0)
    g = torch.randn(48, 32)
    a.grad, b.grad = g.clone(), g.clone()
    ours.step()
    ref.step()
    da, db = a.data - w, b.data - w
    assert (da - db).norm() / db.norm() < 0.03
    assert not torch.equal(da, db)  # really a different precision


def test_unregistered_parameter_is_an_error():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

    m = nn.Sequential(nn.Linear(3, 3), Odd())
    with pytest.raises(TypeError, match="'1.scale' of Odd has no registered role"):
        list(named_parameter_roles(m))


def test_schedule_shapes():
    t = TrainConfig(steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, t) == pytest.approx(0.1) and lr_factor(9, t) == pytest.approx(1.0)
    assert lr_factor(10, t) == pytest.approx(1.0) and lr_factor(100, t) == pytest.approx(0.1)
    w = TrainConfig(steps=100, warmup_steps=10, schedule="wsd", decay_frac=0.2, min_lr_ratio=0.0)
    assert lr_factor(50, w) == 1.0 and lr_factor(100, w) == pytest.approx(0.0)
    assert 0 < lr_factor(95, w) < 1


def test_group_lr_ratio_survives_warmup_schedule_and_resume():
    cfg = Config.from_dict(
        {
            "model": small_overrides(),
            "optim": {"muon_lr": 0.02, "adamw_lr": 0.004},
            "train": {"steps": 20, "warmup_steps": 5},
        }
    )

    def make():
        model = build_model(cfg.model, seed=0)
        opts = build_optimizers(model, cfg.optim)
        return model, opts, build_schedulers(opts, cfg.train)

    model, opts, scheds = make()
    ratios = []
    for step in range(12):
        for o in opts.values():
            for p in (p for g in o.param_groups for p in g["params"]):
                p.grad = torch.zeros_like(p)
            o.step()
        for s in scheds.values():
            s.step()
        ratios.append(opts["muon"].param_groups[0]["lr"] / opts["adamw"].param_groups[0]["lr"])
        if step == 5:
            saved = ({k: o.state_dict() for k, o in opts.items()}, {k: s.state_dict() for k, s in scheds.items()})
    assert ratios == pytest.approx([5.0] * 12)
    # Resume from step 6 into fresh objects: same lrs as the uninterrupted run at the same step.
    _, opts2, scheds2 = make()
    for k in opts2:
        opts2[k].load_state_dict(saved[0][k])
        scheds2[k].load_state_dict(saved[1][k])
    for step in range(6, 12):
        for s in scheds2.values():
            s.step()
    assert opts2["muon"].param_groups[0]["lr"] == pytest.approx(opts["muon"].param_groups[0]["lr"])
    assert opts2["adamw"].param_groups[0]["lr"] == pytest.approx(opts["adamw"].param_groups[0]["lr"])
