"""The memory planner (moe_arch/training/memory.py) against what PyTorch really holds: each block's activation
term against the bytes autograd saves (counted with saved_tensors_hooks), and a whole training step's plan against
the peak of live tensor bytes from the profiler's allocation events (bench/bench_memory.py does the same on larger
configs and prints the table in bench/RESULTS.md)."""

import contextlib
import json

import pytest
import torch
from conftest import skip_unless_bf16_attention_runs

from moe_arch.cli import main
from moe_arch.config import load_config
from moe_arch.model import cpu_kernels
from moe_arch.model.transformer import HybridLM, build_model
from moe_arch.training.memory import (
    GiB,
    Numerics,
    _muon_step_transient,
    block_activations,
    expert_block_params,
    head_activations,
    measure_step_peak,
    mod_rows,
    muon_groups,
    plan_memory,
)
from moe_arch.training.optim import plan_parameters

B, T = 4, 64


def saved_per_block(cfg, precision: str) -> dict:
    """Bytes autograd keeps for the backward, per block and for the head, distinct storages, parameters excluded."""
    model = build_model(cfg, seed=0).train()
    autocast = contextlib.nullcontext()
    if precision == "bf16-pure":
        model.to(torch.bfloat16)
    if precision == "bf16-mixed":
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    where = ["head"]
    for i, blk in enumerate(model.layers):
        blk.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, i))
    model.final_norm.register_forward_pre_hook(lambda m, a: where.__setitem__(0, "head"))
    seen, per = set(), {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            per[where[0]] = per.get(where[0], 0) + s.nbytes()
        return t

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (B, T + cfg.n_predict - 1), generator=g)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(tokens, targets)
    return per


@pytest.mark.parametrize("precision", ["fp32", "bf16-pure", "bf16-mixed"])
def test_activation_terms_match_what_autograd_saves(precision):
    if precision.startswith("bf16"):
        skip_unless_bf16_attention_runs()
    cfg = load_config("tiny").model
    measured = saved_per_block(cfg, precision)
    num = Numerics(precision, "cpu", cpu_kernels.available())
    with torch.device("meta"):
        meta = HybridLM(cfg)
    blocks = block_activations(cfg, num, B, T, meta)
    head, _ = head_activations(cfg, num, B, T)
    for b in blocks:  # MoD selection varies with the random router: a few percent
        assert b.saved == pytest.approx(measured[b.index], rel=0.1), (b.index, b.kind)
    assert head == pytest.approx(measured["head"], rel=0.03)
    total = sum(b.saved for b in blocks) + head
    assert total == pytest.approx(sum(measured.values()), rel=0.05)


@pytest.mark.parametrize(
    "precision,ckpt",
    [("fp32", "none"), ("bf16-compensated", "full"), ("bf16-mixed", "selective"), ("fp32", "sequence")],
)
def test_plan_matches_measured_peak_of_a_training_step(precision, ckpt):
    if precision.startswith("bf16"):
        skip_unless_bf16_attention_runs()
    cfg = load_config("tiny")
    measured = measure_step_peak(cfg, precision, ckpt, 8, 128)
    plan = plan_memory(cfg, batch_size=8, seq_len=128, checkpointing=ckpt, precision=precision, device="cpu")
    assert plan.peak_gb * GiB == pytest.approx(measured, rel=0.15)


def test_sharding_checkpointing_and_the_largest_batch():
    cfg = load_config("seed-3b")
    one = plan_memory(cfg, gpus=1, gpu_memory_gb=80)
    eight = plan_memory(cfg, gpus=8, gpu_memory_gb=80, parallel="fsdp")
    for k in ("parameters", "gradients", "optimizer states"):
        assert eight.gb[k] == pytest.approx(one.gb[k] / 8)
    assert "fsdp gathered" in eight.gb and "autocast bf16 weight copies" not in eight.gb  # FSDP gathers in bf16
    ddp = plan_memory(cfg, gpus=8, gpu_memory_gb=80, parallel="ddp")
    assert ddp.gb["ddp buckets"] == pytest.approx(one.gb["gradients"]) and ddp.peak_gb > one.peak_gb
    kept = {
        c: plan_memory(cfg, checkpointing=c).gb["activations (kept)"] for c in ("none", "sequence", "selective", "full")
    }
    assert kept["full"] < kept["selective"] < kept["none"] and kept["sequence"] < kept["none"]
    # Optimizer states follow the routing: Muon 1 buffer, AdamW 2, float32 under bf16-mixed.
    assert one.gb["optimizer states"] > one.gb["parameters"]
    # The largest micro-batch is the boundary: it fits, one more does not.
    best = one.max_batch_size
    assert best >= 1
    assert plan_memory(cfg, batch_size=best).peak_gb <= 80 * 0.9 < plan_memory(cfg, batch_size=best + 1).peak_gb
    small = plan_memory(cfg, gpus=1, gpu_memory_gb=24)
    assert small.fits is False and small.max_batch_size == 0


