"""Replicas out of sync in per-rank ``torch.save`` files, written by a real 2-rank gloo DDP loop inside the test:

- ``healthy``: DDP keeps the replicas equal; every rank saves ``ckpt_step{0,4}_rank{r}.pt`` (both sets in one
  folder: the newest is read). Silent.
- ``edited``: rank 1 changes ``2.weight`` under ``torch.no_grad()`` after DDP was built (and after the step-0
  save): the gradients stay synchronised, so exactly that tensor differs, by about the edit.
- ``desynced``: the pytorch#104336 pattern: the model is converted after DDP wrapped it, in a way that replaces its
  Parameter objects (``model.cpu(); model.cuda()`` there; ``double(); float()`` under
  ``set_overwrite_module_params_on_conversion(True)`` here, on CPU); DDP's hooks stay on the old parameters, every
  rank trains on its own data, all replicas drift. Saved as ``step{0,4}/rank_{r}/model.pt`` (DDP's own
  ``state_dict``, ``module.`` prefixes), beside each rank's ``rank_{r}/optim.pt`` and ``rng_rank{r}.pth`` (saved
  later: the newest files hold no model).
- ``shards``: hand-written tensor parallelism without DDP: the head's weight is a shard per rank (its own
  initialisation), its bias a shard that starts at zero on every rank and trains apart; the rest is replicated and
  its gradients all-reduced by hand. Silent: a set with a shard is model-parallel, only its norm is compared.
- ``mp`` / ``mp_edited``: the same hand-written TP saved as Megatron-style ``mp_rank_0{r}/model_optim_rng.pt``
  (only the norms are replicas); in ``mp_edited`` rank 1 edits the norm after the step-0 save.
- built from those files in the test: ``stale_*`` (step-0 files of the same run as ranks 2 and 3 beside step 4's
  ranks 0 and 1: left out), ``sweep`` (a user's top-k ``best_rank{1,2,3}.pt`` of three runs from one init: no
  rank 0, not compared), ``crashed`` (rank 1's file truncated: rank 0 is still diagnosed).

Each case is diagnosed with and without the step-0 save as the reference. This file is also the worker
(``python test_replicas_per_rank.py OUT`` under ``torch.distributed.run``).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from plain_runs import Norm
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable")
STEPS = 4


def _net(named: bool = False) -> nn.Module:
    """The model; ``named``: its modules named ``embed``, ``norm``, ``head`` (the model-parallel rule finds the
    norms by name)."""
    torch.manual_seed(0)
    modules = [nn.Embedding(32, 16), Norm(16), nn.Linear(16, 32)]
    return nn.Sequential(OrderedDict(zip(("embed", "norm", "head"), modules))) if named else nn.Sequential(*modules)


def _backward(model, opt, g) -> None:
    tok = torch.randint(0, 32, (4, 8), generator=g)
    opt.zero_grad()
    nn.functional.cross_entropy(model(tok[:, :-1]).reshape(-1, 32), tok[:, 1:].reshape(-1)).backward()


def worker(out: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    wrappers = []
    for case in ("healthy", "edited", "desynced"):
        net = _net()
        ddp = DDP(net)
        wrappers.append(ddp)
        if case == "desynced":
            torch.__future__.set_overwrite_module_params_on_conversion(True)
            net.double()
            net.float()
            torch.__future__.set_overwrite_module_params_on_conversion(False)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(rank)  # each rank its own data, as DDP loops do

        def save(step: int) -> None:
            if case == "desynced":  # a bare state dict of the DDP wrapper, in a rank folder
                path = out / case / f"step{step}" / f"rank_{rank}" / "model.pt"
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(ddp.state_dict(), path)
                # saved after the model: the newest per-rank files are an optimizer state and RNG states
                torch.save(opt.state_dict(), path.parent / "optim.pt")
                torch.save(_rng_state(), path.parent.parent / f"rng_rank{rank}.pth")
            else:
                (out / case).mkdir(parents=True, exist_ok=True)
                ckpt = {"model": net.state_dict(), "optimizer": opt.state_dict(), "step": step}
                torch.save(ckpt, out / case / f"ckpt_step{step}_rank{rank}.pt")

        save(0)
        if case == "edited" and rank == 1:
            with torch.no_grad():
                net[2].weight.add_(1e-3)
        for _ in range(STEPS):
            _backward(ddp, opt, g)
            opt.step()
        save(STEPS)
    for case in ("shards", "mp", "mp_edited"):
        _tensor_parallel(out, case, rank)
    del wrappers  # the DDP reducers go before their process group (their gloo threads must not outlive it)
    dist.barrier()
    dist.destroy_process_group()


def _rng_state() -> dict:
    import numpy as np  # lazy: only the worker saves RNG states, as HF Trainer's rng_state_{r}.pth holds them

    return {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}


def _tensor_parallel(out: Path, case: str, rank: int) -> None:
    """Hand-written tensor parallelism: the head's weight is a shard per rank from this rank's own seed, its bias a
    shard that starts at zero (as nn.Linear shards are often initialised) and trains apart; the embedding and the
    norm are replicated, their gradients all-reduced by hand."""
    import torch.distributed as dist

    net = _net(named=True)
    shard = torch.Generator().manual_seed(100 + rank)
    with torch.no_grad():
        net[2].weight.copy_(torch.randn(net[2].weight.shape, generator=shard) * 0.1)
        net[2].bias.zero_()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)  # every TP rank sees the same batch

    def save(step: int) -> None:
        if case == "shards":
            path = out / case / f"step{step}" / f"model_rank{rank}.pt"
        else:
            path = out / case / f"step{step}" / f"mp_rank_0{rank}" / "model_optim_rng.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "step": step}, path)

    save(0)
    if case == "mp_edited" and rank == 1:
        with torch.no_grad():
            net[1].weight.add_(1e-3)
    for _ in range(STEPS):
        _backward(net, opt, g)
        for p in (net[0].weight, net[1].weight):  # the replicated tensors' gradients, summed over the TP group
            dist.all_reduce(p.grad)
        opt.step()
    save(STEPS)


def _sweep(base: Path) -> None:
    """A user's top-k folder: three runs from one init with different learning rates, saved as best_rank{k}.pt
    (k: the run's place, no rank 0); the init is saved beside the folder as the reference."""
    (base / "sweep").mkdir()
    torch.save({"model": _net().state_dict(), "step": 0}, base / "sweep_init.pt")
    for k, lr in ((1, 1e-2), (2, 3e-3), (3, 1e-3)):
        net = _net()
        opt = torch.optim.AdamW(net.parameters(), lr=lr)
        g = torch.Generator().manual_seed(0)
        for _ in range(STEPS):
            _backward(net, opt, g)
            opt.step()
        torch.save({"model": net.state_dict(), "step": STEPS}, base / "sweep" / f"best_rank{k}.pt")


def _copied(base: Path) -> None:
    """Folders made of the run's own files: stale ranks 2 and 3 (step-0 saves) beside step 4's ranks 0 and 1; a
    rank 1 whose save was cut short."""
    for case in ("healthy", "edited"):
        folder = base / f"stale_{case}"
        folder.mkdir()
        for r in (0, 1):
            shutil.copy(base / case / f"ckpt_step{STEPS}_rank{r}.pt", folder / f"ckpt_rank{r}.pt")
            shutil.copy(base / case / f"ckpt_step0_rank{r}.pt", folder / f"ckpt_rank{r + 2}.pt")
    (base / "crashed").mkdir()
    for r in (0, 1):
        shutil.copy(base / "edited" / f"ckpt_step{STEPS}_rank{r}.pt", base / "crashed" / f"ckpt_rank{r}.pt")
    with open(base / "crashed" / "ckpt_rank1.pt", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("per_rank")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, str(base)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=base, timeout=240)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])
    _sweep(base)
    _copied(base)
    return base


