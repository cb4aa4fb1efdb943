"""The doctor from one checkpoint: the verdict from the final checkpoint alone is the one the run's initial
checkpoint gives, or an honest "cannot tell". Each case is a run its stack writes itself (a plain PyTorch loop,
Hugging Face's Trainer, Lightning, torchao's and torch-optimi's optimizers, this project's trainer), each broken
run with a healthy twin, each diagnosed with and without the reference, on exact tensor sets and statuses; and each
fix is said in the words of the stack that wrote the files."""

from __future__ import annotations

import shutil

import pytest
import torch
from plain_runs import Net, lightning_trainer, norm_names
from torch import nn

from moe_arch.doctor.pipeline import DiagnoseOptions, diagnose


def _steps(model, opt, n: int, sched=None) -> None:
    """n next-token steps of a learnable pattern (token t -> t + 1), so every tensor gets consistent gradients."""
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        start = torch.randint(0, 64, (8, 1), generator=g)
        tok = (start + torch.arange(9)) % 64
        out = model(tok[:, :-1]).float()
        nn.functional.cross_entropy(out.reshape(-1, 64), tok[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()


def _both(path, init) -> tuple:
    """The diagnosis with the reference and alone."""
    return (
        diagnose(str(path), DiagnoseOptions(against=str(init), probe=False)),
        diagnose(str(path), DiagnoseOptions(probe=False)),
    )


def _critical(d) -> dict[str, set[str]]:
    return {f.cause: set(f.tensors) for f in d.findings if f.severity == "critical"}


def _precision(d) -> list:
    """The precision findings (other causes, e.g. about bf16 optimizer moments, are judged in their own tests)."""
    return [f for f in d.findings if f.cause == "precision_underflow"]


def _findings(d):
    return [(f.cause, f.severity, f.summary) for f in d.findings], d.inconclusive


def _unchanged(model, init: dict) -> set[str]:
    return {n for n, p in model.named_parameters() if torch.equal(p.detach(), init[n])}


# ---------------------------------------------------------------------------------------------- item 1: lr 0 alone
@pytest.mark.parametrize("broken", [True, False])
def test_lambda_lr_zero_for_one_group_is_found_alone(tmp_path, broken):
    """A LambdaLR returning 0 for the norms' group: the saved lr is 0 there and 3e-3 in the other group. That is a
    finding from the checkpoint alone (not "healthy"), the same as with the reference; the twin whose lambdas are
    both 1 is healthy both ways."""
    torch.manual_seed(0)
    model = Net()
    norms = norm_names(model)
    named = dict(model.named_parameters())
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in named.items() if n not in norms]}, {"params": [named[n] for n in norms]}],
        lr=3e-3,
        weight_decay=0.0,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 1.0, (lambda s: 0.0) if broken else (lambda s: 1.0)])
    torch.save({"model": model.state_dict(), "step": 0}, tmp_path / "init.pt")
    _steps(model, opt, 8, sched)
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": 8},
        tmp_path / "final.pt",
    )
    with_ref, alone = _both(tmp_path / "final.pt", tmp_path / "init.pt")
    for d in (with_ref, alone):
        if broken:
            assert d.status == "critical", _findings(d)
            assert [(f.cause, sorted(f.tensors)) for f in d.findings] == [("zero_learning_rate", sorted(norms))]
            ev = d.findings[0].evidence
            assert ev["saved_lr"] == 0.0 and ev["scheduled_peak_lr"] == [3e-3] and ev["other_groups_lr"] == [3e-3]
            assert ev["moments_non_zero"] is True and ev["optimizer_steps_in_state"] == [8]
            assert "while other groups train at 3.0e-03" in d.findings[0].summary
        else:
            assert d.status == "healthy", _findings(d)
    if broken:
        assert with_ref.findings[0].evidence["unchanged_since_reference"] is True
        assert alone.findings[0].evidence["unchanged_since_reference"] is None


