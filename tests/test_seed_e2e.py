"""The seed, end to end: `moe-arch reproduce-seed` as the README documents it, with both precision policies."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


def reproduce(tmp_path: Path, precision: str, data_cache: str):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_arch",
            "reproduce-seed",
            "--precision",
            precision,
            "--steps",
            "30",
            "--out",
            str(tmp_path),
            "--data.cache_dir",
            data_cache,
            "--train.progress",
            "plain",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / f"seed-{precision}"
    diag = json.loads((run / "diagnosis" / "diagnosis.json").read_text())
    alerts_file = run / "alerts.jsonl"
    alerts = [json.loads(l) for l in alerts_file.read_text().splitlines()] if alerts_file.exists() else []
    return out.stdout, diag, alerts


@pytest.mark.slow  # 90 s; the same bug at unit scale: test_doctor.py::test_tiny_preset_bf16_pure_is_...
def test_reproduce_seed_bf16_pure_then_bf16_mixed(tmp_path, data_cache):
    stdout, diag, alerts = reproduce(tmp_path, "bf16-pure", data_cache)
    n_norms = 9  # tiny preset: 4 layers x (seq_norm, ffn_norm) + final_norm
    # The monitor caught it in the first window, naming every norm.
    first = alerts[0]
    assert first["step"] == 20 and first["cause"] == "precision_underflow" and first["severity"] == "critical"
    assert sum(t.endswith("norm.weight") for t in first["tensors"]) == n_norms
    assert "monitor critical: step 20:" in stdout
    # The doctor names the same root cause on the checkpoint.
    assert diag["status"] == "critical"
    crit = [f for f in diag["findings"] if f["severity"] == "critical"]
    assert [f["cause"] for f in crit] == ["precision_underflow"]
    assert sum(t.endswith("norm.weight") for t in crit[0]["tensors"]) == n_norms
    assert crit[0]["evidence"]["unchanged_since_reference"] is True
    assert crit[0]["evidence"]["half_ulp_at_1.0"] == 2**-8
    assert f"RMSNorm weights: 0 of {n_norms} moved since step 0" in stdout

    stdout, diag, alerts = reproduce(tmp_path, "bf16-mixed", data_cache)
    assert alerts == []
    assert diag["status"] == "healthy" and diag["findings"] == []
    assert f"RMSNorm weights: {n_norms} of {n_norms} moved since step 0" in stdout
