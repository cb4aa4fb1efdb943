"""Replicas out of sync, on files and runs the stacks write themselves, each with a healthy twin:

- DeepSpeed with tensor parallelism over 2 gloo ranks (a Megatron-style ``mpu``: each rank saves its own
  ``mp_rank_XX_model_states.pt``; the column-parallel ``fc`` is a shard per rank, the norms and the embedding are
  replicated and their gradients all-reduced over the TP group). The broken twin skips that all-reduce for one
  LayerNorm (the BLOOM-176B bug class): its copies drift while the loss looks normal.
- DDP over 2 gloo ranks with the live monitor: one rank nudges a norm weight outside DDP at step 3; the monitor's
  replica fingerprints name it at step 3, the healthy twin (same run, no nudge) stays silent; and a hand-written
  tensor-parallel loop without DDP, whose shards differ from the start, is not alerted (the shards are left out).

Each case runs under ``torch.distributed.run``: this file is also the worker (``python test_replicas.py MODE ...``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from plain_runs import Norm
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable")


class TPNet(nn.Module):
    """Replicated over tensor parallelism: ``embed``, ``norm``, ``final_norm``; column-parallel: ``fc`` (each rank
    its own slice of the output vocabulary, all-gathered)."""

    def __init__(self, rank: int, tp: int, d: int = 16, vocab: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, d)
        self.norm = Norm(d)
        self.final_norm = Norm(d)
        self.fc = nn.Linear(d, vocab // tp)
        g = torch.Generator().manual_seed(100 + rank)  # shards differ by design
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(self.fc.weight.shape, generator=g) * 0.1)
            self.fc.bias.zero_()

    def forward(self, tok):
        # lazy: torch.distributed.nn is only needed in the worker processes
        from torch.distributed.nn.functional import all_gather

        h = self.final_norm(torch.relu(self.norm(self.embed(tok))))
        return torch.cat(all_gather(self.fc(h)), -1)


class MPU:
    """The model-parallel unit DeepSpeed takes from Megatron: every rank is one TP rank, data parallelism 1."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.dp = [dist.new_group([r]) for r in range(dist.get_world_size())][dist.get_rank()]

    def get_model_parallel_rank(self):
        return self.dist.get_rank()

    def get_model_parallel_world_size(self):
        return self.dist.get_world_size()

    def get_model_parallel_group(self):
        return self.dist.group.WORLD

    def get_data_parallel_rank(self):
        return 0

    def get_data_parallel_world_size(self):
        return 1

    def get_data_parallel_group(self):
        return self.dp


def deepspeed_tp_worker(out: str, drift: bool) -> None:
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    model = TPNet(rank, dist.get_world_size())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=opt,
        mpu=MPU(),
        config={"train_batch_size": 8, "zero_optimization": {"stage": 0}, "steps_per_print": 10_000},
    )
    engine.save_checkpoint(out)  # global_step0: the reference
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)  # every TP rank sees the same batch
    for _ in range(4):
        tok = torch.randint(0, 32, (8, 8), generator=g)
        loss = nn.functional.cross_entropy(engine(tok[:, :-1]).reshape(-1, 32), tok[:, 1:].reshape(-1))
        engine.backward(loss)
        for n in ("embed.weight", "norm.weight", "final_norm.weight"):
            if not (drift and n == "norm.weight"):  # the planted bug: this replica's gradient is not synchronised
                dist.all_reduce(named[n].grad)
        engine.step()
    engine.save_checkpoint(out)  # global_step4