def test_a_schedule_that_ends_every_group_at_zero_is_not_a_zero_lr(tmp_path):
    """Every group decayed to 0 at the end (the Hugging Face default): no finding alone or with the reference."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / 8))
    torch.save({"model": model.state_dict(), "step": 0}, tmp_path / "init.pt")
    _steps(model, opt, 8, sched)
    assert opt.param_groups[0]["lr"] == 0.0
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 8}, tmp_path / "final.pt")
    for d in _both(tmp_path / "final.pt", tmp_path / "init.pt"):
        assert d.status == "healthy", _findings(d)


# ---------------------------------------------------------------------------------------------- item 2: precision
def _bf16_run(tmp_path, make_opt, steps: int = 12):
    torch.manual_seed(0)
    model = Net().to(torch.bfloat16)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_opt(model)
    torch.save({"model": model.state_dict(), "step": 0}, tmp_path / "init.pt")
    _steps(model, opt, steps)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": steps}, tmp_path / "final.pt")
    return model, _unchanged(model, init)


@pytest.mark.slow  # torchao compiles its optimizer step (~15 s per run on 2 CPU cores)
@pytest.mark.parametrize("stochastic_round", [True, False])
def test_torchao_bf16_stochastic_rounding(tmp_path, stochastic_round):
    """torchao's _AdamW on bf16 weights at 1e-3: half a ULP at 1.0 is 2e-3, so without stochastic rounding the norm
    gains never leave 1.0 (critical with the reference, and alone: every element still at its initial 1.0); with it
    they move, and there is no precision finding at all, alone or not (torchao does not save the flag: no
    forecast is made from its state)."""
    from torchao.optim import _AdamW

    model, frozen = _bf16_run(
        tmp_path, lambda m: _AdamW(m.parameters(), lr=1e-3, weight_decay=0.0, bf16_stochastic_round=stochastic_round)
    )
    norms = set(norm_names(model))
    with_ref, alone = _both(tmp_path / "final.pt", tmp_path / "init.pt")
    if stochastic_round:
        assert frozen == set()
        for d in (with_ref, alone):
            assert _precision(d) == [] and _critical(d) == {}, _findings(d)
        assert with_ref.status == alone.status
        assert any("bf16_stochastic_round" in n for n in alone.notes)
    else:
        assert frozen == norms
        for d in (with_ref, alone):
            assert d.status == "critical", _findings(d)
            assert _critical(d) == {"precision_underflow": norms}
            f = next(f for f in d.findings if f.severity == "critical")
            assert "bf16_stochastic_round=True" in f.recommendation and "--train.precision" not in f.recommendation
            assert d.checkpoint["stack"] == ["torchao", "torch"]
        assert (
            "still equals 1, its initial value" in next(f for f in alone.findings if f.severity == "critical").summary
        )


@pytest.mark.parametrize("kahan", [True, False])
def test_optimi_kahan_summation(tmp_path, kahan):
    """torch-optimi's AdamW on bf16 weights: with kahan_sum=True its state holds kahan_comp, updates below half a ULP
    are kept, and no precision finding is made with or without the reference; with kahan_sum=False the norm gains
    stay at 1.0 (critical both ways) and the fix names kahan_sum=True."""
    import optimi

    model, frozen = _bf16_run(
        tmp_path, lambda m: optimi.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0, kahan_sum=kahan), steps=16
    )
    norms = set(norm_names(model))
    with_ref, alone = _both(tmp_path / "final.pt", tmp_path / "init.pt")
    if kahan:
        assert frozen == set()
        for d in (with_ref, alone):
            assert _precision(d) == [] and _critical(d) == {}, _findings(d)
            assert all(e.subulp_kept for e in d.evidence if e.low_precision and e.optimizer)
    else:
        assert frozen == norms
        for d in (with_ref, alone):
            assert d.status == "critical", _findings(d)
            assert _critical(d) == {"precision_underflow": norms}
            f = next(f for f in d.findings if f.severity == "critical")
            assert "kahan_sum=True" in f.recommendation and d.checkpoint["stack"][0] == "optimi"


def test_plain_bf16_forecast_is_worded_as_a_forecast(tmp_path):
    """Plain AdamW on bf16 weights at 1e-3 with a cosine decay to 1e-5: the norms stay at 1.0 (proof alone), every
    other tensor moved. Alone, tensors whose updates round away at the final (small) lr get a warning that says
    so ("from now on"), never that they did not move; with the reference they get nothing."""
    torch.manual_seed(0)
    model = Net().to(torch.bfloat16)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 12, eta_min=1e-5)
    torch.save({"model": model.state_dict(), "step": 0}, tmp_path / "init.pt")
    _steps(model, opt, 12, sched)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 12}, tmp_path / "final.pt")
    frozen = _unchanged(model, init)
    norms = set(norm_names(model))
    assert frozen == norms
    with_ref, alone = _both(tmp_path / "final.pt", tmp_path / "init.pt")
    for d in (with_ref, alone):
        assert _critical(d) == {"precision_underflow": norms}, _findings(d)
    forecast = [f for f in alone.findings if f.evidence.get("basis") == "forecast"]
    assert forecast and all(f.severity == "warning" for f in forecast)
    for f in forecast:
        assert "from now on" in f.summary and "round away at the current lr" in f.summary
        assert "did not change" not in f.summary and "never changed" not in f.summary
        assert not set(f.tensors) & frozen  # the moved tensors: never called frozen
    assert not [f for f in with_ref.findings if f.evidence.get("basis") == "forecast"]


# ---------------------------------------------------------------------------------------------- Hugging Face Trainer
HF_STEPS = 10


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory):
    """transformers' Trainer on a tiny Llama (AdamW 3e-4, linear decay to 0), stored in bf16 (the seed's bug) or
    in fp32 with TrainingArguments(bf16=True) (the fix); the initial weights saved with save_pretrained. Returns
    {mode: (checkpoint folder, init folder, the tensors bitwise unchanged by training)}."""
    pytest.importorskip("transformers")
    import transformers
    from arch_runs import Pattern, _build
    from transformers import Trainer, TrainingArguments

    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("hf")
    runs = {}
    for mode in ("bf16", "autocast"):
        torch.manual_seed(0)
        model = _build("llama")
        model = model.to(torch.bfloat16) if mode == "bf16" else model
        model.save_pretrained(root / mode / "init")
        w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        args = TrainingArguments(
            output_dir=str(root / mode),
            max_steps=HF_STEPS,
            per_device_train_batch_size=8,
            learning_rate=3e-4,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            save_steps=HF_STEPS,
            bf16=mode == "autocast",
            seed=0,
        )
        Trainer(model=model, args=args, train_dataset=Pattern(HF_STEPS * 8)).train()
        frozen = {n for n, p in model.named_parameters() if torch.equal(p.detach(), w0[n])}
        runs[mode] = (root / mode / f"checkpoint-{HF_STEPS}", root / mode / "init", frozen)
    return runs


@pytest.mark.parametrize("mode", ["bf16", "autocast"])
def test_hf_trainer_bf16_stored_llama(hf_runs, mode):
    """A Llama stored in bf16 in transformers' Trainer (AdamW 3e-4, linear decay to 0): the 5 RMSNorm gains never
    move; with the reference and alone (every element still 1.0) the same critical finding, with the fix in the
    Trainer's words; the twin with fp32 weights and bf16 autocast is healthy both ways."""
    checkpoint, init, frozen = hf_runs[mode]
    with_ref, alone = _both(checkpoint, init)
    if mode == "autocast":
        assert frozen == set()
        for d in (with_ref, alone):
            assert d.status == "healthy", _findings(d)
        return
    assert len(frozen) == 5 and all(n.endswith("norm.weight") for n in frozen)
    for d in (with_ref, alone):
        assert d.status == "critical", _findings(d)
        assert _critical(d) == {"precision_underflow": frozen}
        assert len(_precision(d)) == 1  # lr 0 at the end: no forecast either
        rec = _precision(d)[0].recommendation
        assert "TrainingArguments(bf16=True)" in rec and "float32" in rec and "--train.precision" not in rec
        assert d.checkpoint["stack"] == ["hf-trainer", "torch"]