def test_info_memory_cli(capsys):
    assert main(["info", "seed-3b", "--memory", "--gpus", "8", "--json", "--activation-checkpointing", "full"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpus"] == 8 and out["parallel"] == "fsdp" and out["activation_checkpointing"] == "full"
    assert out["fits"] is True and out["max_batch_size"] > 1 and out["peak_gb"] < 80
    assert main(["info", "tiny", "--memory", "--gpu-memory", "1", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "optimizer states" in text and "largest micro-batch" in text and "fits" in text
    assert main(["info", "tiny", "--memory", "--gpus", "0"]) == 2
    assert "--gpus 0: must be >= 1" in capsys.readouterr().err
    assert main(["info", "tiny", "--memory", "--gpus", "2", "--precision", "bf16-compensated"]) == 2
    assert "bf16-compensated is not supported with FSDP" in capsys.readouterr().err


def test_expert_parallel_splits_what_blocks_gather_and_muon_orthogonalises():
    """Expert parallelism as the runtime does it: persistent state stays 1/gpus; FSDP gathers 1/ep of a block's
    experts; Muon orthogonalises the rank's own whole experts; the token exchange adds two row permutations per
    assignment (kept) and its buffers while a layer runs."""
    cfg = load_config("seed-3b")
    m = cfg.model
    assert plan_memory(cfg, gpus=2).as_dict() == plan_memory(cfg, gpus=2, expert_parallel=1).as_dict()
    one, two = plan_memory(cfg, gpus=2), plan_memory(cfg, gpus=2, expert_parallel=2)
    assert one.expert_parallel == 1 and two.expert_parallel == 2 and "all-to-all buffers (one layer)" not in one.gb
    for k in ("parameters", "gradients", "optimizer states"):  # sharded over all 2 ranks either way
        assert two.gb[k] == one.gb[k]
    # FSDP's unsharded block (two gathered in bf16 + one float32 gradient): its experts exactly 1/2 of them
    with torch.device("meta"):
        model = HybridLM(m)
    per_block = [sum(p.numel() for p in blk.parameters()) for blk in model.layers]
    experts = expert_block_params(model)
    biggest = max(range(m.n_layers), key=per_block.__getitem__)
    assert experts[biggest] == max(experts) > 0
    assert (one.gb["fsdp gathered"] - two.gb["fsdp gathered"]) * GiB == (2 * 2 + 4) * experts[biggest] / 2
    # Muon on the experts: the same batches (cut by the global shapes), each rank orthogonalising its own shard of
    # whole experts under FSDP2 (with or without EP); unsharded (DDP) every rank runs all 14
    plans = plan_parameters(model, cfg.optim)
    for gpus, ep, sharded, local in ((2, 1, False, 14), (2, 1, True, 7), (2, 2, True, 7), (8, 2, True, 2)):
        groups, held = muon_groups(plans, m.n_experts, gpus, ep, sharded)
        assert {s[0] for s in held[1]} == {local}
        assert groups[1] == muon_groups(plans, m.n_experts, 1, 1, False)[0][1]
    assert {s[0] for s in muon_groups(plans, m.n_experts, 14, 7, True)[1][1]} == {1}

    def expert_muon(ep: int, sharded: bool) -> float:  # the expert group's Newton-Schulz temporaries on 2 GPUs
        groups, held = muon_groups(plans, m.n_experts, 2, ep, sharded)
        return _muon_step_transient([[], groups[1]], 2, [True, True], [[], held[1]])

    assert expert_muon(2, True) == expert_muon(1, True) == expert_muon(1, False) / 2
    # the exchange: each MoE block keeps two int64 permutations per assignment more; dense blocks are unchanged
    num = Numerics("bf16-mixed", "cuda", False, fsdp_mixed=True)
    b1, b2 = block_activations(m, num, 1, 2048, model), block_activations(m, num, 1, 2048, model, ep=2)
    routed = {"": 2048, "/mod": mod_rows(m, 1, 2048)[1]}  # MoD blocks route their real selected tokens
    for x, y in zip(b1, b2):
        moe = x.kind.split("/")[1] == "moe"
        tokens = routed["/mod" if x.kind.endswith("/mod") else ""]
        assert y.saved - x.saved == pytest.approx(16 * tokens * m.top_k if moe else 0, abs=1e-6)
        assert (y.exchange > 0) == moe and x.exchange == 0 and y.transient - x.transient == y.exchange
    # ... and its buffers: rows out and back, float32 norm output under autocast, 2048 tokens x top_k each way
    assert two.gb["all-to-all buffers (one layer)"] * GiB == 2048 * m.top_k * 2 * m.d_model * 4
    assert two.peak_gb < one.peak_gb  # seed-3b at its micro-batch: the smaller gathers win
    assert plan_memory(cfg, gpus=8, expert_parallel=2).peak_gb < plan_memory(cfg, gpus=8).peak_gb


@pytest.mark.parametrize(
    "args,message",
    [
        (["--gpus", "8", "--expert-parallel", "7"], "--expert-parallel 7: must divide --gpus 8"),
        (["--gpus", "8", "--expert-parallel", "4"], "--expert-parallel 4: must divide --model.n_experts=14"),
        (
            ["--gpus", "8", "--expert-parallel", "2", "--parallel", "ddp"],
            "--expert-parallel 2: composes with --parallel",
        ),
        (["--gpus", "8", "--expert-parallel", "0"], "--expert-parallel 0: must be >= 1"),
    ],
)
def test_info_memory_expert_parallel_errors(capsys, args, message):
    assert main(["info", "seed-3b", "--memory", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_info_memory_expert_parallel_output(capsys):
    assert main(["info", "seed-3b", "--memory", "--gpus", "14", "--expert-parallel", "7", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["expert_parallel"] == 7 and out["gb"]["all-to-all buffers (one layer)"] > 0
    assert main(["info", "seed-3b", "--memory", "--gpus", "2", "--expert-parallel", "2", "--gpu-memory", "24"]) == 0
    text = capsys.readouterr().out
    assert "(fsdp, expert parallel 2)" in text and "7 of 14 experts" in text
