import torch
from test_checkpoint import losses, stop_after, with_train

from moe_arch.checkpoint import load_checkpoint
from moe_arch.config import Config
from moe_arch.training.precision import CompensatedUpdates, preflight
from moe_arch.training.trainer import Trainer

SEED_OPTIM = {"muon_lr": 1e-3, "adamw_lr": 3e-4}  # the seed report's settings


def run(small_cfg: Config, precision: str, steps: int = 6, **train):
    d = with_train(small_cfg, steps=steps, precision=precision, warmup_steps=0, run_name=precision, **train).to_dict()
    d["optim"].update(SEED_OPTIM)
    cfg = Config.from_dict(d)
    trainer = Trainer(cfg)
    trainer.run()
    ck = trainer.ckpt_dir
    return trainer, load_checkpoint(ck / "step_0000000.pt")["model"], load_checkpoint(ck / "final.pt")["model"]


def norms(sd):
    return [k for k in sd if k.endswith("norm.weight")]


def test_bf16_pure_freezes_every_norm_and_preflight_says_so(small_cfg, capsys):
    trainer, init, final = run(small_cfg, "bf16-pure")
    assert final["embed.weight"].dtype == torch.bfloat16
    assert len(norms(final)) == 2 * small_cfg.model.n_layers + 1
    for k in norms(final):
        assert torch.equal(final[k], init[k]), f"{k} moved under bf16-pure"
    assert not torch.equal(final["embed.weight"], init["embed.weight"])  # matrices still move
    frozen = {f.name for f in preflight(trainer.raw_model, trainer.optimizers)}
    assert set(norms(final)) <= frozen
    out = capsys.readouterr().out
    assert "precision preflight" in out and "layers.0.seq_norm.weight" in out and "half-ULP 3.9e-03" in out


def test_norms_move_under_bf16_mixed(small_cfg):
    trainer, init, final = run(small_cfg, "bf16-mixed")
    for k in norms(final):
        assert not torch.equal(final[k], init[k]), f"{k} did not move under bf16-mixed"
    assert preflight(trainer.raw_model, trainer.optimizers) == []
    assert final["embed.weight"].dtype == torch.float32  # master weights stay fp32


def test_norms_move_under_bf16_compensated(small_cfg):
    # Constant lr so the accumulated updates cross a bf16 rounding step within a short run.
    trainer, init, final = run(small_cfg, "bf16-compensated", steps=24, schedule="constant")
    comp = load_checkpoint(trainer.ckpt_dir / "final.pt")["precision_state"]
    for k in norms(final):
        effective = final[k].float() + comp[k].float()
        assert not torch.equal(effective, init[k].float()), f"{k}: compensated value did not move"
        assert not torch.equal(final[k], init[k]), f"{k}: stored bf16 weight never moved in 24 steps"
    assert final["embed.weight"].dtype == torch.bfloat16
    state = trainer.optimizers["adamw"].state
    assert all(s["exp_avg"].dtype == torch.float32 for s in state.values())


def test_compensated_updates_accumulate_what_rounding_drops():
    w_pure = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    w_comp = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    comp = CompensatedUpdates({"w": w_comp})
    for _ in range(1000):
        for w in (w_pure, w_comp):
            w.grad = torch.full_like(w, -1.0)
        torch.optim.SGD([w_pure], lr=1e-4).step()
        with comp.fp32_view():
            torch.optim.SGD([w_comp], lr=1e-4).step()
    assert torch.equal(w_pure.data, torch.ones(8, dtype=torch.bfloat16))  # every step rounded away
    # The compensation buffer is bf16 too (~16 mantissa bits in all), so a perfectly regular update pattern can
    # drift by a few percent of what it accumulates; what matters is that the updates are kept, not lost.
    moved = (w_comp.data.float() + comp.comp["w"].float()) - 1.0
    torch.testing.assert_close(moved, torch.full((8,), 0.1), rtol=0.05, atol=0)
    assert (w_comp.data.float() - 1.0).min() > 0.09  # the stored weight itself moved too


def test_compensated_run_resumes_exactly(small_cfg):
    d = with_train(small_cfg, steps=6, precision="bf16-compensated", log_every=1, run_name="a").to_dict()
    full = Config.from_dict(d)
    Trainer(full).run()
    d["train"]["run_name"] = "b"
    half = Config.from_dict(d)
    stop_after(Trainer(half), 3).run()
    Trainer(half, resume="latest").run()
    a = losses(full.train.out_dir and __import__("pathlib").Path(full.train.out_dir) / "a")
    b = losses(__import__("pathlib").Path(half.train.out_dir) / "b")
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]


def test_bf16_autocast_runs_mod_on_every_block_kind():
    """Under autocast a MoD block with a dense feed-forward (attention or Mamba) adds a bf16 update to the float32
    residual stream: the scatter must cast it (it raised a dtype error before; the seed-3b preset has such blocks)."""
    from moe_arch.config import ModelConfig
    from moe_arch.model.transformer import build_model

    cfg = ModelConfig(
        vocab_size=128,
        d_model=32,
        n_layers=4,
        n_heads=2,
        n_kv_heads=1,
        d_ff=64,
        max_seq_len=64,
        moe_layers=[2, 3],
        n_experts=4,
        top_k=2,
        d_ff_expert=32,
        mamba_layers=[1, 3],
        mod_layers=[0, 1, 2, 3],
        mod_capacity=0.5,
        n_predict=2,
    )
    model = build_model(cfg, seed=0).train()
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens, targets)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for i, blk in enumerate(model.layers):
        assert blk.mod_router.weight.grad is not None and blk.mod_router.weight.grad.abs().sum() > 0, i