def ddp_monitor_worker(out: str) -> None:
    """Two DDP models trained side by side on the same data; in ``broken`` rank 1 nudges ``norm.weight`` during
    step 3 (outside DDP, as a per-rank edit or a re-wrapped model would)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from moe_arch.config import MonitorConfig
    from moe_arch.doctor.monitor import Monitor

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {}
    for twin in ("healthy", "broken"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Embedding(32, 16), Norm(16), nn.Linear(16, 32))
        ddp = DDP(net)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
        mon = Monitor(net, opt, MonitorConfig(replica_check_every=1), enabled_output=False)
        g = torch.Generator().manual_seed(rank)
        for step in range(1, 7):
            tok = torch.randint(0, 32, (4, 8), generator=g)
            loss = nn.functional.cross_entropy(ddp(tok[:, :-1]).reshape(-1, 32), tok[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            if twin == "broken" and step == 3 and rank == 1:
                with torch.no_grad():
                    net[1].weight.add_(1e-3)
            opt.step()  # the monitor's post-step hook runs the replica check (auto_check)
        result[twin] = [a.to_dict() for a in mon.alerts if a.cause == "replicas_diverged"]
        mon.close()
    # Hand-written tensor parallelism without DDP: the head is a shard per rank (different from the start), the rest
    # is replicated and its gradients all-reduced by hand. The shards are left out at construction, not alerted.
    # (A shard that starts equal on every rank, a zero-initialised column-parallel bias, cannot be told from a
    # replica this way: such loops set monitor.replica_check_every: 0.)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(32, 16), Norm(16), nn.Linear(16, 32, bias=False))
    with torch.no_grad():
        net[2].weight.mul_(rank + 1)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    mon = Monitor(net, opt, MonitorConfig(replica_check_every=1), enabled_output=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        tok = torch.randint(0, 32, (4, 8), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(net(tok[:, :-1]).reshape(-1, 32), tok[:, 1:].reshape(-1)).backward()
        for p in (net[0].weight, net[1].weight):
            dist.all_reduce(p.grad)
        opt.step()
    result["shards"] = {
        "alerts": [a.to_dict() for a in mon.alerts if a.cause == "replicas_diverged"],
        "excluded": mon._replicas.excluded,
        "checked": mon._replicas.n_tensors,
    }
    if rank == 0:
        Path(out).write_text(json.dumps(result, default=str))
    del ddp, mon  # the DDP reducer goes before its process group (its gloo threads must not outlive it)
    dist.barrier()
    dist.destroy_process_group()


def torchrun(tmp_path: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])


# ---------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    pytest.importorskip("deepspeed")
    base = tmp_path_factory.mktemp("ds_tp")
    runs = {}
    for twin, drift in (("healthy", "0"), ("broken", "1")):
        torchrun(base, "deepspeed", str(base / twin), drift)
        runs[twin] = base / twin
    return runs


@pytest.mark.parametrize("against", [None, "global_step0"])
def test_checkpoint_replicas_that_drifted_are_named_with_ranks_and_difference(deepspeed_runs, against):
    from moe_arch.checkpoint.readers import open_checkpoint
    from moe_arch.doctor.pipeline import DiagnoseOptions, diagnose

    run = deepspeed_runs["broken"]
    view = open_checkpoint(run)
    assert {0, 1} <= set(view.replicas["norm.weight"]) and set(view.replicas["fc.weight"]) == {0, 1}
    opts = DiagnoseOptions(against=str(run / against) if against else None)
    d = diagnose(run, opts)
    found = [f for f in d.findings if f.cause == "replicas_diverged"]
    assert len(found) == 1, [f.cause for f in d.findings]
    f = found[0]
    # Exactly the unsynchronised LayerNorm: the synchronised replicas and the column-parallel shards are not named.
    assert f.tensors == ["norm.weight"] and f.severity == "critical"
    a = view.replicas["norm.weight"][0].get()
    b = view.replicas["norm.weight"][1].get()
    assert f.evidence["ranks"] == [1]
    assert f.evidence["max_abs_diff"] == float((a.double() - b.double()).abs().max()) > 0
    assert "differ" in f.summary and "norm.weight" in f.summary and d.status == "critical"


@pytest.mark.parametrize("against", [None, "global_step0"])
def test_checkpoint_replicas_in_sync_stay_silent(deepspeed_runs, against):
    from moe_arch.checkpoint.readers import open_checkpoint
    from moe_arch.doctor.pipeline import DiagnoseOptions, diagnose

    run = deepspeed_runs["healthy"]
    view = open_checkpoint(run)
    # The shards differ (so a naive "same name, same shape" comparison would raise a false alarm) ...
    assert not torch.equal(view.replicas["fc.weight"][0].get(), view.replicas["fc.weight"][1].get())
    # ... and the replicated tensors are bitwise equal: nothing to report.
    for n in ("embed.weight", "norm.weight", "final_norm.weight"):
        assert torch.equal(view.replicas[n][0].get(), view.replicas[n][1].get())
    d = diagnose(run, DiagnoseOptions(against=str(run / against) if against else None))
    assert not [f for f in d.findings if f.cause == "replicas_diverged"]


def test_live_monitor_names_the_drifted_replica_at_its_first_step(tmp_path):
    out = tmp_path / "alerts.json"
    torchrun(tmp_path, "ddp", str(out))
    got = json.loads(out.read_text())
    assert got["healthy"] == []  # replicas kept in sync by DDP: silent
    (alert,) = got["broken"]
    assert alert["step"] == 3 and alert["severity"] == "critical"
    assert alert["tensors"] == ["1.weight"]
    ev = alert["evidence"]
    assert ev["ranks"] == [1] and abs(ev["max_abs_diff"] - 1e-3) < 1e-6
    assert "rank" in alert["message"] and "1.weight" in alert["message"]
    assert got["shards"] == {"alerts": [], "excluded": ["2.weight"], "checked": 2}


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1] == "deepspeed":
        deepspeed_tp_worker(sys.argv[2], sys.argv[3] == "1")
    else:
        ddp_monitor_worker(sys.argv[2])
    # Seen once in a loaded full run: a gloo thread aborting in interpreter teardown ("terminate called without an
    # active exception") after the work and the result file were done; exit without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
