"""The false-alarm table: each architecture of tests/arch_runs.py in Hugging Face's Trainer with the live monitor.

For each one: alerts on a healthy fp32 run and a bf16-autocast run (fp32 weights), the doctor's status on the final
checkpoint against the initial weights and alone, and with the weights stored in bf16 at the seed's learning rate
(3e-4): the tensors that stayed bitwise unchanged (measured), the step of the monitor's critical
precision_underflow alert and whether it named exactly those tensors. Prints a Markdown table (README, RESULTS.md).

    python bench/bench_false_alarms.py [--steps 60]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import ROOT

sys.path.insert(0, str(ROOT / "tests"))

from arch_runs import ARCHS, run  # noqa: E402

from moe_arch.doctor.pipeline import DiagnoseOptions, diagnose  # noqa: E402


def healthy(arch: str, mode: str, steps: int, root: Path) -> tuple[int, str, str]:
    r = run(arch, mode, root / f"{arch}-{mode}", steps=steps)
    against = diagnose(r.checkpoint, DiagnoseOptions(against=str(r.init), probe=False)).status
    alone = diagnose(r.checkpoint, DiagnoseOptions(probe=False)).status
    return len(r.alerts), against, alone


def seed_bug(arch: str, root: Path) -> tuple[int, str, str]:
    r = run(arch, "bf16", root / f"{arch}-bf16", steps=20)
    frozen = r.unchanged(0, 20)
    critical = [a for a in r.alerts if a.severity == "critical" and a.cause == "precision_underflow"]
    named = {t for a in critical for t in a.tensors}
    step = str(min(a.step for a in critical)) if critical else "none"
    exact = "yes" if named == frozen else f"no ({len(named)} named)"
    return len(frozen), step, exact


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    print(
        "| architecture | fp32 alerts | autocast alerts | diagnose --against init / alone | bf16-stored: "
        "frozen tensors | detected at step | exactly those |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for arch in ARCHS:
            a32, s32a, s32b = healthy(arch, "fp32", args.steps, root)
            aac, sac, sbc = healthy(arch, "autocast", args.steps, root)
            frozen, step, exact = seed_bug(arch, root)
            statuses = "/".join(sorted({s32a, sac})) + " / " + "/".join(sorted({s32b, sbc}))
            print(f"| {arch} ({ARCHS[arch]}) | {a32} | {aac} | {statuses} | {frozen} | {step} | {exact} |", flush=True)


if __name__ == "__main__":
    main()