def test_hf_trainer_without_optimizer_state_is_inconclusive_and_says_which_file(hf_runs, tmp_path):
    """The Trainer's checkpoint folder without optimizer.pt (a weights-only save): alone the doctor cannot tell, and
    says which fact is missing and which file settles it; with the reference the verdict is there."""
    checkpoint, init, _ = hf_runs["autocast"]
    folder = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, folder)
    (folder / "optimizer.pt").unlink()
    with_ref, alone = _both(folder, init)
    assert with_ref.status == "healthy", _findings(with_ref)
    assert alone.status == "inconclusive" and len(alone.inconclusive) == 1
    reason = alone.inconclusive[0]
    assert reason.startswith("missing: neither optimizer state nor a reference")
    assert "optimizer.pt" in reason and "save_only_model=False" in reason and "--against" in reason
    assert "save_pretrained('init')" in reason


# ---------------------------------------------------------------------------------------------- accelerate
def _accelerate_run(out, precision: str, saved: str) -> tuple[set[str], set[str]]:
    """A plain loop under accelerate.Accelerator on CPU (AdamW 3e-4), the state saved with save_state at step 0 and
    after 12 steps: the model stored in bf16 ("bf16") or in fp32 with Accelerator(mixed_precision="bf16")
    ("mixed"). ``saved``: "param_names" (optimizer built on named_parameters(), default safetensors save), "bin"
    (save_state(safe_serialization=False): the weights in registration order), "safetensors" (the defaults: sorted
    names, no param_names). Returns (the tensors bitwise unchanged, the norm gains)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # the state is process-wide: each run (and the Trainer's) sets its own
    try:
        acc = Accelerator(cpu=True, mixed_precision="bf16" if precision == "mixed" else "no")
        torch.manual_seed(0)
        model = Net().to(torch.bfloat16) if precision == "bf16" else Net()
        params = model.named_parameters() if saved == "param_names" else model.parameters()
        model, opt = acc.prepare(model, torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0))
        w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        acc.save_state(out / "init", safe_serialization=saved != "bin")
        g = torch.Generator().manual_seed(0)
        for _ in range(12):
            tok = (torch.randint(0, 64, (8, 1), generator=g) + torch.arange(9)) % 64
            logits = model(tok[:, :-1]).float()
            acc.backward(nn.functional.cross_entropy(logits.reshape(-1, 64), tok[:, 1:].reshape(-1)))
            opt.step()
            opt.zero_grad()
        acc.save_state(out / "final", safe_serialization=saved != "bin")
        return _unchanged(model, w0), set(norm_names(model))
    finally:
        AcceleratorState._reset_state(True)


@pytest.mark.parametrize("saved", ["param_names", "bin"])
@pytest.mark.parametrize("precision", ["bf16", "mixed"])
def test_accelerate_bf16_stored_model(tmp_path, precision, saved):
    """accelerate's save_state folders of a bf16-stored model at AdamW 3e-4: the norm gains never leave 1.0, and
    precision_underflow names exactly them with and without the reference, with the fix in accelerate's words; the
    twin with fp32 weights and Accelerator(mixed_precision="bf16") is healthy both ways."""
    pytest.importorskip("accelerate")
    frozen, norms = _accelerate_run(tmp_path, precision, saved)
    with_ref, alone = _both(tmp_path / "final", tmp_path / "init")
    for d in (with_ref, alone):
        assert d.checkpoint["format"] == "accelerate" and d.checkpoint["stack"] == ["accelerate", "torch"]
    if precision == "mixed":
        assert frozen == set()
        for d in (with_ref, alone):
            assert d.status == "healthy", _findings(d)
        return
    assert frozen == norms
    for d in (with_ref, alone):
        assert d.status == "critical", _findings(d)
        assert _critical(d) == {"precision_underflow": norms}
        assert [set(f.tensors) for f in _precision(d)] == [norms], _findings(d)
        rec = _precision(d)[0].recommendation
        assert "Accelerator(mixed_precision='bf16')" in rec and "float32" in rec and "--train.precision" not in rec


def test_accelerate_default_save_without_param_names_is_honest_alone(tmp_path):
    """save_state's defaults with an optimizer over model.parameters(): safetensors sorts the names, so the optimizer
    state cannot be mapped to the tensors. Alone the doctor says so (inconclusive, naming what settles it), never
    healthy and never a finding; with the reference the frozen norm gains are found critical."""
    pytest.importorskip("accelerate")
    frozen, norms = _accelerate_run(tmp_path, "bf16", "safetensors")
    assert frozen == norms
    with_ref, alone = _both(tmp_path / "final", tmp_path / "init")
    assert with_ref.status == "critical" and set().union(*_critical(with_ref).values()) == norms, _findings(with_ref)
    assert alone.status == "inconclusive" and alone.findings == [], _findings(alone)
    reason = " ".join(alone.inconclusive)
    assert "param_names" in reason and "accelerator.save_state before the first step" in reason


# ---------------------------------------------------------------------------------------------- Lightning
@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_lightning_bf16_true(tmp_path, precision):
    """Lightning precision="bf16-true" (weights in bf16), AdamW 3e-4: the norm gains freeze; critical on exactly them
    with the reference and alone, the fix says precision="bf16-mixed", and no tensor that moved is called frozen
    (alone, a forecast at most). The bf16-mixed twin (fp32 weights) is healthy both ways."""
    L = pytest.importorskip("lightning.pytorch")
    from plain_runs import lightning_module

    module = lightning_module(lambda m: torch.optim.AdamW(m.parameters(), lr=3e-4, weight_decay=0.0))

    class SaveInitial(L.Callback):
        def on_train_start(self, trainer, module):
            trainer.save_checkpoint(tmp_path / "init.ckpt")

    w0 = {}

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, module):
            w0.update({n: p.detach().clone() for n, p in module.named_parameters()})

    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 64, (160, 1), generator=g)
    data = torch.utils.data.TensorDataset((start + torch.arange(9)) % 64)
    trainer = lightning_trainer(tmp_path, 20, [SaveInitial(), Snapshot()], precision=precision)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    trainer.save_checkpoint(tmp_path / "final.ckpt")
    frozen = {n.removeprefix("net.") for n, p in module.named_parameters() if torch.equal(p.detach(), w0[n])}
    with_ref, alone = _both(tmp_path / "final.ckpt", tmp_path / "init.ckpt")
    names = {e.name for e in alone.evidence}
    frozen = {n for n in names if n.removeprefix("net.") in frozen}
    if precision == "bf16-mixed":
        assert frozen == set()
        for d in (with_ref, alone):
            assert d.status == "healthy", _findings(d)
        return
    assert frozen and all(n.endswith("norm.weight") for n in frozen)
    for d in (with_ref, alone):
        assert d.status == "critical", _findings(d)
        assert _critical(d) == {"precision_underflow": frozen}
        f = next(f for f in d.findings if f.severity == "critical")
        assert 'precision="bf16-mixed"' in f.recommendation and "--train.precision" not in f.recommendation
        assert d.checkpoint["stack"] == ["lightning", "torch"]
        for w in (f for f in _precision(d) if f.severity == "warning"):
            assert not set(w.tensors) & frozen
            assert "from now on" in w.summary or "never changed" in w.summary, w.summary


# ---------------------------------------------------------------------------------------------- our trainer
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-pure", "bf16-compensated"])
def test_our_trainer_gets_our_flags(small_cfg, precision):
    """This project's trainer: its own runs (and only they) get --train.precision flags. bf16-pure freezes the norm
    gains at lr 3e-4; bf16-compensated keeps what rounding drops (its compensation buffers are in the checkpoint):
    no precision finding, with or without the step-0 reference."""
    import dataclasses
    from pathlib import Path

    from moe_arch.training.trainer import Trainer

    cfg = dataclasses.replace(
        small_cfg,
        train=dataclasses.replace(small_cfg.train, precision=precision, steps=8),
        optim=dataclasses.replace(small_cfg.optim, adamw_lr=3e-4, muon_lr=3e-4),
    )
    Trainer(cfg).run()
    ckpts = Path(cfg.train.out_dir) / "t" / "checkpoints"
    final = sorted(p for p in ckpts.glob("*.pt") if p.name != "step_0000000.pt")[-1]
    with_ref = diagnose(str(final), DiagnoseOptions(probe=False))  # our run: step 0 is the default reference
    assert with_ref.checkpoint["reference"] is not None
    shutil.move(ckpts / "step_0000000.pt", ckpts.parent / "step0.pt")
    alone = diagnose(str(final), DiagnoseOptions(probe=False))
    assert alone.checkpoint["reference"] is None
    for d in (with_ref, alone):
        pu = [f for f in d.findings if f.cause == "precision_underflow"]
        if precision == "bf16-compensated":
            assert pu == [], _findings(d)
        else:
            crit = [f for f in pu if f.severity == "critical"]
            assert crit and "--train.precision bf16-mixed" in crit[0].recommendation
            assert d.checkpoint["stack"] == ["moe_arch", "torch"]
    if precision == "bf16-pure":
        # Alone, the proof is the initial constant: the norm gains (all ones) are found as with the reference;
        # frozen tensors of random initial values (Mamba's dt_proj.bias) need the reference, and are never called
        # frozen alone.
        at_init = {e.name for e in alone.evidence if (e.frac_at_init or 0) >= 0.99}
        assert _critical(alone)["precision_underflow"] == _critical(with_ref)["precision_underflow"] & at_init
        assert {n for n in at_init if n.endswith("norm.weight")} <= _critical(alone)["precision_underflow"]
