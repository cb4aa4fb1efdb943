import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from plain_runs import Net, train

from moe_arch.checkpoint.readers import LoadError, open_checkpoint
from moe_arch.doctor.pipeline import DiagnoseOptions, diagnose

BUGS = ["bf16", "not_in_optimizer", "unused", "zero_lr", "excessive", "dead_experts"]


def diagnose_dir(d, **kw):
    return diagnose(str(d / "final.pt"), DiagnoseOptions(against=str(d / "init.pt"), **kw))


def test_healthy_plain_run_is_healthy(tmp_path):
    train(tmp_path)
    d = diagnose_dir(tmp_path)
    assert d.status == "healthy", [f.summary for f in d.findings]
    assert d.findings == []


@pytest.mark.parametrize("bug", BUGS)
def test_each_planted_bug_is_named_on_exactly_its_tensors(tmp_path, bug):
    planted = train(tmp_path, bug)
    d = diagnose_dir(tmp_path)
    causes = {f.cause for f in d.findings}
    assert planted["cause"] in causes, [(f.cause, f.tensors) for f in d.findings]
    finding = next(f for f in d.findings if f.cause == planted["cause"])
    assert sorted(finding.tensors) == sorted(planted["tensors"])
    # No other finding blames anything else (bf16 parameters keep torch AdamW's moments in bf16: that is its own
    # finding, beside the frozen norms).
    others = [
        f for f in d.findings if f is not finding and not (bug == "bf16" and f.cause == "low_precision_optimizer_state")
    ]
    assert others == [], [(f.cause, f.tensors) for f in others]
    expected_severity = "warning" if bug in ("excessive", "dead_experts") else "critical"
    assert finding.severity == expected_severity and d.status == expected_severity
    if bug == "dead_experts":
        assert finding.experts == planted["experts"]
    assert finding.recommendation


def test_bf16_evidence_numbers(tmp_path):
    train(tmp_path, "bf16")
    d = diagnose_dir(tmp_path)
    f = d.findings[0]
    assert f.evidence["dtype"] == "bfloat16"
    assert f.evidence["half_ulp_at_1.0"] == pytest.approx(2**-8)
    assert f.evidence["median_abs_value"] == 1.0 and f.evidence["fraction_of_elements_lost"] == 1.0
    assert f.evidence["median_expected_update"] < 2**-8
    assert f.evidence["unchanged_since_reference"] is True
    assert "below half a ULP" in f.summary and "every update rounded away" in f.summary
    # Without a reference the precision rule alone still finds it, and says the values sit at their init.
    d2 = diagnose(str(tmp_path / "final.pt"))
    f2 = d2.findings[0]
    assert f2.cause == "precision_underflow" and f2.evidence["constant_values"] == [1.0]
    assert any("no reference checkpoint" in n for n in d2.notes)


def test_zero_grad_between_backward_and_step_is_explained(tmp_path):
    train(tmp_path, "zero_grad_order", steps=5)
    d = diagnose_dir(tmp_path)
    f = d.findings[0]
    assert f.cause == "no_gradient" and f.evidence.get("all_tensors") is True
    assert "zero_grad() runs between loss.backward() and optimizer.step()" in f.recommendation
    assert len(f.tensors) == len(list(Net().parameters()))


def test_formats_prefixes_and_optimizer_layouts(tmp_path):
    planted = train(tmp_path, "bf16")
    model, opt = planted["model"], planted["optimizer"]
    sd = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    layouts = {
        "bare.pt": sd,
        "model_state_dict.pt": {"model_state_dict": sd, "optimizer_state_dict": opt.state_dict(), "epoch": 3},
        "state_dict_list.pt": {"state_dict": sd, "optimizers": [opt.state_dict()]},
        "module_named.pt": {"module": sd, "optimizers": {"adamw": opt.state_dict()}, "global_step": 30},
    }
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / name)
        d = diagnose(str(tmp_path / name))
        assert not any(n.startswith("module.") or "_orig_mod" in n for n in (e.name for e in d.evidence)), name
        if name == "bare.pt":
            assert d.optimizers == [] and any("bare state dict" in n for n in d.notes)
            assert d.findings == [] or all(f.cause != "not_in_optimizer" for f in d.findings)
        else:
            assert d.findings[0].cause == "precision_underflow", name
            assert sorted(d.findings[0].tensors) == sorted(planted["tensors"]), name
    assert diagnose(str(tmp_path / "module_named.pt")).checkpoint["step"] == 30


