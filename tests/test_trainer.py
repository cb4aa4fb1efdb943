import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_checkpoint import with_train

from moe_arch.config import Config
from moe_arch.training.trainer import NonFiniteLossError, Trainer


def rows(run_dir: Path, kind="train"):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_tokens_seen_and_metrics(small_cfg):
    cfg = with_train(small_cfg, steps=4, grad_accum=2, log_every=2, tensorboard=True)
    r = Trainer(cfg).run()
    assert r.tokens_seen == 4 * 2 * 4 * 32  # steps x micro-batches x sequences x tokens, no padding
    run = Path(cfg.train.out_dir) / "t"
    m = rows(run)
    assert [x["step"] for x in m] == [2, 4]
    last = m[-1]
    for key in (
        "loss",
        "lm_loss",
        "mtp_loss",
        "aux_moe_load_balance",
        "aux_moe_z_loss",
        "aux_mod_router",
        "lr_muon",
        "lr_expert_muon",
        "lr_adamw_0",
        "lr_adamw_1",
        "grad_norm",
        "grad_norm_muon",
        "grad_norm_adamw",
        "clip_rate",
        "tokens_per_s",
        "mfu",
        "mod_selected_L1",
        "mod_weight_std_L3",
        "moe_max_over_mean_L1",
        "moe_load_L3",
    ):
        assert key in last, key
    assert last["tokens_seen"] == r.tokens_seen
    assert sum(last["moe_load_L1"]) == pytest.approx(1.0, abs=1e-3)
    assert 0.5 < last["mod_selected_L1"] < 1.0
    ev = rows(run, "eval")[-1]
    assert ev["val_loss"] == pytest.approx(r.val_loss) and "unigram_loss" in ev
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_gradient_accumulation_matches_a_bigger_batch(small_cfg):
    # The Switch balance loss and the z-loss (a mean over the tokens MoD routed, a number that varies per
    # micro-batch) are not linear in the batch, so turn them off to compare the accumulation itself.
    def make(batch, accum, name):
        d = with_train(small_cfg, steps=1, batch_size=batch, grad_accum=accum, run_name=name, grad_clip=0.0).to_dict()
        d["model"]["router_aux_loss_coef"] = d["model"]["router_z_loss_coef"] = 0.0
        return Trainer(Config.from_dict(d))

    def capture(trainer):
        grads = {}
        names = {id(p): n for n, p in trainer.raw_model.named_parameters()}
        for opt in trainer.optimizers.values():
            opt.register_step_pre_hook(
                lambda o, args, kw: grads.update(
                    {names[id(p)]: p.grad.clone() for g in o.param_groups for p in g["params"]}
                )
            )
        return grads

    a, b = make(8, 1, "a"), make(4, 2, "b")
    ga, gb = capture(a), capture(b)
    sa, sb = a.train_step(), b.train_step()
    assert sa["loss"] == pytest.approx(sb["loss"], rel=1e-5)
    assert len(ga) == len(list(a.raw_model.parameters())) and ga.keys() == gb.keys()
    for n in ga:  # (compare gradients: Muon orthogonalises in bf16, which magnifies float summation order)
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-3, atol=1e-7, msg=n)


def test_clipping_is_logged(small_cfg):
    cfg = with_train(small_cfg, steps=2, grad_clip=1e-6, log_every=1)
    Trainer(cfg).run()
    assert all(r["clip_rate"] == 1.0 for r in rows(Path(cfg.train.out_dir) / "t"))


def test_nan_loss_stops_with_the_step_and_module(small_cfg):
    t = Trainer(with_train(small_cfg, steps=3))
    with torch.no_grad():
        t.raw_model.layers[1].seq_layer.o_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError) as e:
        t.run()
    msg = str(e.value)
    assert msg.startswith("step 1: loss is nan") and "'layers.1.seq_layer.o_proj'" in msg
    # the weight itself is NaN: skipping batches would not help, so the message says so instead of suggesting it
    assert "layers.1.seq_layer.o_proj.weight" in msg and "skipping batches cannot recover" in msg
    assert "train.nan_policy=skip" not in msg


def test_a_bad_batch_on_finite_weights_suggests_skipping(small_cfg):
    t = Trainer(with_train(small_cfg, steps=3))
    forward = t.model.forward

    def bad(*a, **k):
        out = forward(*a, **k)
        out.loss = out.loss * float("nan")
        return out

    t.model.forward = bad
    with pytest.raises(NonFiniteLossError) as e:
        t.run()
    assert "(micro-batch 1 of 1)" in str(e.value) and "train.nan_policy=skip" in str(e.value)


