"""Time and peak memory of a diagnosis (what `moe-arch diagnose` runs: the doctor's pipeline, then its reports) on
a multi-GB checkpoint (with AdamW state) against its reference, next to reading the same file once, measured in one
run.

    python bench/bench_doctor.py [--gb 2.2] [--keep DIR]

The checkpoint is synthetic but shaped like a real one: N matrices of 2048 x 4096 plus a bf16 norm block, one
AdamW step applied so every tensor has exp_avg / exp_avg_sq. Peak memory is the diagnosing process's VmHWM (its
resident high-water mark, which counts memory-mapped file pages too; unlike ru_maxrss it does not inherit the
parent's high-water mark across fork+exec).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import ROOT, header

RUNNER = r"""
import resource, sys, time, json
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from moe_arch.doctor.pipeline import DiagnoseOptions, diagnose
from moe_arch.doctor.report import publish
t0 = time.perf_counter()
d = diagnose(sys.argv[2], DiagnoseOptions(against=sys.argv[3]))
publish(d, Path(sys.argv[4]), sys.argv[5], quiet=True)
print(json.dumps({"status": d.status, "seconds": time.perf_counter() - t0,
                  "max_rss_mb": int(next(l.split()[1] for l in open("/proc/self/status")
                                         if l.startswith("VmHWM"))) / 1024}))
"""

READER = r"""
import resource, sys, time, json
t0 = time.perf_counter(); n = 0
with open(sys.argv[1], "rb", buffering=0) as f:
    while True:
        b = f.read(1 << 24)
        if not b: break
        n += len(b)
print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": n,
                  "max_rss_mb": int(next(l.split()[1] for l in open("/proc/self/status")
                                         if l.startswith("VmHWM"))) / 1024}))
"""


def make_checkpoint(folder: Path, gb: float) -> tuple[Path, Path]:
    per = 2048 * 4096 * 4 * 3  # weight + exp_avg + exp_avg_sq
    n = max(1, int(gb * 1e9 / per) + 1)
    torch.manual_seed(0)
    params = {f"layers.{i}.mlp.weight": torch.nn.Parameter(torch.randn(2048, 4096) * 0.02) for i in range(n)}
    params["layers.0.norm.weight"] = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    ref = folder / "init.pt"
    torch.save({"model": {k: v.detach() for k, v in params.items()}, "step": 0}, ref)
    opt = torch.optim.AdamW([(k, v) for k, v in params.items()], lr=3e-4)
    for v in params.values():
        v.grad = torch.randn_like(v)
    opt.step()
    ck = folder / "final.pt"
    torch.save({"model": {k: v.detach() for k, v in params.items()}, "optimizer": opt.state_dict(), "step": 1}, ck)
    del params, opt
    return ck, ref


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.2)
    ap.add_argument("--keep", default=None, help="folder to keep the synthetic checkpoints in")
    args = ap.parse_args()
    header("doctor: diagnose a multi-GB checkpoint, time and peak memory")
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="moe_arch_bench_"))
    folder.mkdir(parents=True, exist_ok=True)
    ck, ref = folder / "final.pt", folder / "init.pt"
    if not ck.exists():
        ck, ref = make_checkpoint(folder, args.gb)
    size = ck.stat().st_size + ref.stat().st_size

    def read_once():
        return json.loads(
            subprocess.run([sys.executable, "-c", READER, str(ck)], capture_output=True, text=True, check=True).stdout
        )

    cold = read_once()  # cold or warm depending on the page cache; the next read is warm
    read_once()
    read = read_once()
    out = subprocess.run(
        [sys.executable, "-c", RUNNER, str(ROOT), str(ck), str(ref), str(folder / "report"), str(folder / "d.json")],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        print(out.stderr)
        raise SystemExit(1)
    diag = json.loads(out.stdout.strip().splitlines()[-1])
    status = json.loads((folder / "d.json").read_text())
    print(f"checkpoint               {ck.stat().st_size / 1e9:8.2f} GB (+ reference {ref.stat().st_size / 1e9:.2f} GB)")
    print(f"first read (page cache?) {cold['seconds']:8.2f} s")
    print(f"read the checkpoint once {read['seconds']:8.2f} s    peak RSS {read['max_rss_mb']:8.0f} MB  (warm cache)")
    print(f"diagnose (vs reference)  {diag['seconds']:8.2f} s    peak RSS {diag['max_rss_mb']:8.0f} MB")
    print(
        f"time ratio               {diag['seconds'] / read['seconds']:8.2f} x reading the checkpoint once (both warm)"
    )
    print(f"peak memory              {diag['max_rss_mb'] * 1e6 / size:8.1%} of checkpoint + reference size")
    print(f"status {status['status']}; findings: {[f['cause'] for f in status['findings']]}")
    if not args.keep:
        for p in folder.rglob("*"):
            if p.is_file():
                p.unlink()


if __name__ == "__main__":
    main()
