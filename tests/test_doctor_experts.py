"""MoE experts on every layout and PEFT adapters, diagnosed from the final checkpoint alone and against the initial
weights: runs of transformers' own ``Trainer`` (tiny Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3; peft LoRA),
each broken case beside a healthy twin, asserting the exact tensors, expert ids and statuses.

Experts are planted dead by a forward hook on the router that sends their tokens to a live expert instead (the
router's weights still train, as in a real collapse); transformers 5 trains the experts stacked and saves them per
expert, so the dead experts are whole tensors on disk."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from moe_arch.checkpoint.readers import BUFFER_PATTERNS
from moe_arch.doctor.experts import find_expert_sets
from moe_arch.doctor.pipeline import DiagnoseOptions, diagnose

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

# saved (per expert) tensor names of an expert, per architecture
SAVED = {
    "mixtral": ("block_sparse_moe", ("w1", "w2", "w3")),
    "qwen2_moe": ("mlp", ("down_proj", "gate_proj", "up_proj")),
    "qwen3_moe": ("mlp", ("down_proj", "gate_proj", "up_proj")),
    "olmoe": ("mlp", ("down_proj", "gate_proj", "up_proj")),
    "deepseek_v3": ("mlp", ("down_proj", "gate_proj", "up_proj")),
    "jamba": ("feed_forward", ("down_proj", "gate_proj", "up_proj")),
}
# the router's module inside a decoder layer, in memory (Mixtral's block_sparse_moe is "mlp" there)
ROUTER = {"jamba": "feed_forward.router"}


def _model(arch: str):
    import transformers as T
    from arch_runs import _build

    c = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if arch == "qwen3_moe":
        return T.Qwen3MoeForCausalLM(
            T.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, **c)
        )
    if arch == "deepseek_v3":
        return T.DeepseekV3ForCausalLM(
            T.DeepseekV3Config(
                intermediate_size=64,
                moe_intermediate_size=32,
                n_routed_experts=4,
                num_experts_per_tok=2,
                n_group=1,
                topk_group=1,
                first_k_dense_replace=0,
                q_lora_rank=None,
                kv_lora_rank=16,
                qk_rope_head_dim=8,
                qk_nope_head_dim=8,
                v_head_dim=16,
                **c,
            )
        )
    if arch == "jamba":
        # hybrid: attention in layers 0 and 2 (dense MLP), Mamba in 1 and 3 (experts); the PyTorch Mamba path on CPU
        return T.JambaForCausalLM(
            T.JambaConfig(
                intermediate_size=64,
                num_experts=4,
                num_experts_per_tok=2,
                expert_layer_period=2,
                expert_layer_offset=1,
                attn_layer_period=2,
                attn_layer_offset=0,
                mamba_d_state=8,
                mamba_dt_rank=4,
                use_mamba_kernels=False,
                **{**c, "num_hidden_layers": 4},
            )
        )
    return _build(arch)


def never_route(model, dead: dict[int, list[int]], router_path: str = "mlp.gate") -> None:
    """Route no token to experts ``dead[layer]``: their top-k slots go to the first live expert."""
    for layer, ids in dead.items():
        router = model.model.layers[layer].get_submodule(router_path)
        live = next(k for k in range(router.weight.shape[0]) if k not in ids)

        def hook(module, args, out, ids=torch.tensor(ids), live=live):
            logits, scores, idx = out
            return logits, scores, torch.where(torch.isin(idx, ids), torch.full_like(idx, live), idx)

        router.register_forward_hook(hook)


def trainer_run(model, out, steps: int = 6, optimizers=(None, None), lr: float = 1e-3, data=None):
    import transformers
    from arch_runs import Pattern
    from transformers import Trainer, TrainingArguments

    transformers.logging.set_verbosity_error()
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=lr,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=100,
        save_steps=steps,
        seed=0,
    )
    Trainer(model=model, args=args, train_dataset=data or Pattern(steps * 8), optimizers=optimizers).train()
    return out / f"checkpoint-{steps}"


def unchanged_on_disk(init, ck, weights: str = "model.safetensors") -> list[str]:
    from safetensors.torch import load_file

    a, b = load_file(init / weights), load_file(ck / weights)
    return sorted(n for n in b if torch.equal(a[n], b[n]) and not BUFFER_PATTERNS.search(n))  # buffers never train


def both(ck, init) -> dict:
    """The diagnosis against the initial weights and alone."""
    return {
        "with_reference": diagnose(str(ck), DiagnoseOptions(against=str(init), probe=False)),
        "alone": diagnose(str(ck), DiagnoseOptions(probe=False)),
    }


def verdict(d) -> list:
    return [(f.cause, sorted(f.tensors), f.experts) for f in d.findings]


def _moe_case(tmp_path, arch: str, dead: dict[int, list[int]]):
    torch.manual_seed(0)
    model = _model(arch)
    model.save_pretrained(tmp_path / "init")
    never_route(model, dead, ROUTER.get(arch, "mlp.gate"))
    ck = trainer_run(model, tmp_path)
    block, projections = SAVED[arch]
    expected = sorted(
        f"model.layers.{layer}.{block}.experts.{k}.{w}.weight"
        for layer, ids in dead.items()
        for k in ids
        for w in projections
    )
    # measured on the files: exactly the dead experts' tensors stayed bitwise unchanged
    assert unchanged_on_disk(tmp_path / "init", ck) == expected
    return ck, expected


def _assert_dead_experts(ck, init, arch, dead, expected):
    block = SAVED[arch][0]
    modules = {f"model.layers.{layer}.{block}": ids for layer, ids in dead.items()}
    for how, d in both(ck, init).items():
        assert d.status == "warning", (arch, how, verdict(d))
        assert verdict(d) == [("dead_experts", expected, modules)], (arch, how, verdict(d))
        f = d.findings[0]
        assert f.evidence["layers"] == {m: int(m.split(".")[2]) for m in modules}
        for m, info in f.evidence["modules"].items():
            assert info["layout"] == "per-expert" and info["n_experts"] == 4
            assert info["trained_experts"] == [k for k in range(4) if k not in modules[m]]
            assert info["evidence"] == "all-zero optimizer moments", info
        assert all(o["n_mapped"] == o["n_params"] for o in d.optimizers), d.optimizers


def _assert_healthy_twin(tmp_path, arch):
    torch.manual_seed(0)
    model = _model(arch)
    model.save_pretrained(tmp_path / "init")
    ck = trainer_run(model, tmp_path)
    for how, d in both(ck, tmp_path / "init").items():
        assert d.status == "healthy", (arch, how, verdict(d), d.inconclusive)


def test_transformers5_mixtral_with_never_routed_experts_is_dead_experts_not_no_gradient(tmp_path):
    """The issue's run: transformers 5 Mixtral, experts 2 and 3 never routed to (trained stacked, saved per expert
    as block_sparse_moe.experts.N.w1/w2/w3): dead_experts with layer and expert ids, with and without the
    reference; its healthy twin is healthy both ways."""
    dead = {0: [2, 3], 1: [2, 3]}
    ck, expected = _moe_case(tmp_path / "dead", "mixtral", dead)
    assert len(expected) == 12
    _assert_dead_experts(ck, tmp_path / "dead" / "init", "mixtral", dead, expected)
    _assert_healthy_twin(tmp_path / "healthy", "mixtral")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"])
def test_moe_families_with_a_dead_expert_in_one_layer(tmp_path, arch):
    dead = {1: [0]} if arch != "olmoe" else {0: [1, 3]}
    ck, expected = _moe_case(tmp_path / "dead", arch, dead)
    _assert_dead_experts(ck, tmp_path / "dead" / "init", arch, dead, expected)
    _assert_healthy_twin(tmp_path / "healthy", arch)


@pytest.mark.slow  # the PyTorch Mamba scan: ~40 s per run on 2 CPU cores
def test_jamba_hybrid_with_never_routed_experts(tmp_path):
    """Jamba (attention and Mamba layers, experts on the Mamba layers; trained stacked, saved per expert as
    feed_forward.experts.N.gate_proj/up_proj/down_proj): expert 2 of layer 1 and experts 0 and 3 of layer 3 never
    routed to are dead_experts with their layer and expert ids, with and without the reference (the dense MLPs of the
    attention layers are no expert set); the healthy twin is healthy both ways."""
    dead = {1: [2], 3: [0, 3]}
    ck, expected = _moe_case(tmp_path / "dead", "jamba", dead)
    assert len(expected) == 9
    _assert_dead_experts(ck, tmp_path / "dead" / "init", "jamba", dead, expected)
    _assert_healthy_twin(tmp_path / "healthy", "jamba")


def test_expert_sets_are_found_by_structure_on_every_layout():
    """Routers [E, d] with their experts: stacked (transformers 5 in memory, our own), per expert on disk (Mixtral,
    Qwen/OLMoE/DeepSeek naming), and nothing in a dense model (a layer stack is not a set of experts)."""
    shapes = {
        "model.layers.0.block_sparse_moe.gate.weight": (4, 32),
        **{f"model.layers.0.block_sparse_moe.experts.{k}.w{i}.weight": (64, 32) for k in range(4) for i in (1, 3)},
        **{f"model.layers.0.block_sparse_moe.experts.{k}.w2.weight": (32, 64) for k in range(4)},
        "model.layers.1.mlp.gate.weight": (4, 32),
        "model.layers.1.mlp.gate.e_score_correction_bias": (4,),
        "model.layers.1.mlp.experts.gate_up_proj": (4, 128, 32),
        "model.layers.1.mlp.experts.down_proj": (4, 32, 64),
        "model.layers.1.mlp.shared_experts.up_proj.weight": (64, 32),
        "blocks.0.router.weight": (4, 16),
        "blocks.0.w_in": (4, 16, 24),
        "model.embed_tokens.weight": (2, 32),  # as many rows as layers: not a router of the layers
        **{f"model.layers.{k}.input_layernorm.weight": (32,) for k in range(2)},
    }
    sets = {s.module: s for s in find_expert_sets(shapes)}
    assert sorted(sets) == ["blocks.0", "model.layers.0.block_sparse_moe", "model.layers.1.mlp"]
    mixtral = sets["model.layers.0.block_sparse_moe"]
    assert (mixtral.layout, mixtral.layer, mixtral.n_experts) == ("per-expert", 0, 4)
    assert [n for n, _ in mixtral.members[2]] == [
        f"model.layers.0.block_sparse_moe.experts.2.w{i}.weight" for i in (1, 2, 3)
    ]
    stacked = sets["model.layers.1.mlp"]
    assert stacked.layout == "stacked" and stacked.members[3] == [
        ("model.layers.1.mlp.experts.gate_up_proj", 3),
        ("model.layers.1.mlp.experts.down_proj", 3),
    ]
    assert sets["blocks.0"].router == "blocks.0.router.weight" and sets["blocks.0"].layer == 0


# ------------------------------------------------------------------------------------------------ PEFT alone
def _lora_run(out, detach: str | None = None):
    """peft LoRA on every projection of a bf16 Llama, in the Trainer (the saved adapters sort in another order
    than the optimizer lists them); ``detach``: a module whose adapters get no gradient."""
    import peft
    from plain_runs import hf_tiny_llama_bf16

    base = hf_tiny_llama_bf16()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=targets, lora_dropout=0.0))
    model.save_pretrained(out / "init")
    if detach:
        model.get_submodule(detach).register_forward_hook(lambda m, a, o: o.detach())
    from plain_runs import HFTokens

    return trainer_run(model, out, steps=4, lr=1e-3, data=HFTokens())


def test_peft_lora_with_a_bf16_base_maps_the_optimizer_alone_and_reads_healthy(tmp_path):
    pytest.importorskip("peft")
    ck = _lora_run(tmp_path / "healthy")
    for how, d in both(ck, tmp_path / "healthy" / "init").items():
        assert d.checkpoint["format"] == "peft"
        assert [(o["n_mapped"], o["n_params"]) for o in d.optimizers] == [(28, 28)], (how, d.optimizers)
        assert {e.name for e in d.evidence if e.optimizer} == {e.name for e in d.evidence} and all(
            ".lora_A." in e.name or ".lora_B." in e.name for e in d.evidence
        )
        assert d.status == "healthy", (how, verdict(d), d.inconclusive)
    # the twin: layer 1's v_proj adapters never get a gradient (the hook detaches their output)
    module = "base_model.model.model.layers.1.self_attn.v_proj"
    ck = _lora_run(tmp_path / "broken", detach=module)
    planted = sorted(f"{module}.lora_{x}.weight" for x in "AB")
    assert unchanged_on_disk(tmp_path / "broken" / "init", ck, "adapter_model.safetensors") == planted
    ds = both(ck, tmp_path / "broken" / "init")
    for how, d in ds.items():
        assert [(o["n_mapped"], o["n_params"]) for o in d.optimizers] == [(28, 28)], (how, d.optimizers)
        assert d.status in ("critical", "warning"), (how, verdict(d))
        assert sorted(t for f in d.findings for t in f.tensors) == planted, (how, verdict(d))
        assert {f.cause for f in d.findings} <= {"no_gradient", "idle_adapter"}, (how, verdict(d))
    assert verdict(ds["alone"]) == verdict(ds["with_reference"])


# ------------------------------------------------------------------------------------------------ property
@settings(
    max_examples=4,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],  # each example is a training run: no shrinking
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_alone_verdict_is_the_with_reference_verdict_or_inconclusive(tmp_path_factory, data):
    """Random plantings in a tiny transformers 5 Mixtral run in the Trainer: tensors frozen (requires_grad False,
    so the Trainer's optimizer leaves them out), a param group at lr 0 (a LambdaLR returning 0 for it), and
    experts never routed to. From the final checkpoint alone the verdict is the with-reference one (causes and
    tensors; a finding the reference would confirm may be a warning alone), or a part of it with the missing fact
    listed (inconclusive): never healthy, never a tensor that was not planted."""
    out = tmp_path_factory.mktemp("planted")
    torch.manual_seed(0)
    model = _model("mixtral")
    model.save_pretrained(out / "init")
    plain = sorted(n for n, _ in model.named_parameters() if ".self_attn." in n or "norm" in n)
    frozen = data.draw(st.sets(st.sampled_from(plain), max_size=2), label="frozen")
    zero_lr = data.draw(st.sets(st.sampled_from([n for n in plain if n not in frozen]), max_size=2), label="lr0")
    dead = data.draw(
        st.dictionaries(
            st.sampled_from([0, 1]), st.sets(st.sampled_from(range(4)), min_size=1, max_size=2), max_size=2
        ),
        label="never routed",
    )
    if not (frozen or zero_lr or dead):
        frozen = {plain[0]}
    named = dict(model.named_parameters())
    for n in frozen:
        named[n].requires_grad_(False)
    never_route(model, {k: sorted(v) for k, v in dead.items()})
    train = [p for n, p in named.items() if p.requires_grad and n not in zero_lr]
    groups = [{"params": train}] + ([{"params": [named[n] for n in sorted(zero_lr)]}] if zero_lr else [])
    opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 1.0, lambda s: 0.0][: len(groups)])
    ck = trainer_run(model, out, optimizers=(opt, sched))
    planted = (
        set(frozen)
        | set(zero_lr)
        | {
            f"model.layers.{l}.block_sparse_moe.experts.{k}.w{i}.weight"
            for l, ids in dead.items()
            for k in ids
            for i in (1, 2, 3)
        }
    )
    assert set(unchanged_on_disk(out / "init", ck)) == planted
    ds = both(ck, out / "init")
    ref, alone = ds["with_reference"], ds["alone"]
    assert {t for f in ref.findings for t in f.tensors} == planted, verdict(ref)
    assert alone.status != "healthy", verdict(alone)
    assert {t for f in alone.findings for t in f.tensors} <= planted, verdict(alone)
    # "cannot tell" is said as such: where shapes leave the optimizer's mapping ambiguous (an lr-0 group holding one
    # of q/k/v/o, all [32, 32]), the alone report lists the missing fact and names only what the reference confirms
    same = verdict(alone) == verdict(ref)
    honest = bool(alone.inconclusive) and all(v in verdict(ref) for v in verdict(alone))
    assert same or honest, (verdict(alone), verdict(ref), alone.inconclusive)
