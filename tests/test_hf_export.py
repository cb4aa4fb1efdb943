"""Hugging Face export and import: the folder loads with AutoModelForCausalLM (trust_remote_code) and gives our
logits and greedy tokens; AutoTokenizer reads the tokenizer; `train --init-from` starts from it."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, data_cache):
    from conftest import trained_checkpoint

    from moe_arch import cli

    root = tmp_path_factory.mktemp("hf_export")
    ckpt, cfg = trained_checkpoint(root, data_cache, steps=3)
    out = root / "hf"
    assert cli.main(["export", str(ckpt), "--hf", str(out), "--max-shard-size", "300KB"]) == 0
    return ckpt, out, cfg


def test_the_exported_folder_loads_in_transformers_with_our_logits(exported, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_arch.evaluation.loss import load_for_eval

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt, out, _ = exported
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded above --max-shard-size
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    ours = load_for_eval(ckpt, torch.device("cpu"))
    tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    assert tok.eos_token_id == ours.tokenizer.eos_id
    ids = torch.tensor([tok("The router sends tokens to experts")["input_ids"]])
    assert ids.tolist()[0] == ours.tokenizer.encode("The router sends tokens to experts")
    with torch.no_grad():
        torch.testing.assert_close(
            hf(ids).logits, ours.model(ids, return_logits=True, mtp=False).logits, rtol=1e-5, atol=1e-5
        )
        out_hf = hf.generate(ids, max_new_tokens=6, do_sample=False)
        out_ours = ours.model.generate(ids, 6, temperature=0.0)
    assert out_hf.tolist() == out_ours.tolist()
    # The model code in the folder is the project's, imports made relative; no second copy to drift.
    from pathlib import Path

    import moe_arch.model.transformer as transformer_py
    from moe_arch.hf.export import relative_imports

    assert (out / "transformer.py").read_text() == relative_imports(Path(transformer_py.__file__).read_text(), "t.py")
    assert "from .attention import Attention" in (out / "transformer.py").read_text()


def test_train_init_from_an_exported_folder(exported, tmp_path, capsys):
    from moe_arch.config import load_config
    from moe_arch.hf.export import ExportError, init_from_config, read_hf_folder
    from moe_arch.training.trainer import Trainer

    ckpt, out, cfg = exported
    base = load_config(
        "tiny",
        [
            "--train.out_dir",
            str(tmp_path),
            "--train.steps",
            "1",
            "--train.batch_size",
            "4",
            "--train.seq_len",
            "32",
            "--data.cache_dir",
            cfg.data.cache_dir,
            "--monitor.enabled",
            "false",
            "--train.eval_max_tokens",
            "256",
            "--train.sample_tokens",
            "0",
        ],
    )
    new, state = init_from_config(base, out)
    assert new.model == cfg.model and new.data.tokenizer == str(out)
    t = Trainer(new, init_state=state)
    saved = torch.load(ckpt, weights_only=True)["model"]
    for name, p in t.raw_model.state_dict().items():
        assert torch.equal(p, saved[name]), name
    t.run()
    t.close()
    # Run again with --resume latest (as `make train` does): it continues; the folder's weights are not re-applied,
    # and it says so instead of ignoring the flag silently.
    capsys.readouterr()
    again = Trainer(new, resume="latest", init_state=state)
    assert again.step == 1 and "--init-from: not applied, the run continues from" in capsys.readouterr().out
    again.close()
    with pytest.raises(ExportError, match=r"model.d_model=96 was set by hand, but .* holds a model with d_model=64"):
        init_from_config(load_config("tiny", ["--model.d_model", "96"]), out)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ExportError, match="model_type is 'llama', not a moe_arch export"):
        read_hf_folder(tmp_path / "other")
    from moe_arch import cli

    assert cli.main(["export", str(ckpt), "--hf", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