def test_nan_policy_skip_skips_up_to_the_limit(small_cfg):
    t = Trainer(with_train(small_cfg, steps=3, nan_policy="skip", max_nan_skips=2))
    forward = t.model.forward
    calls = {"n": 0}

    def flaky(*a, **k):
        out = forward(*a, **k)
        calls["n"] += 1
        if calls["n"] == 2:  # the second batch is bad
            out.loss = out.loss * float("nan")
        return out

    t.model.forward = flaky
    r = t.run()
    assert r.steps == 3 and t.nan_skips == 1
    t2 = Trainer(with_train(small_cfg, steps=3, nan_policy="skip", max_nan_skips=0, run_name="t2"))
    t2.model.forward = lambda *a, **k: type("O", (), {"loss": torch.tensor(float("inf"))})()
    with pytest.raises(NonFiniteLossError, match="already skipped 0 batches"):
        t2.run()


def test_cli_train_smoke_and_plain_progress(small_cfg, tmp_path):
    from moe_arch.config import save_config

    cfg = with_train(small_cfg, steps=3, log_every=1, sample_tokens=8)
    save_config(cfg, tmp_path / "c.yaml")
    out = subprocess.run(
        [sys.executable, "-m", "moe_arch", "train", str(tmp_path / "c.yaml")], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "step 3/3 | loss" in out.stdout
    assert "validation: loss" in out.stdout and "perplexity" in out.stdout and "sample: " in out.stdout
    gen = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_arch",
            "generate",
            str(Path(cfg.train.out_dir) / "t" / "checkpoints" / "final.pt"),
            "--prompt",
            "The",
            "--max-new-tokens",
            "5",
            "--temperature",
            "0",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.startswith("The")


def test_missing_data_is_a_one_line_error_exit_2(tmp_path):
    # its own out_dir: the checkout's runs/ may hold a `make train` run, whose folder a fresh start may not reuse
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_arch",
            "train",
            "--data.source",
            str(tmp_path / "none.txt"),
            "--train.out_dir",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("error: data.source=") and out.stderr.count("\n") == 1


@pytest.mark.slow
def test_default_training_beats_the_unigram_baseline(tmp_path):
    """`moe-arch train` with no arguments (the tiny preset on the embedded corpus), as the README runs it."""
    out = subprocess.run(
        [sys.executable, "-m", "moe_arch", "train", "--train.out_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1800,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ev = rows(tmp_path / "tiny", "eval")[-1]
    assert ev["val_loss"] < ev["unigram_loss"] - 1.5, ev
    # a healthy run: the live monitor (on by default) raised no alert in its 400 steps
    assert not (tmp_path / "tiny" / "alerts.jsonl").exists(), (tmp_path / "tiny" / "alerts.jsonl").read_text()[:2000]


def test_wandb_requested_but_missing_is_a_one_line_error(tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_arch",
            "train",
            "--train.wandb",
            "true",
            "--train.steps",
            "1",
            "--train.out_dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2 and "train.wandb=true: the wandb package is not installed" in out.stderr
    assert out.stderr.count("\n") == 1


def test_monitor_reference_after_resume_is_the_resumed_weights(small_cfg):
    from test_checkpoint import stop_after

    d = with_train(small_cfg, steps=20, log_every=5).to_dict()
    d["monitor"] = {"enabled": True, "interval": 5, "window": 10}
    cfg = Config.from_dict(d)
    stop_after(Trainer(cfg), 7).run()
    t = Trainer(cfg, resume="latest")
    assert t.monitor.step == 7 and t.monitor._snapshots[0][0] == 7
    t.run()
    assert t.monitor.alerts == []  # a healthy fp32 run stays quiet across the resume


def test_cpu_malloc_cache_stops_page_faulting_reused_activations():
    """Freed multi-MB blocks stay in the heap after tune_cpu_malloc: reallocating them costs no page faults."""
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    code = (
        "import resource, torch\n"
        "from moe_arch.utils import tune_cpu_malloc\n"
        "def faults():\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    for _ in range(5):\n"
        "        t = torch.empty(16 << 20); t.fill_(1.0); del t\n"  # 64 MiB, above glibc's largest mmap threshold
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
        "faults(); default = faults()\n"
        "assert tune_cpu_malloc()\n"
        "faults(); faults()\n"  # the first rounds after tuning grow the heap
        "print(default, faults())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    default, tuned = map(int, out.stdout.split())
    assert default > 5 * 1000 and tuned < default / 10, (default, tuned)
