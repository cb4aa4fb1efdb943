"""Routing health of MoE layers, on runs our trainer writes: per-layer load percentiles, max/mean and min/mean,
normalised entropy, from the model-aware probe and from the logged per-expert loads, and the ``moe_collapse``
finding when the load collapses. The broken run's routers are zeroed and frozen (every token then goes to the
same top-k experts: a router that collapsed); its healthy twin is the same run with its routers learning under
the Switch load-balance loss, and stays silent."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_checkpoint import with_train

from moe_arch.doctor.pipeline import DiagnoseOptions, diagnose
from moe_arch.doctor.routing import ENTROPY_ABOVE_TOP_K_COLLAPSE, collapse_reasons, routing_stats
from moe_arch.training.trainer import Trainer


def _run(cfg, collapse: bool) -> Path:
    t = Trainer(cfg, log=lambda *a, **k: None)
    if collapse:
        for name, p in t.raw_model.named_parameters():
            if name.endswith("router.weight"):  # every logit equal: top-k picks the same experts for every token
                with torch.no_grad():
                    p.zero_()
                p.requires_grad_(False)
    t.run()
    return Path(cfg.train.out_dir) / cfg.train.run_name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    from conftest import small_overrides

    from moe_arch.config import Config

    root = tmp_path_factory.mktemp("routing")
    out = {}
    for twin in ("healthy", "collapsed"):
        cfg = Config.from_dict(
            {
                "model": small_overrides(),
                "train": dict(
                    out_dir=str(root),
                    run_name=twin,
                    steps=12,
                    batch_size=4,
                    seq_len=32,
                    warmup_steps=2,
                    log_every=2,
                    eval_every=0,
                    eval_max_tokens=2048,
                    ckpt_every=0,
                    sample_tokens=0,
                    progress="none",
                    tensorboard=False,
                ),
                "data": dict(cache_dir=data_cache),
                "monitor": dict(enabled=False),
            }
        )
        out[twin] = _run(with_train(cfg), twin == "collapsed")
    return out


@pytest.fixture(scope="module")
def diagnoses(runs):
    return {twin: diagnose(run, DiagnoseOptions()) for twin, run in runs.items()}


def test_routing_stats_numbers():
    balanced = routing_stats([10, 10, 10, 10], top_k=2)
    assert balanced["entropy_normalised"] == pytest.approx(1.0) and balanced["entropy_above_top_k"] == pytest.approx(1)
    assert balanced["load_p50"] == balanced["load_max"] == balanced["min_over_mean"] == pytest.approx(1.0)
    assert collapse_reasons(balanced) == []
    on_two = routing_stats([20, 20, 0, 0], top_k=2)  # a top-2 router sending every token to the same two experts
    assert on_two["entropy_above_top_k"] == pytest.approx(0.0) and on_two["entropy_normalised"] == pytest.approx(0.5)
    assert on_two["max_over_mean"] == 2.0 and on_two["min_over_mean"] == 0.0 and on_two["dead_experts"] == [2, 3]
    assert collapse_reasons(on_two)
    skewed = routing_stats([70, 10, 5, 5, 4, 3, 2, 1], top_k=1)  # one expert with 5.6x the mean load
    assert skewed["load_max"] == pytest.approx(5.6) and any("busiest" in r for r in collapse_reasons(skewed))


@pytest.mark.parametrize("where", ["run folder", "history alone"])
def test_collapsed_router_is_named_per_layer_and_the_balanced_twin_is_silent(runs, diagnoses, where, tmp_path):
    def findings(run):
        if where == "run folder":  # the newest checkpoint against the run's step 0, and the history
            d = diagnoses[run.name]
        else:  # the run's log and config without its checkpoints
            target = tmp_path / run.name
            target.mkdir()
            for name in ("metrics.jsonl", "config.yaml"):
                shutil.copy(run / name, target / name)
            d = diagnose(target, DiagnoseOptions())
        return [f for f in d.findings if f.cause == "moe_collapse"]

    assert findings(runs["healthy"]) == []
    found = findings(runs["collapsed"])
    assert sorted(f.tensors[0] for f in found) == ["moe_imbalance/L1", "moe_imbalance/L3"]
    for f in found:
        end = f.evidence["end"]
        # every token on the same 2 of 4 experts: entropy at its top-2 floor, two experts idle
        assert end["entropy_above_top_k"] == pytest.approx(0.0, abs=1e-6)
        assert end["entropy_above_top_k"] < ENTROPY_ABOVE_TOP_K_COLLAPSE
        assert end["load_max"] == pytest.approx(2.0) and end["min_over_mean"] == 0.0
        assert len(f.evidence["dead_experts"]) == 2 and f.evidence["top_k"] == 2
        assert "routing collapsed" in f.summary and "p50/p90/max" in f.summary


def test_probe_reports_percentiles_and_entropy_per_layer(diagnoses):
    healthy = diagnoses["healthy"].probe["router"]
    collapsed = diagnoses["collapsed"].probe["router"]
    assert sorted(healthy) == sorted(collapsed) == ["1", "3"]
    for r in healthy.values():
        assert {"load_p50", "load_p90", "load_max", "min_over_mean", "entropy_normalised"} <= set(r)
        # the balanced twin on real tokens: far from collapse (the threshold's margin, see doctor/routing.py)
        assert r["entropy_above_top_k"] > 0.8 and r["collapse"] == []
    for r in collapsed.values():
        assert r["entropy_above_top_k"] == pytest.approx(0.0, abs=1e-6) and r["collapse"]
