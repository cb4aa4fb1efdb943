"""Replicas out of sync in per-rank ``torch.save`` files, written by a real 2-rank gloo DDP loop inside the test:

- ``healthy``: DDP keeps the replicas equal; every rank saves ``ckpt_step{0,4}_rank{r}.pt`` (both sets in one
  folder: the newest is read). Silent.
- ``edited``: rank 1 changes ``2.weight`` under ``torch.no_grad()`` after DDP was built (and after the step-0
  save): the gradients stay synchronised, so exactly that tensor differs, by about the edit.
- ``desynced``: the pytorch#104336 pattern: the model is converted after DDP wrapped it, in a way that replaces its
  Parameter objects (``model.cpu(); model.cuda()`` there; ``double(); float()`` under
  ``set_overwrite_module_params_on_conversion(True)`` here, on CPU); DDP's hooks stay on the old parameters, every
  rank trains on its own data, all replicas drift. Saved as ``step{0,4}/rank_{r}/model.pt`` (DDP's own
  ``state_dict``, ``module.`` prefixes).
- ``shards``: hand-written tensor parallelism without DDP: the head is a shard per rank (its own initialisation),
  the rest is replicated and its gradients all-reduced by hand. Silent: the shards are different tensors, not a
  drifted replica.

Each case is diagnosed with and without the step-0 save as the reference. This file is also the worker
(``python test_replicas_per_rank.py OUT`` under ``torch.distributed.run``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable")
STEPS = 4


class Norm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(32, 16), Norm(16), nn.Linear(16, 32))


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
    # hand-written tensor parallelism: the head (weight and bias) is a shard per rank, from this rank's own seed
    net = _net()
    shard = torch.Generator().manual_seed(100 + rank)
    with torch.no_grad():
        for p in net[2].parameters():
            p.copy_(torch.randn(p.shape, generator=shard) * 0.1)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)  # every TP rank sees the same batch

    def save_shards(step: int) -> None:
        path = out / "shards" / f"step{step}" / f"model_rank{rank}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "step": step}, path)

    save_shards(0)
    for _ in range(STEPS):
        _backward(net, opt, g)
        for p in (net[0].weight, net[1].weight):  # the replicated tensors' gradients, summed over the TP group
            dist.all_reduce(p.grad)
        opt.step()
    save_shards(STEPS)
    del wrappers  # the DDP reducers go before their process group (their gloo threads must not outlive it)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("per_rank")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, str(base)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=base, timeout=240)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])
    return base


# which checkpoint, which reference (None: no reference)
CASES = {
    "healthy": ("healthy", "healthy/ckpt_step0_rank0.pt"),
    "edited": ("edited", "edited/ckpt_step0_rank0.pt"),
    "desynced": ("desynced/step4", "desynced/step0"),
    "shards": ("shards/step4", "shards/step0"),
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
@pytest.mark.parametrize("case", ["healthy", "shards"])
def test_replicas_in_sync_and_per_rank_shards_stay_silent(runs, case, with_reference):
    a, b = _copies(runs, case, "1.weight")
    assert torch.equal(a, b)
    if case == "shards":  # the shards differ (a naive same-name comparison would raise a false alarm)
        a, b = _copies(runs, case, "2.weight")
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
