"""The doctor reads a run's history: each logger's files (written by that logger itself), the curve rules, and one
report per run folder that joins the history to the checkpoint's evidence."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moe_arch.doctor.curves import curve_findings
from moe_arch.doctor.history import History, canonical, find_history, read_history
from moe_arch.doctor.pipeline import DiagnoseOptions, diagnose


# ------------------------------------------------------------------------------------------------ schema
@pytest.mark.parametrize(
    "name,expected",
    [
        ("loss", "loss"),
        ("train/loss", "loss"),
        ("train_loss_step", "loss"),
        ("lm_loss", "lm_loss"),
        ("eval_loss", "eval_loss"),
        ("val_loss", "eval_loss"),
        ("eval/loss", "eval_loss"),
        ("learning_rate", "lr"),
        ("train/learning_rate", "lr"),
        ("lr-AdamW", "lr/AdamW"),
        ("lr_muon", "lr/muon"),
        ("lr-AdamW/pg2", "lr/AdamW/pg2"),
        ("grad_norm", "grad_norm"),
        ("train/grad_norm", "grad_norm"),
        ("tokens_per_s", "tokens_per_s"),
        ("clip_rate", "clip_rate"),
        ("moe_max_over_mean_L3", "moe_imbalance/L3"),
        ("mod_selected_L1", "mod_fraction/L1"),
        ("mfu", None),
        ("epoch_time", None),
    ],
)
def test_logger_names_map_onto_one_schema(name, expected):
    assert canonical(name) == expected


# ------------------------------------------------------------------------------------------------ rules
def _h(steps, **series) -> History:
    h = History(None, "test")
    for name, values in series.items():
        for st, v in zip(steps, values):
            h.add(name, st, v)
    return h.finish()


def _causes(h, **kw):
    return [(f.cause, f.severity, f.evidence.get("first_step")) for f in curve_findings(h, **kw)]


STEPS = list(range(1, 301))
HEALTHY_LOSS = [4.2 * math.exp(-s / 80) + 1.5 for s in STEPS]
WARMUP_COSINE = [3e-4 * min(1, s / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 300))) for s in STEPS]


def test_a_healthy_run_has_no_curve_finding():
    grad = [1.0 + 0.1 * math.sin(s) for s in STEPS]
    tps = [1000 + 10 * math.sin(s) for s in STEPS]
    assert (
        _causes(_h(STEPS, loss=HEALTHY_LOSS, lr=WARMUP_COSINE, grad_norm=grad, tokens_per_s=tps), vocab_size=64) == []
    )


def test_loss_at_ln_vocab_is_not_learning():
    flat = [math.log(64) + 0.01 * math.sin(s) for s in STEPS]
    assert _causes(_h(STEPS, loss=flat, lr=WARMUP_COSINE), vocab_size=64)[0] == ("not_learning", "critical", 1)


def test_eval_loss_at_the_unigram_entropy_is_not_learning():
    h = _h(STEPS, loss=HEALTHY_LOSS, val_loss=[5.5 + 0.5 * math.exp(-s / 20) for s in STEPS])
    h.meta["unigram_loss"] = 5.5
    assert [c for c, *_ in _causes(h, vocab_size=4096)] == ["not_learning"]


def test_divergence_names_the_first_bad_step():
    up = [HEALTHY_LOSS[i] if s < 150 else HEALTHY_LOSS[149] + (s - 150) * 0.05 for i, s in enumerate(STEPS)]
    ((cause, sev, first),) = _causes(_h(STEPS, loss=up))
    assert cause == "divergence" and sev == "critical" and 150 < first < 200
    nan = HEALTHY_LOSS[:200] + [float("nan")] * 100
    assert _causes(_h(STEPS, loss=nan)) == [("divergence", "critical", 201)]


def test_spikes_recovered_or_not():
    spiky = list(HEALTHY_LOSS)
    spiky[100] += 3.0
    (f,) = curve_findings(_h(STEPS, loss=spiky))
    assert f.cause == "loss_spike" and f.evidence["first_step"] == 101 and f.evidence["n_unrecovered"] == 0


def test_plateau_while_the_lr_is_high():
    flat_end = [max(v, 2.5) for v in HEALTHY_LOSS]
    const = [3e-4] * len(STEPS)
    assert [c for c, *_ in _causes(_h(STEPS, loss=flat_end, lr=const))] == ["plateau"]
    # the same curve under a schedule that decayed: the flat end is the schedule's, not a plateau
    decayed = [3e-4 * (1 - s / 301) for s in STEPS]
    assert _causes(_h(STEPS, loss=flat_end, lr=decayed)) == []


def test_learning_rate_schedule_anomalies():
    assert _causes(_h(STEPS, loss=HEALTHY_LOSS, lr=[0.0] * 300))[0][:2] == ("lr_schedule", "critical")
    rising = [3e-4 * s / 1000 for s in STEPS]  # warmup of 1000 steps in a 300-step run
    (f,) = curve_findings(_h(STEPS, loss=HEALTHY_LOSS, lr=rising))
    assert f.evidence["issue"] == "warmup_longer_than_run"
    groups = _h(STEPS, loss=HEALTHY_LOSS, **{"lr_muon": WARMUP_COSINE, "lr_adamw": [x * 1e-4 for x in WARMUP_COSINE]})
    assert [f.evidence["issue"] for f in curve_findings(groups)] == ["group_ratio"]


def test_gradient_norm_exploding_and_always_clipped():
    grow = [0.5 * 1.03**s for s in STEPS]
    assert [f.evidence["issue"] for f in curve_findings(_h(STEPS, loss=HEALTHY_LOSS, grad_norm=grow))] == ["exploding"]
    clipped = curve_findings(_h(STEPS, loss=HEALTHY_LOSS, grad_norm=[50.0] * 300), grad_clip=1.0)
    assert curve_findings(_h(STEPS, loss=HEALTHY_LOSS, grad_norm=[1.8] * 300), grad_clip=1.0) == []  # ordinary
    assert [f.evidence["issue"] for f in clipped] == ["always_clipped"]


def test_throughput_collapse_and_routing_drift():
    tps = [1000.0] * 150 + [400.0] * 150
    (f,) = curve_findings(_h(STEPS, loss=HEALTHY_LOSS, tokens_per_s=tps))
    assert f.cause == "throughput_collapse" and f.evidence["first_step"] == 151
    moe = [1.1 + 3.0 * s / 300 for s in STEPS]
    mod = [0.75 - 0.3 * s / 300 for s in STEPS]
    found = curve_findings(
        _h(STEPS, loss=HEALTHY_LOSS, moe_max_over_mean_L2=moe, mod_selected_L1=mod), n_experts=4, mod_capacity=0.75
    )
    assert sorted(f.cause for f in found) == ["mod_drift", "moe_collapse"]


# ------------------------------------------------------------------------------------------------ readers
def test_our_trainer_history_and_run_folder_report(small_cfg, tmp_path):
    """Our trainer with every learning rate 0: the run folder's report joins the history (the loss stays at
    ln(vocab), the lr is 0) to the checkpoint's zero_learning_rate, linked."""
    from dataclasses import replace

    from moe_arch.training.trainer import Trainer

    cfg = replace(
        small_cfg,
        train=replace(small_cfg.train, steps=60, log_every=1, ckpt_every=60, tensorboard=True, warmup_steps=0),
        optim=replace(small_cfg.optim, muon_lr=0.0, adamw_lr=0.0),
    )
    Trainer(cfg).run()
    run = tmp_path / "runs" / "t"
    assert find_history(run) == run / "metrics.jsonl"
    h = read_history(run / "metrics.jsonl")
    assert h.format == "moe_arch" and {"loss", "lm_loss", "grad_norm", "tokens_per_s"} <= set(h.found())
    assert any(n.startswith("lr/") for n in h.found()) and len(h.get("loss").values) == 60
    tb = read_history(run / "tensorboard")
    assert tb.format == "tensorboard" and tb.get("loss") is not None
    d = diagnose(str(run), DiagnoseOptions(probe=False))
    causes = {f.cause for f in d.findings}
    assert {"not_learning", "lr_schedule", "zero_learning_rate"} <= causes, [(f.cause, f.summary) for f in d.findings]
    nl = next(f for f in d.findings if f.cause == "not_learning")
    assert "zero_learning_rate" in nl.evidence["related"]
    assert d.to_json()["history"]["format"] == "moe_arch"