# which checkpoint, which reference (None: no reference)
CASES = {
    "healthy": ("healthy", "healthy/ckpt_step0_rank0.pt"),
    "edited": ("edited", "edited/ckpt_step0_rank0.pt"),
    "desynced": ("desynced/step4", "desynced/step0"),
    "shards": ("shards/step4", "shards/step0"),
    "mp": ("mp/step4", "mp/step0"),
    "mp_edited": ("mp_edited/step4", "mp_edited/step0"),
    "stale_healthy": ("stale_healthy", "healthy/ckpt_step0_rank0.pt"),
    "stale_edited": ("stale_edited", "edited/ckpt_step0_rank0.pt"),
    "sweep": ("sweep", "sweep_init.pt"),
    "crashed": ("crashed", "edited/ckpt_step0_rank0.pt"),
}


def _diagnose(runs: Path, case: str, with_reference: bool):
    from moe_arch.doctor.pipeline import DiagnoseOptions, diagnose

    path, ref = CASES[case]
    d = diagnose(runs / path, DiagnoseOptions(against=str(runs / ref) if with_reference else None))
    return d, [f for f in d.findings if f.cause == "replicas_diverged"]


def _copies(runs: Path, case: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    from moe_arch.checkpoint.readers import open_checkpoint

    view = open_checkpoint(runs / CASES[case][0])
    return view.replicas[name][0].get(), view.replicas[name][1].get()


def test_per_rank_saves_are_read_as_one_checkpoint_with_each_rank_copy(runs):
    from moe_arch.checkpoint.readers import open_checkpoint

    names = {"0.weight", "1.weight", "2.weight", "2.bias"}
    # two saves in one folder: the newest set (step 4); rank 0's file is the checkpoint
    view = open_checkpoint(runs / "healthy")
    assert view.meta["step"] == STEPS and set(view.replicas) == names
    assert {r: Path(p).name for r, p in view.meta["per_rank_files"].items()} == {
        0: f"ckpt_step{STEPS}_rank0.pt",
        1: f"ckpt_step{STEPS}_rank1.pt",
    }
    assert view.optimizers and any("ckpt_step0_rank{r}.pt" in n for n in view.notes)
    # rank folders holding DDP's bare state dict ("module." prefixes stripped)
    view = open_checkpoint(runs / "desynced" / "step4")
    assert set(view.replicas) == names and all(set(c) == {0, 1} for c in view.replicas.values())
    assert Path(view.meta["per_rank_files"][1]).parts[-2:] == ("rank_1", "model.pt")
    # the newer optimizer and RNG files of the same ranks were tried first and passed over, named in a note
    (note,) = [n for n in view.notes if "without a model state" in n]
    assert "rank_{r}/optim.pt" in note and "rng_rank{r}.pth" in note


def test_only_one_run_s_ranks_at_one_step_are_compared(runs):
    from moe_arch.checkpoint.readers import open_checkpoint
    from moe_arch.checkpoint.readers.per_rank import is_per_rank_dir

    # stale ranks 2 and 3 (step 0) beside ranks 0 and 1 (step 4): left out, and said so
    view = open_checkpoint(runs / "stale_healthy")
    assert view.meta["step"] == STEPS and all(set(c) == {0, 1} for c in view.replicas.values())
    assert any("rank 2 saved step 0" in n for n in view.notes) and any("rank 3 saved step 0" in n for n in view.notes)
    # a top-k folder (no rank 0): the lowest file is the checkpoint, nothing is compared
    view = open_checkpoint(runs / "sweep")
    assert view.replicas == {} and Path(view.meta["per_rank_files"][1]).name == "best_rank1.pt"
    assert any("are not 0..2" in n for n in view.notes)
    # rank 1's save was cut short: rank 0's checkpoint is still read, rank 1 left out
    view = open_checkpoint(runs / "crashed")
    assert view.replicas == {} and view.meta["step"] == STEPS
    assert any("rank 1's file cannot be read" in n for n in view.notes)
    # Megatron-style model-parallel folders: only the norms are replicas
    view = open_checkpoint(runs / "mp" / "step4")
    assert view.meta["replicated"] == "model_parallel_ranks" and set(view.replicas) >= {"norm.weight"}
    # names of model-parallel and FSDP per-rank files (the labels the reader gives a set)
    from moe_arch.checkpoint.readers.per_rank import _MODEL_PARALLEL, _NO_COPIES

    assert [bool(_MODEL_PARALLEL.search(x)) for x in ("mp_rank_{r}/m.pt", "tp_rank{r}.pt", "step_rank{r}.pt")] == [
        True,
        True,
        False,
    ]
    assert [bool(_NO_COPIES.search(x)) for x in ("pytorch_model_fsdp_rank{r}.bin", "pp_rank{r}.pt", "app_rank{r}")] == [
        True,
        True,
        False,
    ]
    # a Hugging Face checkpoint-N with rank-named files is the hf reader's
    hf = runs / "hf_like"
    shutil.copytree(runs / "stale_healthy", hf)
    assert is_per_rank_dir(hf)
    (hf / "trainer_state.json").write_text("{}")
    assert not is_per_rank_dir(hf)


@pytest.mark.parametrize("with_reference", [False, True])
def test_a_parameter_edited_on_one_rank_is_named_with_rank_and_difference(runs, with_reference):
    d, found = _diagnose(runs, "edited", with_reference)
    (f,) = found
    assert f.severity == "critical" and d.status == "critical"
    assert f.tensors == ["2.weight"]  # the synchronised tensors are equal: only the edited one is named
    a, b = _copies(runs, "edited", "2.weight")
    assert f.evidence["ranks"] == [1] and f.evidence["source"] == "each rank's torch.save file"
    assert f.evidence["max_abs_diff"] == float((a.double() - b.double()).abs().max())
    assert abs(f.evidence["max_abs_diff"] - 1e-3) < 1e-5
    assert "2.weight" in f.summary and "ranks [1]" in f.summary


@pytest.mark.parametrize("with_reference", [False, True])
@pytest.mark.parametrize("case", ["stale_edited", "mp_edited"])
def test_an_edit_is_found_beside_stale_ranks_and_in_model_parallel_norms(runs, case, with_reference):
    d, found = _diagnose(runs, case, with_reference)
    (f,) = found
    # stale ranks 2 and 3 hold step-0 values: compared, they would be named too
    assert f.evidence["ranks"] == [1] and d.status == "critical"
    name = "2.weight" if case == "stale_edited" else "norm.weight"  # the model-parallel set: its norm only
    assert f.tensors == [name]
    a, b = _copies(runs, case, name)
    assert f.evidence["max_abs_diff"] == float((a.double() - b.double()).abs().max())


@pytest.mark.parametrize("with_reference", [False, True])
def test_ddp_that_stopped_synchronising_is_named_on_every_tensor(runs, with_reference):
    d, found = _diagnose(runs, "desynced", with_reference)
    (f,) = found
    assert sorted(f.tensors) == ["0.weight", "1.weight", "2.bias", "2.weight"]
    assert f.evidence["ranks"] == [1] and f.evidence["left_out_as_shards"] == []
    worst = max(
        float((a.double() - b.double()).abs().max()) for a, b in (_copies(runs, "desynced", n) for n in f.tensors)
    )
    assert f.evidence["max_abs_diff"] == worst > 0


@pytest.mark.parametrize("with_reference", [False, True])
@pytest.mark.parametrize("case", ["healthy", "shards", "mp", "stale_healthy", "sweep", "crashed"])
def test_replicas_in_sync_and_per_rank_shards_stay_silent(runs, case, with_reference):
    tp = case in ("shards", "mp")
    if case in ("healthy", "shards", "mp", "stale_healthy"):
        a, b = _copies(runs, case, "norm.weight" if tp else "1.weight")
        assert torch.equal(a, b)
    if tp:  # the shards differ (a naive same-name comparison would raise a false alarm)
        for name in ("head.weight", "head.bias"):
            a, b = _copies(runs, case, name)
            assert not torch.equal(a, b)
        # the bias shards started equal (zero) and stay close: no cosine test on them tells them from replicas
        a, b = (t.double() for t in _copies(runs, case, "head.bias"))
        assert float(a @ b) / float(a.norm() * b.norm()) > 0.5
    if case == "sweep":  # three runs from one init: close, and different
        a, b = (torch.load(runs / "sweep" / f"best_rank{k}.pt")["model"]["2.weight"] for k in (1, 2))
        assert not torch.equal(a, b)
    d, found = _diagnose(runs, case, with_reference)
    assert found == [], [f.summary for f in found]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    worker(Path(sys.argv[1]))
    # a gloo thread can abort in interpreter teardown after the work is done: exit without that teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
