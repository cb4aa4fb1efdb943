"""Expert parallelism on 2 and 4 gloo CPU ranks: one MoE layer's outputs, gradients and routing counts against the
float64 definition of the layer on the whole batch (float32 bounds from tests/numerics.py), Muon on each rank's own
experts against single-process Muon per expert, and the trainer: the same losses as one process, resumed at other
expert-parallel and FSDP sizes, read by export / eval / diagnose, a killed rank.

The layer cases run under ``torch.distributed.run``: this file is also the worker (``python test_expert_parallel.py
MODE OUT``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_checkpoint import with_train
from test_distributed import export, kill_a_rank, run_losses, t_step, torchrun

from moe_arch.config import Config, ConfigError, ModelConfig
from moe_arch.training.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable")

E, K, D, F_EXP, TOKENS = 4, 2, 32, 48, 96  # experts, top-k, d_model, expert width, tokens per rank


def _layer(seed: int = 0):
    from moe_arch.model.moe import MoE

    cfg = ModelConfig(d_model=D, n_layers=1, moe_layers=[0], n_experts=E, top_k=K, d_ff_expert=F_EXP)
    moe = MoE(cfg, 0)
    moe.init_weights(0.2, 0.2, torch.Generator().manual_seed(seed))
    return moe


def layer_worker(out: str) -> None:
    """Each rank routes its own TOKENS rows; the experts live half on each rank. Checked on every rank against the
    float64 layer over both ranks' rows (its output rows, its input gradient, its own experts' gradients), then
    one Muon step on the sharded experts against torch.optim.Muon / BatchedMuon per expert in this process."""
    import torch.distributed as dist
    from numerics import assert_within, moe_experts_bound, moe_experts_grad_bounds
    from torch.distributed.device_mesh import init_device_mesh

    from moe_arch.model.transformer import Aux
    from moe_arch.parallel.expert_parallel import apply_expert_parallel
    from moe_arch.training import optim
    from moe_arch.training.optim import BatchedMuon

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    moe = _layer()
    full = {n: p.detach().clone() for n, p in moe.experts.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    x_all = torch.randn(world * TOKENS, D, generator=gen)
    g_all = torch.randn(world * TOKENS, D, generator=gen)
    mine = slice(rank * TOKENS, (rank + 1) * TOKENS)
    apply_expert_parallel(moe, init_device_mesh("cpu", (world,)))
    _constant_gates(moe)
    x = x_all[mine].clone().requires_grad_()
    aux = Aux()
    y = moe(x, aux=aux)
    y.backward(g_all[mine])
    with torch.no_grad():
        # every rank's rows routed as that rank routed them (its own rows alone: the same router GEMM shapes, so
        # the same choices on every CPU)
        routes = [moe.route(x_all[r * TOKENS : (r + 1) * TOKENS])[2:] for r in range(world)]
        idx_all, w_all = (torch.cat(parts) for parts in zip(*routes))
        _, _, idx, w = moe.route(x)
    assert torch.equal(idx, idx_all[mine])
    # routing counts: each rank counts its own rows; summed over ranks they are the whole batch's
    counts = aux.moe_load[0].clone()
    assert torch.equal(counts, torch.bincount(idx.reshape(-1), minlength=E))
    dist.all_reduce(counts)
    assert torch.equal(counts, torch.bincount(idx_all.reshape(-1), minlength=E))
    ref, bound = moe_experts_bound(x.detach(), full["w_gate"], full["w_up"], full["w_down"], idx, w)
    assert_within(y.detach(), ref, bound, f"rank {rank} output")
    refs, bounds = moe_experts_grad_bounds(x_all, full["w_gate"], full["w_up"], full["w_down"], idx_all, w_all, g_all)
    assert_within(x.grad, refs["x"][mine], bounds["x"][mine], f"rank {rank} dx")
    n_local = E // world
    experts = slice(rank * n_local, (rank + 1) * n_local)
    for name, p in moe.experts.named_parameters():
        assert p.to_local().shape[0] == n_local  # this rank holds its experts only
        # 1/world of the sum over both ranks' rows: the gradient of the mean of the ranks' losses
        got = p.grad.to_local() * world
        assert_within(got, refs[name][experts], bounds[name][experts], f"rank {rank} d{name}")
    # Muon: the sharded experts' step equals each expert orthogonalised alone in one process, with no gather
    grads = {n: p.grad.full_tensor() for n, p in moe.experts.named_parameters()}
    kw = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    gather = optim.full
    optim.full = lambda t: (_ for _ in ()).throw(AssertionError("gathered")) if t.ndim == 3 else gather(t)
    BatchedMuon(list(moe.experts.parameters()), ns_dtype=torch.float32, **kw).step()
    optim.full = gather
    for name, p in moe.experts.named_parameters():
        for e in range(experts.start, experts.stop):
            alone = torch.nn.Parameter(full[name][e].clone())
            alone.grad = grads[name][e].clone()
            BatchedMuon([alone], ns_dtype=torch.float32, **kw).step()
            torch.testing.assert_close(p.to_local()[e - experts.start], alone.detach(), rtol=0, atol=1e-6)
            ref_p = torch.nn.Parameter(full[name][e].clone())
            ref_p.grad = grads[name][e].clone()
            torch.optim.Muon([ref_p], **kw).step()  # torch's own Muon (bf16 Newton-Schulz): bf16's precision
            mine_step, ref_step = p.to_local()[e - experts.start] - full[name][e], ref_p.detach() - full[name][e]
            assert (mine_step - ref_step).norm() / ref_step.norm() < 0.03
    # A collapsed router: every token picks experts 0 and 1, so rank 1 receives no row at all. It still takes part
    # in every exchange and its experts get a zero gradient (not none: FSDP reduces the same tensors on every rank).
    collapsed = _layer()
    collapsed.bias_balancing = True
    collapsed.expert_bias.copy_(torch.tensor([2.0, 2.0, 0.0, 0.0]))
    apply_expert_parallel(collapsed, init_device_mesh("cpu", (world,)))
    _constant_gates(collapsed)
    x = x_all[mine].clone().requires_grad_()
    y = collapsed(x)
    y.backward(g_all[mine])
    _, _, idx, w = collapsed.route(x.detach())
    assert set(idx.unique().tolist()) == {0, 1}
    ref, bound = moe_experts_bound(x.detach(), full["w_gate"], full["w_up"], full["w_down"], idx, w)
    assert_within(y.detach(), ref, bound, f"rank {rank} collapsed output")
    for name, p in collapsed.experts.named_parameters():
        assert p.grad is not None and bool(p.grad.to_local().abs().sum() > 0) == (rank == 0), (rank, name)
    dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps({"counts": counts.tolist()}))
    dist.destroy_process_group()


def _constant_gates(moe) -> None:
    """Hold the gate weights constant, so the input gradient is the expert path the bounds cover (the router's own
    path is local code, the same with and without expert parallelism, and checked by the trainer tests below)."""
    route = moe.route

    def detached(x):
        logits, probs, idx, w = route(x)
        return logits, probs, idx, w.detach()

    moe.route = detached


def launch(tmp_path: Path, mode: str, nproc: int = 2) -> Path:
    out = tmp_path / f"{mode}.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    res = subprocess.run([*cmd, __file__, mode, str(out)], capture_output=True, text=True, env=env, timeout=240)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-5000:])
    return out


def test_one_layer_on_two_ranks_is_the_layer_on_the_whole_batch(tmp_path):
    counts = json.loads(launch(tmp_path, "layer").read_text())["counts"]
    assert sum(counts) == 2 * TOKENS * K and min(counts) > 0  # every expert got rows from the exchange


def test_the_gradient_bounds_hold_for_the_single_process_layer():
    """The healthy twin of the bounds: the plain (no exchange) layer is within them too, and they are tight enough
    to catch a wrong gradient (a missing 1/world, a row sent to the wrong expert)."""
    from numerics import assert_within, moe_experts_grad_bounds

    moe = _layer()
    _constant_gates(moe)
    gen = torch.Generator().manual_seed(1)
    x, g = torch.randn(2 * TOKENS, D, generator=gen), torch.randn(2 * TOKENS, D, generator=gen)
    xr = x.clone().requires_grad_()
    moe(xr).backward(g)
    _, _, idx, w = moe.route(x)
    e = moe.experts
    refs, bounds = moe_experts_grad_bounds(x, e.w_gate, e.w_up, e.w_down, idx, w, g)
    assert_within(xr.grad, refs["x"], bounds["x"], "dx")
    for name, p in e.named_parameters():
        assert_within(p.grad, refs[name], bounds[name], name)
        with pytest.raises(AssertionError):
            assert_within(p.grad * 0.5, refs[name], bounds[name], name)  # a gradient off by the factor 2
    with pytest.raises(AssertionError):
        assert_within(e.w_down.grad.roll(1, 0), refs["w_down"], bounds["w_down"], "experts swapped")


# ---------------------------------------------------------------------------------------------- the trainer


@pytest.fixture
def ep_cfg(small_cfg):
    d = with_train(small_cfg, steps=6, batch_size=4, log_every=1, ckpt_every=3, sample_tokens=0).to_dict()
    d["model"]["router_bias_balancing"] = True  # the balancing loads are counted once and reduced over ranks
    return Config.from_dict(d)


def metrics(cfg: Config) -> list[dict]:
    path = Path(cfg.train.out_dir) / cfg.train.run_name / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"]


def test_two_ranks_with_expert_parallel_train_as_one_process(ep_cfg, tmp_path):
    d = with_train(ep_cfg, run_name="ep", expert_parallel=2, activation_checkpointing="full", sample_tokens=8)
    d = d.to_dict()
    d["monitor"] = {"enabled": True, "interval": 3, "window": 3}  # the live monitor on expert-parallel shards
    ep = Config.from_dict(d)
    single = with_train(ep_cfg, run_name="single", batch_size=8)
    out = torchrun(ep, tmp_path)
    assert out.stdout.count("sample: ") == 1  # generated on rank 0 from the gathered weights
    alerts = Path(ep.train.out_dir) / "ep" / "alerts.jsonl"
    crit = [a for a in map(json.loads, alerts.read_text().splitlines())] if alerts.exists() else []
    assert not [a for a in crit if a["severity"] == "critical"], crit  # healthy: nothing critical
    Trainer(single).run()
    # Same data and math; the float summation order differs (as for FSDP: tests/test_distributed.py)
    torch.testing.assert_close(torch.tensor(run_losses(ep)), torch.tensor(run_losses(single)), rtol=2e-4, atol=0)
    a, b = metrics(ep), metrics(single)
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-3)
    for layer in (1, 3):  # routing counts of the first step (same weights): every token counted once
        assert a[0][f"moe_load_L{layer}"] == b[0][f"moe_load_L{layer}"]
    # the checkpoint holds whole expert tensors (global shapes), readable without torch.distributed
    from moe_arch.checkpoint.readers import open_checkpoint

    final = Path(ep.train.out_dir) / "ep" / "checkpoints" / "final"
    view = open_checkpoint(final)
    assert tuple(view.tensors["layers.1.ffn.experts.w_gate"].shape) == (4, 64, 64)


@pytest.mark.slow  # four torchrun launches on 2 and 4 ranks, ~2 min
def test_expert_parallel_checkpoints_resume_at_other_sizes_and_are_read_everywhere(ep_cfg, tmp_path):
    base = with_train(ep_cfg, run_name="base", expert_parallel=2)
    torchrun(base, tmp_path)
    a = run_losses(base)
    mid = Path(base.train.out_dir) / "base" / "checkpoints" / "step_0000003"
    # EP 2 -> plain FSDP on 2 ranks (EP 1), and EP 2 x FSDP 2 on 4 ranks: the uninterrupted run's next losses
    fsdp = with_train(ep_cfg, run_name="fsdp")
    torchrun(fsdp, tmp_path, "--resume", str(mid))
    torch.testing.assert_close(torch.tensor(run_losses(fsdp)), torch.tensor(a[3:]), rtol=2e-4, atol=0)
    four = with_train(ep_cfg, run_name="four", expert_parallel=2, batch_size=2)
    torchrun(four, tmp_path, "--resume", str(mid), nproc=4)
    torch.testing.assert_close(torch.tensor(run_losses(four)), torch.tensor(a[3:]), rtol=2e-4, atol=0)
    norms = [r["grad_norm"] for r in metrics(base)][3:]
    for run in (fsdp, four):
        assert [r["grad_norm"] for r in metrics(run)] == pytest.approx(norms, rel=1e-3)
    # ... and one process (same global batch)
    one = with_train(ep_cfg, run_name="one", batch_size=8)
    t = Trainer(one, resume=str(mid))
    assert t.step == 3
    t.run()
    torch.testing.assert_close(torch.tensor(run_losses(one)), torch.tensor(a[3:]), rtol=2e-4, atol=0)
    # export, eval and diagnose read the expert-parallel checkpoint
    final = Path(base.train.out_dir) / "base" / "checkpoints" / "final"
    export(final, tmp_path / "one.pt")
    from moe_arch.doctor.pipeline import diagnose
    from moe_arch.evaluation.loss import run_eval

    sharded = run_eval(str(final), {}, "val", 1024, "cpu", log=lambda *a: None)
    single = run_eval(str(tmp_path / "one.pt"), {}, "val", 1024, "cpu", log=lambda *a: None)
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-6)
    d = diagnose(str(final))
    assert d.checkpoint["format"] == "moe_arch-dcp" and d.optimizers
    assert all(o["n_mapped"] == o["n_params"] for o in d.optimizers)
    assert not [f for f in d.findings if f.severity == "critical"]


@pytest.mark.slow  # 4 ranks, ~40 s each
@pytest.mark.parametrize(
    "n_experts, top_k",
    [
        (4, 2),  # 2 experts per EP rank, FSDP-sharded 1 + 1
        (6, 2),  # 3 per EP rank: uneven FSDP shards, 2 + 1
        (2, 1),  # 1 per EP rank: one rank of each FSDP pair holds no expert at all
    ],
)
def test_four_ranks_expert_parallel_by_fsdp_train_as_one_process(ep_cfg, tmp_path, n_experts, top_k):
    """EP 2 x FSDP 2, with gradient accumulation and activation checkpointing: the gradient of each expert is that
    of the global mean loss (a wrong divisor over either mesh dimension shows in the gradient norm)."""
    d = ep_cfg.to_dict()
    d["model"].update(n_experts=n_experts, top_k=top_k)
    cfg = Config.from_dict(d)
    grid = with_train(
        cfg, run_name="grid", expert_parallel=2, batch_size=1, grad_accum=2, activation_checkpointing="full"
    )
    single = with_train(cfg, run_name="single", batch_size=4, grad_accum=2)
    torchrun(grid, tmp_path, nproc=4)
    Trainer(single).run()
    torch.testing.assert_close(torch.tensor(run_losses(grid)), torch.tensor(run_losses(single)), rtol=2e-4, atol=0)
    a, b = metrics(grid), metrics(single)
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-3)
    assert a[0]["grad_norm_expert_muon"] == pytest.approx(b[0]["grad_norm_expert_muon"], rel=1e-4)
    for layer in (1, 3):
        assert a[0][f"moe_load_L{layer}"] == b[0][f"moe_load_L{layer}"]


@pytest.mark.slow
def test_a_killed_rank_leaves_the_last_expert_parallel_checkpoint_loadable(ep_cfg, tmp_path):
    cfg = with_train(ep_cfg, run_name="killed", expert_parallel=2, steps=10_000, ckpt_every=2, keep_last=2)
    latest = kill_a_rank(cfg, tmp_path)  # one rank dies, possibly inside a checkpoint's save
    t = Trainer(with_train(cfg, batch_size=8, steps=t_step(latest) + 1, expert_parallel=1), resume=str(latest))
    assert t.step == t_step(latest) >= 4
    t.run()


def test_expert_parallel_settings_are_checked_before_anything_runs(ep_cfg):
    d = ep_cfg.to_dict()
    for ep, parallel, msg in (
        (3, "fsdp", r"train.expert_parallel=3: must divide model.n_experts=4"),
        (2, "ddp", r"train.expert_parallel=2: composes with train.parallel fsdp or auto, not 'ddp'"),
    ):
        d["train"].update(expert_parallel=ep, parallel=parallel)
        with pytest.raises(ConfigError, match=msg):
            Config.from_dict(d)
    # one process cannot split its experts: a one-line error naming the launch
    with pytest.raises(ConfigError, match=r"must divide the number of processes \(1\); launch with torchrun"):
        Trainer(with_train(ep_cfg, expert_parallel=2))


if __name__ == "__main__":
    if sys.argv[1] == "layer":
        layer_worker(sys.argv[2])
    sys.stdout.flush()
    os._exit(0)
