"""The lm-evaluation-harness adapter, run by lm_eval itself on local task YAMLs over local JSONL files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")


DOCS = [
    "The router sends each token to two experts.",
    "A norm weight that never moves is a frozen norm.",
    "Mamba layers carry a recurrent state.",
    "Depth routing skips a quarter of the tokens.",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_cache):
    from conftest import trained_checkpoint

    return trained_checkpoint(tmp_path_factory.mktemp("lm_eval_run"), data_cache, steps=4)[0]


@pytest.fixture
def tasks(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    mc = tmp_path / "mc.jsonl"
    mc.write_text(
        "".join(
            json.dumps({"question": f"Q{i}: {d[:20]}", "choices": [" experts", " norms", " states"], "answer": i % 3})
            + "\n"
            for i, d in enumerate(DOCS)
        )
    )
    common = "dataset_path: json\ntest_split: test\n"
    (tmp_path / "ppl.yaml").write_text(
        "task: moe_arch_local_ppl\n" + common + f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    (tmp_path / "mc.yaml").write_text(
        "task: moe_arch_local_mc\n" + common + f"dataset_kwargs:\n  data_files:\n    test: {mc}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n"
    )
    return tmp_path


def test_lm_eval_runs_the_adapter_and_agrees_with_our_own_loss(checkpoint, tasks, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    from moe_arch.evaluation.harness import MoeArchLM
    from moe_arch.evaluation.loss import evaluate_streams

    lm = MoeArchLM(str(checkpoint), device="cpu")
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=["moe_arch_local_ppl", "moe_arch_local_mc"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True,
    )
    samples = res["samples"]["moe_arch_local_ppl"]
    assert len(samples) == len(DOCS)
    # One number, checked against `moe-arch eval`'s own computation: a document's rolling log-likelihood is minus
    # the summed next-token loss over the document-start token followed by its tokens.
    for s in samples:
        text = s["doc"]["text"]
        ll = float(np.ravel(s["resps"])[0])
        stream = np.asarray([lm.prefix_token_id] + lm.tok.encode(text))
        ours = evaluate_streams(lm.model, [stream], 64, 1, torch.device("cpu"), lm.policy.autocast(lm._device))
        assert ours["tokens"] == len(stream) - 1
        assert ll == pytest.approx(-ours["loss"] * ours["tokens"], rel=1e-5)
    r = res["results"]["moe_arch_local_ppl"]
    assert math.isfinite(r["word_perplexity,none"]) and r["bits_per_byte,none"] > 0
    mc = res["results"]["moe_arch_local_mc"]
    assert 0.0 <= mc["acc,none"] <= 1.0 and len(res["samples"]["moe_arch_local_mc"]) == len(DOCS)


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(checkpoint):
    from lm_eval.api.instance import Instance

    from moe_arch.evaluation.harness import MoeArchLM

    lm = MoeArchLM(str(checkpoint), device="cpu")
    ctx = "The router sends"
    req = Instance("generate_until", {}, (ctx, {"until": ["\n\n"], "max_gen_toks": 12}), 0)
    (text,) = lm.generate_until([req])
    ids = torch.tensor([[lm.prefix_token_id] + lm.tok.encode(ctx)])
    greedy = lm.model.generate(ids, 12, temperature=0.0)[0, ids.shape[1] :].tolist()
    if lm.tok.eos_id in greedy:
        greedy = greedy[: greedy.index(lm.tok.eos_id)]
    assert text == lm.tok.decode(greedy).split("\n\n")[0]
    # The score of a continuation is the log-softmax sum of the model's own forward pass.
    ctx_ids, cont = lm._encode_pair("Mamba layers", " carry a state")
    ll, _ = lm.score(ctx_ids, cont)
    full = torch.tensor([ctx_ids + cont])
    logits = lm.model(full[:, :-1], return_logits=True, mtp=False).logits[0].float()
    want = torch.log_softmax(logits.detach(), -1)[-len(cont) :].gather(1, torch.tensor(cont)[:, None]).sum()
    assert ll == pytest.approx(float(want), rel=1e-6)


def test_the_lm_eval_command(checkpoint, tasks, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from moe_arch import cli

    out = tmp_path / "res.json"
    assert (
        cli.main(
            [
                "lm-eval",
                str(checkpoint),
                "--tasks",
                "moe_arch_local_mc",
                "--include-path",
                str(tasks),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert "moe_arch_local_mc" in capsys.readouterr().out
    assert "acc,none" in json.loads(out.read_text())["results"]["moe_arch_local_mc"]
