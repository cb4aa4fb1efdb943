"""Nothing lost, nothing cryptic, round 2: the paths a command writes are checked before the long work and a write
that fails later is one line; every state dict that eval / generate / export load is checked against the model;
prompts longer than the model's context; YAML that says a key twice; presets that chain; nan and inf refused
wherever a number is read. Each broken input has a healthy twin that must work."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import one_line_error

from moe_arch.config import ConfigError, load_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    """One short run of the small model for the whole module: (final.pt, a copy with one extra model tensor)."""
    from conftest import trained_checkpoint

    root = tmp_path_factory.mktemp("faults_inputs")
    ckpt, _ = trained_checkpoint(root, data_cache, steps=2)
    state = torch.load(ckpt, weights_only=True)
    state["model"]["extra.weight"] = torch.zeros(3)
    extra = root / "extra.pt"
    torch.save(state, extra)
    return ckpt, extra


@pytest.fixture
def weights(tmp_path) -> Path:
    """A plain state dict the doctor diagnoses in a fraction of a second."""
    path = tmp_path / "w.pt"
    torch.save({"lin.weight": torch.randn(8, 8), "norm.weight": torch.ones(8)}, path)
    return path


def _full_disk(monkeypatch, root: Path):
    """Text writes under ``root`` fail as on a full disk (the preflight probes write bytes: they still pass, as
    they would on a disk that fills up during the analysis)."""
    real = Path.write_text

    def write_text(self, *a, **k):
        if str(self).startswith(str(root)):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", write_text)


# ------------------------------------------------------------------------------- 6, 7: diagnose output paths
def test_diagnose_json_into_a_folder_is_refused_before_the_analysis(weights, tmp_path, cli, monkeypatch):
    from moe_arch.doctor import cli as doctor_cli

    folder = tmp_path / "reports"
    folder.mkdir()
    (tmp_path / "plain").write_text("x")
    real = doctor_cli.diagnose
    monkeypatch.setattr(doctor_cli, "diagnose", lambda *a, **k: pytest.fail("the analysis ran"))
    one_line_error(
        cli("diagnose", weights, "--json", f"{folder}/", "--quiet"), "--json", "is a folder", "diagnosis.json"
    )
    one_line_error(cli("diagnose", weights, "--json", folder, "--quiet"), "is a folder")
    one_line_error(
        cli("diagnose", weights, "--json", tmp_path / "plain" / "d.json", "--quiet"), "plain is a file, not a folder"
    )
    one_line_error(
        cli("diagnose", weights, "--out", tmp_path / "plain", "--quiet"), "--out", "plain is a file, not a folder"
    )
    monkeypatch.setattr(doctor_cli, "diagnose", real)
    out = cli("diagnose", weights, "--json", folder / "d.json", "--out", tmp_path / "rep", "--quiet")
    assert out.returncode == 0, out.stderr
    assert json.loads((folder / "d.json").read_text())["schema"] == "moe_arch.diagnosis/1"
    assert (tmp_path / "rep" / "report.md").is_file()


def test_a_disk_that_fills_during_the_analysis_is_one_line_and_the_report_stays_whole(
    weights, tmp_path, cli, monkeypatch
):
    rep = tmp_path / "rep"
    assert cli("diagnose", weights, "--out", rep, "--json", rep / "d.json", "--quiet").returncode == 0
    before = {p.name: p.read_bytes() for p in rep.iterdir()}
    _full_disk(monkeypatch, rep)
    one_line_error(
        cli("diagnose", weights, "--out", rep, "--quiet"),
        "--out",
        "no space left on the device",
        "choose another --out",
    )
    one_line_error(
        cli("diagnose", weights, "--out", tmp_path / "other", "--json", rep / "d.json", "--quiet"),
        "--json",
        "no space left",
    )
    assert {p.name: p.read_bytes() for p in rep.iterdir()} == before  # whole, and no temporary file left


def test_eval_json_into_a_folder_is_refused_before_the_evaluation(trained, tmp_path, cli, monkeypatch):
    from moe_arch.evaluation import loss

    monkeypatch.setattr(loss, "run_eval", lambda *a, **k: pytest.fail("the evaluation ran"))
    one_line_error(cli("eval", trained[0], "--json", tmp_path), "--json", "is a folder", "eval.json")


def test_lm_eval_output_into_a_folder_is_refused_before_the_tasks(trained, tmp_path, cli, monkeypatch):
    pytest.importorskip("lm_eval")
    from moe_arch.evaluation import harness

    monkeypatch.setattr(harness, "MoeArchLM", lambda *a, **k: pytest.fail("the model was loaded"))
    one_line_error(cli("lm-eval", trained[0], "--tasks", "t", "--output", f"{tmp_path}/"), "--output", "is a folder")


# ------------------------------------------------------------------------------- 8: state dicts that do not fit
@pytest.mark.parametrize(
    "command",
    [
        ["eval", "--max-tokens", "64"],
        ["generate", "--prompt", "The", "--max-new-tokens", "3"],
        ["export", "--hf", "HF"],
    ],
)
def test_a_checkpoint_with_an_extra_tensor_is_one_line_and_its_healthy_twin_works(trained, tmp_path, cli, command):
    good, extra = trained
    args = [str(tmp_path / "hf") if a == "HF" else a for a in command[1:]]
    one_line_error(cli(command[0], extra, *args), str(extra), "'extra.weight' is not in this model", "diagnose")
    assert not (tmp_path / "hf").exists()
    out = cli(command[0], good, *args)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda m: m.pop("final_norm.weight"), "'final_norm.weight' is missing"),
        (lambda m: m.update({"embed.weight": torch.zeros(3, 3)}), "'embed.weight' has shape [3, 3]"),
        (lambda m: m.update({"final_norm.weight": "text"}), "'final_norm.weight' is a str"),
    ],
)
def test_every_mismatch_goes_through_the_checked_loader(trained, tmp_path, cli, edit, needle):
    state = torch.load(trained[0], weights_only=True)
    edit(state["model"])
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    one_line_error(cli("generate", bad, "--prompt", "a", "--max-new-tokens", "1"), needle)


def test_init_from_a_folder_with_an_extra_tensor_is_one_line(trained, tmp_path, cli):
    from safetensors.torch import load_file, save_file

    from moe_arch.hf.export import ExportError, init_from_config

    folder = tmp_path / "hf"
    assert cli("export", trained[0], "--hf", folder).returncode == 0
    cfg, state = init_from_config(load_config("tiny"), folder)  # the healthy twin
    assert cfg.model.d_model == 64 and "embed.weight" in state
    weights = load_file(str(folder / "model.safetensors"))
    save_file({**weights, "model.extra.weight": torch.zeros(2)}, str(folder / "model.safetensors"))
    with pytest.raises(ExportError, match="'extra.weight' is not in this model"):
        init_from_config(load_config("tiny"), folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ExportError, match="config.json: not JSON"):
        init_from_config(load_config("tiny"), folder)


# ------------------------------------------------------------------------------- 9: export --hf destinations
def test_export_destination_and_shard_size_are_checked_before_the_load(trained, tmp_path, cli, monkeypatch):
    from moe_arch.evaluation import loss

    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("x")
    monkeypatch.setattr(loss, "load_for_eval", lambda *a, **k: pytest.fail("the checkpoint was loaded"))
    one_line_error(cli("export", trained[0], "--hf", tmp_path / "file"), "--hf", "is a file, not a folder")
    one_line_error(cli("export", trained[0], "--hf", tmp_path / "full"), "not empty")
    one_line_error(cli("export", trained[0], "--hf", tmp_path / "file" / "hf"), "file is a file, not a folder")
    for size in ("5XB", "nanGB", "0MB", "-1GB", "GB"):
        one_line_error(
            cli("export", trained[0], "--hf", tmp_path / "hf", f"--max-shard-size={size}"),
            "--max-shard-size",
            repr(size),
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full"]  # nothing made, nothing partial


def test_export_shard_sizes_in_every_unit_work(trained, tmp_path, cli):
    from moe_arch.utils import parse_size

    assert [parse_size(s, "x") for s in ("500MB", "2GiB", "1.5KB", "100", " 3 kib ")] == [
        500 * 10**6,
        2 * 2**30,
        1500,
        100,
        3 * 1024,
    ]
    out = cli("export", trained[0], "--hf", tmp_path / "hf", "--max-shard-size", "0.2MiB")
    assert out.returncode == 0, out.stderr
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / "hf" / s).stat().st_size < 2 * 0.2 * 2**20 for s in shards)


def test_a_full_disk_during_export_is_one_line_and_leaves_nothing(trained, tmp_path, cli, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    one_line_error(
        cli("export", trained[0], "--hf", tmp_path / "hf"),
        "--hf",
        "no space left on the device",
        "nothing was left there",
    )
    assert os.listdir(tmp_path) == []  # no folder, no hidden temporary folder
    monkeypatch.undo()
    _full_disk(monkeypatch, tmp_path)  # the config and code files fail instead of the weights
    one_line_error(cli("export", trained[0], "--hf", tmp_path / "hf"), "no space left on the device")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------- 10: prompts beyond the context
def _new_tokens(err: str) -> int:
    return int(re.search(r"; (\d+) new tokens in", err).group(1))


def test_a_prompt_longer_than_the_context_keeps_its_end_with_a_note(trained, cli):
    long = "the router sends every token to two experts " * 250  # 11k characters, thousands of tokens
    out = cli("generate", trained[0], "--prompt", long, "--max-new-tokens", "6", "--temperature", "0")
    assert out.returncode == 0, out.stderr[-2000:]
    note = [l for l in out.stderr.splitlines() if l.startswith("note:")]
    assert len(note) == 1 and "are dropped so that it and --max-new-tokens 6 fit model.max_seq_len=256" in note[0]
    assert _new_tokens(out.stderr) == 6
    assert len(out.stdout) < len(long) / 2  # the dropped start is not printed back
    short = cli("generate", trained[0], "--prompt", "the router", "--max-new-tokens", "6", "--temperature", "0")
    assert short.returncode == 0 and "note:" not in short.stderr and _new_tokens(short.stderr) == 6
    one_line_error(
        cli("generate", trained[0], "--prompt", "a", "--max-new-tokens", "256"),
        "--max-new-tokens 256",
        "model.max_seq_len=256",
    )


def test_generate_refuses_a_negative_token_budget():
    from moe_arch.config import ModelConfig
    from moe_arch.model.generation import generate
    from moe_arch.model.transformer import build_model

    model = build_model(
        ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=16, max_seq_len=16)
    ).eval()
    with pytest.raises(ValueError, match="max_new_tokens=-3: must be >= 0"):
        generate(model, torch.tensor([[1, 2]]), -3)
    assert generate(model, torch.tensor([[1, 2]]), 3, temperature=0).tokens.shape == (1, 3)


# ------------------------------------------------------------------------------- 11: keys given twice
def test_a_yaml_key_given_twice_is_refused_naming_key_and_lines(tmp_path, cli):
    path = tmp_path / "dup.yaml"
    path.write_text("preset: tiny\ntrain:\n  steps: 5\n  seq_len: 64\n  steps: 7\n")
    one_line_error(cli("config", path), "dup.yaml", "line 5", "'train.steps' is set twice", "also on line 3")
    path.write_text("preset: tiny\nmodel:\n  d_model: 64\nmodel:\n  n_layers: 2\n")  # a whole section twice
    one_line_error(cli("config", path), "line 4", "'model' is set twice")
    one_line_error(cli("info", "tiny", "--model.moe_layers", "{a: 1, a: 2}"), "'a' is set twice")
    # the healthy twins: each key once, and YAML merge keys, which exist to be overridden
    path.write_text("preset: tiny\nbase: &b {steps: 5, seq_len: 64}\ntrain:\n  <<: *b\n  steps: 7\n")
    with pytest.raises(ConfigError, match="unknown section 'base'"):  # parsed, not refused as a duplicate
        load_config(str(path))
    path.write_text("preset: tiny\ntrain:\n  steps: 7\n  seq_len: 64\n")
    assert load_config(str(path)).train.steps == 7


# ------------------------------------------------------------------------------- 12: presets chain
def test_presets_and_files_chain_with_a_cycle_check(tmp_path, cli, monkeypatch):
    exps = tmp_path / "exps"
    exps.mkdir()
    (exps / "base.yaml").write_text("preset: medium\ntrain:\n  steps: 11\n  seq_len: 64\n")
    (exps / "exp.yaml").write_text("preset: base.yaml\ntrain:\n  steps: 13\n")
    monkeypatch.chdir(tmp_path)  # base.yaml is found next to exp.yaml, not in the working directory
    cfg = load_config(str(exps / "exp.yaml"))
    assert (cfg.model.d_model, cfg.model.n_experts) == (192, 8)  # medium's, through base.yaml
    assert (cfg.train.steps, cfg.train.seq_len) == (13, 64)  # each file overrides the one it starts from
    assert {"train.steps", "train.seq_len"} <= cfg.explicit and "model.d_model" not in cfg.explicit
    out = cli("config", exps / "exp.yaml")
    assert out.returncode == 0 and yaml.safe_load(out.stdout)["model"]["n_experts"] == 8
    (exps / "base.yaml").write_text("preset: exp.yaml\n")
    one_line_error(cli("config", exps / "exp.yaml"), "leads back to itself", "exp.yaml -> ", "base.yaml -> ")
    (exps / "base.yaml").write_text("preset: base.yaml\n")
    one_line_error(cli("config", exps / "base.yaml"), "leads back to itself")
    (exps / "base.yaml").write_text("preset: [medium]\n")
    one_line_error(cli("config", exps / "exp.yaml"), "preset=['medium']", "must name a preset")
    (exps / "base.yaml").write_text("preset: mediun\n")
    one_line_error(cli("config", exps / "exp.yaml"), "'mediun'", "did you mean 'medium'")


# ------------------------------------------------------------------------------- 13: nan and inf
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_info_memory_refuses_non_finite_gpu_memory(cli, value):
    one_line_error(cli("info", "seed-3b", "--memory", f"--gpu-memory={value}"), "--gpu-memory", repr(value), "finite")


def test_info_memory_with_a_finite_gpu_memory_works_and_the_planner_checks_too(cli):
    from moe_arch.training.memory import plan_memory

    out = cli("info", "seed-3b", "--memory", "--gpu-memory", "80", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["max_batch_size"] >= 1
    with pytest.raises(ValueError, match="gpu_memory_gb nan: must be a finite number"):
        plan_memory(load_config("tiny"), gpu_memory_gb=float("nan"))
    # a sequence beyond the model's context took minutes of planning; it is refused as train.seq_len would be
    one_line_error(
        cli("info", "seed-3b", "--memory", "--seq-len", "1000000000000"),
        "--seq-len 1000000000000",
        "model.max_seq_len=2048",
    )
    assert cli("info", "seed-3b", "--memory", "--seq-len", "2048").returncode == 0


@pytest.mark.parametrize(
    "args, needle",
    [
        (["generate", "x.pt", "--prompt", "a", "--top-p", "nan"], "--top-p: 'nan'"),
        (["generate", "x.pt", "--prompt", "a", "--temperature", "inf"], "--temperature: 'inf'"),
        (["lm-eval", "x.pt", "--tasks", "t", "--limit", "nan"], "--limit: 'nan'"),
        (["eval", "x.pt", "--max-tokens", "1e3"], "--max-tokens: '1e3': expected an integer"),
        (["info", "tiny", "--memory", "--gpus"], "--gpus: expected one argument"),
        (["lm-eval", "x.pt", "--tasks", "t", "--batch-size", "8x"], "--batch-size '8x': expected an integer"),
        (["lm-eval", "x.pt", "--tasks", "t", "--limit=-1"], "--limit -1: must be > 0"),
    ],
)
def test_every_numeric_flag_refuses_non_finite_values_in_one_line(cli, args, needle):
    one_line_error(cli(*args), needle)


@pytest.mark.parametrize(
    "field, value",
    [
        ("train.grad_clip", ".nan"),
        ("monitor.spike_zscore", ".inf"),
        ("optim.muon_lr", "nan"),
        ("model.rope_theta", "inf"),
        ("optim.adamw_betas", "[0.9, .nan]"),
        ("train.peak_flops", "1e999"),
        ("data.val_fraction", "-.inf"),
        ("model.mtp_loss_weight", "1" + "0" * 400),
    ],
)
def test_config_floats_refuse_nan_and_inf(tmp_path, cli, field, value):
    section, name = field.split(".")
    path = tmp_path / "c.yaml"
    path.write_text(f"preset: tiny\n{section}:\n  {name}: {value}\n")
    one_line_error(cli("config", path), field, "finite")
    one_line_error(cli("config", "tiny", f"--{field}", value), field, "finite")


def test_config_floats_that_are_finite_still_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "preset: tiny\ntrain:\n  grad_clip: 0.5\n  peak_flops: 1e12\noptim:\n  muon_lr: 1e-3\n"
        "  adamw_betas: [0.9, 0.99]\nmonitor:\n  spike_zscore: 4\n"
    )
    cfg = load_config(str(path), ["--model.rope_theta", "5e5"])
    assert (
        cfg.train.grad_clip,
        cfg.train.peak_flops,
        cfg.optim.muon_lr,
        cfg.optim.adamw_betas,
        cfg.monitor.spike_zscore,
        cfg.model.rope_theta,
    ) == (0.5, 1e12, 1e-3, [0.9, 0.99], 4.0, 5e5)


# ------------------------------------------------------------------------------- passing already: keep them so
def test_special_files_stay_one_line(tmp_path, weights, cli):
    (tmp_path / "empty.pt").write_bytes(b"")
    one_line_error(cli("diagnose", tmp_path / "empty.pt", "--quiet"), "empty file (0 bytes)")
    os.mkfifo(tmp_path / "fifo.pt")
    one_line_error(cli("diagnose", tmp_path / "fifo.pt", "--quiet"), "fifo.pt")
    os.symlink(tmp_path / "loop_a", tmp_path / "loop_b")
    os.symlink(tmp_path / "loop_b", tmp_path / "loop_a")
    one_line_error(cli("diagnose", tmp_path / "loop_a", "--quiet"), "loop_a")
    one_line_error(
        cli("diagnose", weights, "--out", tmp_path / "loop_a", "--quiet"),
        "--out",
        "symbolic link that leads nowhere (or loops)",
    )


# ------------------------------------------------------------------------------- round 3: fault injection
def test_yaml_keys_that_are_not_names_are_one_line(tmp_path, cli):
    (tmp_path / "a.yaml").write_text("1: {d_model: 3}\n")
    one_line_error(cli("config", tmp_path / "a.yaml"), "unknown section 1")
    (tmp_path / "b.yaml").write_text("model: {1: 3}\n")
    one_line_error(cli("config", tmp_path / "b.yaml"), "model.1: unknown field")
    (tmp_path / "c.yaml").write_text("model: {d_model: 64}\n")
    assert cli("config", tmp_path / "c.yaml").returncode == 0


@pytest.mark.parametrize(
    "override, needle",
    [
        (["--model.n_experts", "-1", "--model.moe_layers", "[]"], "model.n_experts=-1: must be >= 0"),
        (["--train.seed", str(2**70)], "train.seed"),
        (["--data.shard_tokens", str(2**70)], "64 bits"),
        (["--train.sample_tokens", str(2**63)], "64 bits"),
        (["--train.device", "cuda:x"], "train.device"),
        (["--train.device", "cudaxyz"], "train.device"),
        (["--train.run_name", "a/../../x"], "plain folder name"),
        (["--train.run_name", ".."], "plain folder name"),
        (["--train.run_name", ""], "plain folder name"),
        (["--train.out_dir", ""], "train.out_dir='': must name a folder"),
    ],
)
def test_config_values_that_failed_late_are_refused_at_load(cli, override, needle):
    one_line_error(cli("config", "tiny", *override), needle)


def test_their_healthy_twins_load_and_text_fields_take_the_text_as_typed():
    cfg = load_config(
        "tiny",
        [
            "--train.seed",
            str(2**32 - 1),
            "--train.device",
            "cuda:1",
            "--train.run_name",
            "123",
            "--train.sample_prompt",
            "Hello, world",
            "--data.source",
            "hf:x",
            "--model.n_experts",
            "0",
            "--model.moe_layers",
            "[]",
            "--train.out_dir",
            "'runs'",
        ],
    )
    assert (
        cfg.train.seed,
        cfg.train.device,
        cfg.train.run_name,
        cfg.train.sample_prompt,
        cfg.data.source,
        cfg.train.out_dir,
    ) == (2**32 - 1, "cuda:1", "123", "Hello, world", "hf:x", "runs")


def test_an_override_without_a_value_before_another_option_is_named(cli):
    one_line_error(
        cli("config", "--model.d_model", "--train.steps", "5"), "--model.d_model: missing value", "--train.steps"
    )
    assert cli("config", "--model.d_model", "64", "--train.steps", "5").returncode == 0


@pytest.mark.parametrize(
    "args",
    [
        ["config", ""],
        ["info", ""],
        ["train", "tiny", "--resume", ""],
        ["train", "tiny", "--init-from", ""],
        ["diagnose", ""],
        ["eval", "x.pt", "--json", ""],
        ["diagnose", "x.pt", "--logs", ""],
        ["export", "x", ""],
        ["export", "x", "--hf", ""],
        ["generate", "", "--prompt", "a"],
        ["reproduce-seed", "--out", ""],
        ["lm-eval", "x.pt", "--tasks", ""],
    ],
)
def test_an_empty_path_or_name_is_refused_not_read_as_the_default(cli, args):
    one_line_error(cli(*args), "empty (an unset shell variable?)")


def test_unknown_or_missing_devices_are_one_line(trained, cli, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for cmd in (
        ["generate", trained[0], "--prompt", "a"],
        ["eval", trained[0]],
        ["lm-eval", trained[0], "--tasks", "t"],
    ):
        one_line_error(cli(*cmd, "--device", "xyz"), "--device", "not a device")
        one_line_error(cli(*cmd, "--device", "cuda"), "CUDA is not available")
    one_line_error(cli("train", "tiny", "--train.device", "cuda"), "train.device", "CUDA is not available")
    assert cli("generate", trained[0], "--prompt", "a", "--max-new-tokens", "2", "--device", "cpu").returncode == 0


def test_generate_seed_and_sample_count_are_bounded(trained, cli):
    one_line_error(cli("generate", trained[0], "--prompt", "a", "--seed", str(2**70)), "--seed")
    one_line_error(cli("generate", trained[0], "--prompt", "a", "--num-samples", str(2**63)), "--num-samples")
    out = cli(
        "generate", trained[0], "--prompt", "a", "--max-new-tokens", "2", "--seed", str(2**63 - 1), "--num-samples", "2"
    )
    assert out.returncode == 0, out.stderr


def test_outputs_over_their_own_inputs_are_refused(trained, weights, tmp_path, cli):
    import shutil

    ckpt = tmp_path / "c.pt"
    shutil.copy(trained[0], ckpt)
    before = ckpt.read_bytes()
    one_line_error(cli("eval", ckpt, "--json", ckpt), "--json", "is the checkpoint")
    one_line_error(cli("lm-eval", ckpt, "--tasks", "t", "--output", ckpt), "--output", "is the checkpoint")
    one_line_error(cli("diagnose", weights, "--json", weights, "--quiet"), "--json", "is the checkpoint")
    logs = tmp_path / "m.jsonl"
    logs.write_text('{"step": 1, "loss": 2.0}\n')
    one_line_error(cli("diagnose", weights, "--logs", logs, "--json", logs, "--quiet"), "is the history (--logs)")
    assert ckpt.read_bytes() == before and logs.read_text() == '{"step": 1, "loss": 2.0}\n'
    out = cli("diagnose", weights, "--logs", logs, "--json", tmp_path / "d.json", "--quiet")
    assert out.returncode == 0 and json.loads((tmp_path / "d.json").read_text())["schema"] == "moe_arch.diagnosis/1"


def test_eval_refuses_a_window_beyond_the_models_context(trained, cli):
    one_line_error(
        cli("eval", trained[0], "--seq-len", "100000", "--quiet"), "--seq-len 100000", "model.max_seq_len=256"
    )
    out = cli("eval", trained[0], "--seq-len", "256", "--max-tokens", "64", "--quiet")
    assert out.returncode == 0 and json.loads(out.stdout)["seq_len"] == 256


def test_lm_eval_with_no_task_names_is_one_line(trained, cli):
    one_line_error(cli("lm-eval", trained[0], "--tasks", ",", "--limit", "1"), "--tasks", "no task names")


def test_diagnose_history_with_infinite_steps_and_a_misspelt_model(weights, tmp_path, cli):
    jl, csv = tmp_path / "m.jsonl", tmp_path / "m.csv"
    jl.write_text('{"step": 1e400, "loss": 1}\n{"step": ' + "9" * 400 + ', "loss": 2}\n{"step": 3, "loss": 3}\n')
    csv.write_text("step,loss\n1,2\ninf,3\nnan,4\n-1e400,5\n2,1\n")
    for logs in (jl, csv):
        out = cli("diagnose", weights, "--logs", logs, "--quiet", "--json", tmp_path / "d.json")
        assert out.returncode == 0, out.stderr
    one_line_error(cli("diagnose", weights, "--model", "tinyy", "--quiet"), "diagnose --model", "tinyy")
    assert cli("diagnose", weights, "--model", "tiny", "--quiet", "--no-probe").returncode == 0