def test_safetensors_weights_only(tmp_path):
    from safetensors.torch import save_file

    planted = train(tmp_path, "bf16")
    sd = {k: v.contiguous() for k, v in planted["model"].state_dict().items()}
    save_file(sd, tmp_path / "model.safetensors", metadata={"step": "30"})
    view = open_checkpoint(tmp_path / "model.safetensors")
    assert view.format == "safetensors" and view.meta["step"] == 30
    for k, v in sd.items():
        assert torch.equal(view.tensors[k].get(), v)
    d = diagnose(str(tmp_path / "model.safetensors"))
    assert any("no optimizer state" in n for n in d.notes)


def test_ambiguous_shape_mapping_is_reported_not_guessed(tmp_path):
    a, b = (torch.nn.Parameter(torch.randn(4, 4)) for _ in range(2))
    c = torch.nn.Parameter(torch.randn(2, 2))
    opt = torch.optim.AdamW([b, c], lr=1e-3)  # plain params: no param_names; a and b share a shape
    (b.sum() + c.sum()).backward()
    opt.step()
    torch.save({"model": {"a": a.data, "b": b.data, "c": c.data}, "optimizer": opt.state_dict()}, tmp_path / "x.pt")
    d = diagnose(str(tmp_path / "x.pt"))
    o = d.optimizers[0]
    assert o["mapping"] == "shape-order" and o["n_mapped"] == 1 and len(o["ambiguous"]) == 1
    assert o["ambiguous"][0]["candidates"] == ["a", "b"]  # reported, not guessed
    assert {e.name: e.optimizer for e in d.evidence}["c"] == "optimizer"
    assert not any(f.cause == "not_in_optimizer" and {"a", "b"} & set(f.tensors) for f in d.findings)


def test_param_groups_out_of_model_order_map_exactly(tmp_path):
    planted = train(tmp_path, "zero_lr")  # norms in a second group: not a subsequence of the model order
    d = diagnose_dir(tmp_path)
    o = d.optimizers[0]
    assert o["mapping"] == "shape-order" and o["n_mapped"] == o["n_params"] and not o["ambiguous"]
    groups = {e.name: e.group_index for e in d.evidence}
    assert all(groups[n] == 1 for n in planted["tensors"])


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_unsafe_pickles_are_refused_unless_trusted(tmp_path):
    torch.save({"model": {"w": torch.ones(3)}, "extra": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(LoadError, match="refusing to unpickle arbitrary code.*--trust-pickle"):
        open_checkpoint(tmp_path / "evil.pt")
    assert "w" in open_checkpoint(tmp_path / "evil.pt", trust_pickle=True).tensors


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "moe_arch", "diagnose", *args], capture_output=True, text=True, cwd=ROOT
    )


def test_cli_exit_codes_reports_and_json(tmp_path):
    train(tmp_path, "bf16")
    out = cli(
        str(tmp_path / "final.pt"),
        "--against",
        str(tmp_path / "init.pt"),
        "--out",
        str(tmp_path / "rep"),
        "--json",
        str(tmp_path / "d.json"),
        "--fail-on",
        "critical",
        "--quiet",
    )
    assert out.returncode == 1, out.stderr
    doc = json.loads((tmp_path / "d.json").read_text())
    assert doc["schema"] == "moe_arch.diagnosis/1" and doc["status"] == "critical"
    f = doc["findings"][0]
    assert set(f) >= {"cause", "severity", "tensors", "evidence", "recommendation", "summary"}
    md = (tmp_path / "rep" / "report.md").read_text()
    for section in (
        "## Executive summary",
        "## Checkpoint",
        "## Critical findings",
        "## What is working",
        "## Optimizer configuration",
        "## Root cause",
        "## Recommended actions",
    ):
        assert section in md
    assert "blocks.\\*.norm.weight" in md or "blocks.*.norm.weight" in md
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "<img" in html and "data:image/png;base64," in html
    ok = cli(str(tmp_path / "final.pt"), "--fail-on", "warning", "--quiet", "--out", str(tmp_path / "rep2"))
    assert ok.returncode == 1
    plain = cli(str(tmp_path / "final.pt"), "--quiet", "--out", str(tmp_path / "rep3"))
    assert plain.returncode == 0