def test_hugging_face_output_dir_history_and_checkpoint(tmp_path):
    """transformers' Trainer (trainer_state.json log_history, TensorBoard events), lr 0 on a learnable task: the
    output_dir's report names the loss stuck at ln(vocab), and the checkpoint's zero learning rate."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from arch_runs import VOCAB, Pattern, _build
    from transformers import Trainer, TrainingArguments

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=60,
        per_device_train_batch_size=8,
        learning_rate=0.0,
        logging_steps=1,
        save_steps=60,
        report_to=["tensorboard"],
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=_build("llama"), args=args, train_dataset=Pattern(480)).train()
    assert find_history(tmp_path).name == "trainer_state.json"
    h = read_history(find_history(tmp_path))
    assert h.format == "hf-trainer-state" and {"loss", "lr", "grad_norm"} <= set(h.found())
    tb = read_history(tmp_path)  # the event files under output_dir
    assert tb.get("loss") is not None and len(tb.get("loss").values) == 60  # HF's TensorBoard writer: train/loss
    d = diagnose(str(tmp_path), DiagnoseOptions(probe=False))
    assert d.checkpoint["path"].endswith("checkpoint-60")
    causes = [(f.cause, f.severity) for f in d.findings]
    assert ("not_learning", "critical") in causes and ("lr_schedule", "critical") in causes, causes
    assert f"{math.log(VOCAB):.3f}" in next(f.summary for f in d.findings if f.cause == "not_learning")


def test_lightning_csv_logger_divergence_and_history_only_folder(tmp_path):
    """Lightning's CSVLogger (and LearningRateMonitor): a learning rate far too high diverges; the log dir holds no
    checkpoint, so the verdict comes from the history alone and says what it could not check."""
    L = pytest.importorskip("lightning.pytorch")
    from arch_runs import Pattern
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger
    from plain_runs import lightning_module

    trainer = L.Trainer(
        max_steps=80,
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[LearningRateMonitor()],
    )
    module = lightning_module(lambda m: torch.optim.SGD(m.parameters(), lr=50.0), log_name="train_loss")
    trainer.fit(module, torch.utils.data.DataLoader(Pattern(640), batch_size=8))
    metrics = find_history(tmp_path)
    assert metrics.name == "metrics.csv"
    h = read_history(metrics)
    assert h.format == "lightning-csv" and {"loss", "lr/SGD"} <= set(h.found()), (h.found(), h.unmapped)
    d = diagnose(str(tmp_path), DiagnoseOptions(probe=False))
    assert d.checkpoint["format"].startswith("none") and d.inconclusive
    assert d.status == "critical" and d.findings[0].cause == "divergence", [(f.cause, f.summary) for f in d.findings]


def test_logs_flag_and_unreadable_history_is_one_line(tmp_path, capsys):
    from plain_runs import train

    from moe_arch.cli import main

    train(tmp_path)
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps({"step": s, "loss": math.log(64)}) for s in range(1, 80)))
    d = diagnose(
        str(tmp_path / "final.pt"), DiagnoseOptions(against=str(tmp_path / "init.pt"), logs=str(log), probe=False)
    )
    assert d.to_json()["history"]["format"] == "jsonl" and "not_learning" in {f.cause for f in d.findings}
    (tmp_path / "bad.jsonl").write_text("not json\n")
    code = main(["diagnose", str(tmp_path / "final.pt"), "--logs", str(tmp_path / "bad.jsonl"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl: line 1 is not JSON" in err and err.count("\n") == 1


# ------------------------------------------------------------------------- planted pathologies, real trainers
_RUNS: list = []


def _ours(small_cfg, steps: int = 100, patch=None, **train):
    """Our trainer on the small model; ``patch(trainer)`` plants the pathology; returns the run folder's curve
    findings as {cause: first_step}."""
    from dataclasses import replace

    from moe_arch.training.trainer import Trainer

    optim = {k: train.pop(k) for k in ("muon_lr", "adamw_lr") if k in train}
    _RUNS.append(None)  # one run folder per call
    cfg = replace(
        small_cfg,
        train=replace(
            small_cfg.train,
            **{
                "steps": steps,
                "log_every": 1,
                "ckpt_every": 0,
                "warmup_steps": 5,
                "run_name": f"run{len(_RUNS)}",
                **train,
            },
        ),
        optim=replace(small_cfg.optim, **optim),
    )
    trainer = Trainer(cfg)
    if patch:
        patch(trainer)
    trainer.run()
    h = read_history(find_history(Path(cfg.train.out_dir) / cfg.train.run_name))
    return {
        f.cause: f.evidence["first_step"]
        for f in curve_findings(h, vocab_size=cfg.model.vocab_size, grad_clip=cfg.train.grad_clip or None)
    }, h


def test_ours_healthy_and_clipped_every_step(small_cfg):
    found, _ = _ours(small_cfg)
    assert found == {}
    found, h = _ours(small_cfg, grad_clip=1e-3)
    assert found == {"gradient_norm": h.get("clip_rate").steps[0]}


@pytest.mark.slow
def test_ours_divergence_repeated_batch_and_a_sleeping_loop(small_cfg):
    import time

    found, h = _ours(small_cfg, adamw_lr=3.0, muon_lr=3.0, grad_clip=0.0, nan_policy="skip", max_nan_skips=1000)
    assert "divergence" in found and found["divergence"] <= 100, found

    def repeat_one_batch(trainer):
        first = trainer.sampler.batch(0, 1)
        trainer.sampler.batch = lambda rank, world: first.clone()

    found, h = _ours(small_cfg, steps=150, eval_every=10, patch=repeat_one_batch)
    assert "overfitting" in found, found
    ev = h.get("eval_loss")
    assert found["overfitting"] > ev.steps[min(range(len(ev.values)), key=ev.values.__getitem__)]

    def sleep_from_step_50(trainer):
        batch = trainer.sampler.batch

        def slow(rank, world):
            if trainer.step >= 50:
                time.sleep(0.5)
            return batch(rank, world)

        trainer.sampler.batch = slow

    found, _ = _ours(small_cfg, patch=sleep_from_step_50)
    assert found.get("throughput_collapse") in (51, 52), found


def _hf(tmp_path, lr: float, train_data, eval_data=None, steps: int = 80, callbacks=(), history=None, **args):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from arch_runs import VOCAB, _build
    from transformers import Trainer, TrainingArguments

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    targs = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=lr,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        **{"report_to": [], **args},
    )
    trainer = Trainer(
        model=_build("llama"), args=targs, train_dataset=train_data, eval_dataset=eval_data, callbacks=list(callbacks)
    )
    trainer.train()
    trainer.state.save_to_json(str(tmp_path / "trainer_state.json"))  # what a checkpoint-N/ folder holds
    torch.save(targs, tmp_path / "training_args.bin")  # as the Trainer's _save does, next to it
    h = read_history(history(tmp_path) if history else tmp_path / "trainer_state.json")
    return {f.cause: f.evidence["first_step"] for f in curve_findings(h, vocab_size=VOCAB)}, h


def test_hugging_face_healthy_divergent_and_repeated_batch_histories(tmp_path):
    """transformers' Trainer on a learnable task: healthy (no curve finding), a learning rate far too high
    (divergence), and a dataset that repeats one example (the eval loss rises while the training loss collapses)."""
    from arch_runs import Pattern

    found, _ = _hf(tmp_path / "healthy", 3e-3, Pattern(640))
    assert found == {}
    found, h = _hf(tmp_path / "divergent", 30.0, Pattern(640), max_grad_norm=1e9)
    assert "divergence" in found and found["divergence"] >= h.get("loss").steps[0], found

    class OneExample(torch.utils.data.Dataset):
        def __len__(self):
            return 640

        def __getitem__(self, i):
            return Pattern(1)[0]

    found, h = _hf(
        tmp_path / "repeated", 3e-3, OneExample(), Pattern(64), steps=120, eval_strategy="steps", eval_steps=10
    )
    assert "overfitting" in found, (found, h.get("eval_loss").values)
    ev = h.get("eval_loss")
    assert found["overfitting"] > ev.steps[min(range(len(ev.values)), key=ev.values.__getitem__)]


def test_the_history_replays_the_monitors_spike_rule_exactly():
    """One rule: the vectorised replay gives the live monitor's score (rules.spike_z) at every step."""
    import random

    from moe_arch.doctor.causes.curves import _spike_scores
    from moe_arch.doctor.rules import spike_z

    rng = random.Random(0)
    vals = [3.0 - s / 500 + rng.gauss(0, 0.05) + (2.0 if s in (90, 150) else 0.0) for s in range(300)]
    span = 40
    fast = _spike_scores(vals, span)
    slow = [spike_z(vals[max(0, i - span) : i], vals[i]) for i in range(len(vals))]
    assert [a is None for a in fast] == [b is None for b in slow]
    assert all(a is None or abs(a - b) <= 1e-9 * max(1.0, abs(b)) for a, b in zip(fast, slow))
    assert [i for i, z in enumerate(fast) if z is not None and z > 6] == [90, 150]


def test_hugging_face_clip_every_step_and_a_sleeping_loop(tmp_path):
    """max_grad_norm 1e-3 (read from the Trainer's training_args.bin with inert stand-ins: no transformers code
    runs) clips every step by ~1000x; a callback sleeping 1 s on every step from step 40 on collapses the speed, seen in
    the TensorBoard events' wall times (the Trainer logs no per-step throughput)."""
    import time

    from arch_runs import Pattern
    from transformers import TrainerCallback

    found, h = _hf(tmp_path / "clip", 3e-3, Pattern(640), max_grad_norm=1e-3)
    assert h.meta["grad_clip"] == 1e-3 and found == {"gradient_norm": h.get("grad_norm").steps[0]}, found

    class Sleep(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= 40:
                time.sleep(1.0)

    found, h = _hf(
        tmp_path / "sleep",
        3e-3,
        Pattern(480),
        steps=60,
        callbacks=[Sleep()],
        report_to=["tensorboard"],
        history=lambda p: p,
    )
    assert h.format == "tensorboard" and h.get("steps_per_s") is not None
    assert found.get("throughput_collapse") in (40, 41), found  # the log of step 40 comes after its sleep
