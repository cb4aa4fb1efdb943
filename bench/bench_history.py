"""Reading a long run's history: a 1M-row metrics.jsonl (this project's format) and a 1M-row CSV, read into the
doctor's series and judged by the curve rules, next to just parsing the same lines with json / csv, in one run.

    python bench/bench_history.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import tempfile
import time
from pathlib import Path

from common import header

from moe_arch.doctor.curves import curve_findings
from moe_arch.doctor.history import read_history


def write(folder: Path, rows: int) -> tuple[Path, Path]:
    jl, cs = folder / "metrics.jsonl", folder / "metrics.csv"
    with open(jl, "w") as f, open(cs, "w", newline="") as g:
        w = csv.writer(g)
        w.writerow(["step", "epoch", "train_loss", "lr-AdamW", "grad_norm"])
        for s in range(1, rows + 1):
            loss = 2.0 + 4.0 * math.exp(-s / (rows / 5)) + 0.01 * math.sin(s)
            lr = 3e-4 * min(1.0, s / 1000)
            f.write(
                json.dumps(
                    {
                        "kind": "train",
                        "step": s,
                        "time": 1.7e9 + s,
                        "loss": loss,
                        "lm_loss": loss,
                        "lr_adamw_0": lr,
                        "lr_muon": 10 * lr,
                        "grad_norm": 1.0,
                        "tokens_per_s": 1e4,
                        "clip_rate": 0.1,
                    }
                )
                + "\n"
            )
            w.writerow([s, 0, loss, lr, 1.0])
    return jl, cs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    args = ap.parse_args()
    header(f"history: read and judge a {args.rows:,}-row history")
    with tempfile.TemporaryDirectory() as tmp:
        jl, cs = write(Path(tmp), args.rows)
        t = time.perf_counter()
        n = sum(1 for line in open(jl) if json.loads(line))
        parse_json = time.perf_counter() - t
        t = time.perf_counter()
        h = read_history(jl)
        read_json = time.perf_counter() - t
        t = time.perf_counter()
        found = curve_findings(h, vocab_size=4096)
        judge = time.perf_counter() - t
        t = time.perf_counter()
        m = sum(1 for _ in csv.DictReader(open(cs)))
        parse_csv = time.perf_counter() - t
        t = time.perf_counter()
        hc = read_history(cs)
        read_csv = time.perf_counter() - t
    print(
        f"metrics.jsonl {n:,} rows: json.loads alone {parse_json:6.2f} s | read_history {read_json:6.2f} s "
        f"({read_json / parse_json:.2f}x) | curve rules {judge:6.2f} s ({len(h.found())} series, "
        f"{[f.cause for f in found]})"
    )
    print(
        f"metrics.csv   {m:,} rows: csv.DictReader alone {parse_csv:6.2f} s | read_history {read_csv:6.2f} s "
        f"({read_csv / parse_csv:.2f}x) | {len(hc.found())} series"
    )


if __name__ == "__main__":
    main()