def test_cli_unusable_input_is_exit_2_one_line(tmp_path):
    train(tmp_path)
    data = (tmp_path / "final.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"model": {"embed.weight": torch.zeros(3, 3)}}, tmp_path / "shape.pt")
    for args, match in (
        ([str(tmp_path / "missing.pt")], "no such file"),
        ([str(tmp_path / "trunc.pt")], "truncated or corrupt"),
        ([str(tmp_path / "empty.pt")], "empty file"),
        ([str(tmp_path / "final.pt"), "--against", str(tmp_path / "shape.pt")], "shape"),
    ):
        out = cli(*args, "--quiet")
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1 and match in out.stderr


def test_hugging_face_trainer_checkpoint_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from plain_runs import HFTokens, hf_tiny_llama_bf16
    from transformers import Trainer, TrainingArguments

    transformers.logging.set_verbosity_error()
    model = hf_tiny_llama_bf16()  # the seed bug, in someone else's trainer
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=3e-4,
        save_steps=6,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=100,
    )
    Trainer(model=model, args=args, train_dataset=HFTokens()).train()
    d = diagnose(str(tmp_path / "checkpoint-6"))
    assert d.checkpoint["format"] == "hf-trainer" and d.checkpoint["step"] == 6
    o = d.optimizers[0]
    assert o["n_mapped"] == o["n_params"] and not o["ambiguous"]
    f = d.findings[0]
    norms = sorted(e.name for e in d.evidence if e.name.endswith("norm.weight"))
    assert f.cause == "precision_underflow" and sorted(f.tensors) == norms and len(norms) == 5
    assert not any(g.cause == "zero_learning_rate" for g in d.findings)  # lr decayed to 0 by the schedule: fine


def _tiny_run(tmp_path, precision):
    from moe_arch.config import load_config
    from moe_arch.training.trainer import Trainer

    cfg = load_config(
        "tiny",
        [
            "--train.out_dir",
            str(tmp_path),
            "--train.run_name",
            precision,
            "--train.precision",
            precision,
            "--optim.muon_lr",
            "1e-3",
            "--optim.adamw_lr",
            "3e-4",
            "--train.steps",
            "12",
            "--train.warmup_steps",
            "0",
            "--train.batch_size",
            "8",
            "--train.seq_len",
            "64",
            "--train.eval_every",
            "0",
            "--train.sample_tokens",
            "0",
            "--train.tensorboard",
            "false",
            "--monitor.enabled",
            "false",
            "--train.eval_max_tokens",
            "2048",
        ],
    )
    Trainer(cfg).run()
    return tmp_path / precision / "checkpoints" / "final.pt"


def test_tiny_preset_bf16_pure_is_precision_underflow_and_bf16_mixed_is_healthy(tmp_path):
    from moe_arch.config import load_config

    n_norms = 2 * load_config("tiny").model.n_layers + 1
    d = diagnose(str(_tiny_run(tmp_path, "bf16-pure")))
    assert d.status == "critical" and d.checkpoint["reference"].endswith("step_0000000.pt")
    crit = [f for f in d.findings if f.severity == "critical"]
    assert [f.cause for f in crit] == ["precision_underflow"]
    norms = {e.name for e in d.evidence if e.role == "norm"}
    assert len(norms) == n_norms and norms <= set(crit[0].tensors)
    unchanged = {e.name for e in d.evidence if e.unchanged}
    assert set(crit[0].tensors) == unchanged  # exactly the tensors that never moved
    assert d.probe is not None and d.probe["no_grad"] == []  # gradients do reach them: not a MoD problem
    healthy = diagnose(str(_tiny_run(tmp_path, "bf16-mixed")))
    assert healthy.status == "healthy", [f.summary for f in healthy.findings]


def test_legacy_non_zip_torch_files_are_read_without_mmap(tmp_path):
    torch.save({"model": {"w": torch.ones(4)}, "step": 5}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    view = open_checkpoint(tmp_path / "legacy.pt")
    assert not view.mmapped and view.meta["step"] == 5 and torch.equal(view.tensors["w"].get(), torch.ones(4))
