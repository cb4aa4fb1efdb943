"""Preparing data: tokens/s of `prepare_data` (read JSONL -> tokenize -> sharded token files) next to
`tokenizers`' own `encode_batch` on the same documents held in memory, in one run; and peak RSS growth of the
preparation for two corpus sizes (it should not grow with the corpus).

    python bench/bench_data.py [--mb 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, header

from moe_arch.data.corpus import Corpus
from moe_arch.data.tokenizer import train_bpe

CHILD = """
import json, sys, time
import psutil
from moe_arch.config import DataConfig
from moe_arch.data.dataset import prepare_data
base = psutil.Process().memory_info().rss
t = time.perf_counter()
d = prepare_data(DataConfig(source=sys.argv[1], tokenizer=sys.argv[2], cache_dir=sys.argv[3]), 0, log=lambda *a: None)
dt = time.perf_counter() - t
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": dt, "tokens": d.meta["train_tokens"] + d.meta["val_tokens"],
                  "grew_mb": (peak - base) / 2**20}))
"""


def corpus(path: Path, mb: int) -> None:
    """Real text (the embedded corpus's documents) repeated with a counter, so no two documents are equal."""
    docs = list(Corpus("embedded").documents())
    size, k = 0, 0
    with open(path, "w") as f:
        while size < mb << 20:
            line = json.dumps({"text": f"[{k}] " + docs[k % len(docs)]}) + "\n"
            f.write(line)
            size += len(line)
            k += 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=64)
    args = ap.parse_args()
    header("data preparation vs tokenizers.encode_batch")
    work = Path(tempfile.mkdtemp())
    try:
        tok = train_bpe(list(Corpus("embedded").documents())[:1000], 4096)
        tok.save(work / "tok")
        rows = []
        for mb in (args.mb // 4, args.mb):
            src = work / f"c{mb}.jsonl"
            corpus(src, mb)
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            r = json.loads(
                subprocess.run(
                    [sys.executable, "-c", CHILD, str(src), str(work / "tok"), str(work / f"cache{mb}")],
                    capture_output=True,
                    text=True,
                    env=env,
                    check=True,
                ).stdout.splitlines()[-1]
            )
            texts = [json.loads(line)["text"] for line in open(src)]
            t = time.perf_counter()
            n = 0
            for i in range(0, len(texts), 1024):
                n += sum(len(e.ids) for e in tok.tok.encode_batch(texts[i : i + 1024], add_special_tokens=False))
            bare = time.perf_counter() - t
            rows.append((mb, r, n / bare))
        print(
            f"{'corpus':>8} {'tokens':>12} {'prepare tok/s':>14} {'encode_batch tok/s':>19} {'ratio':>6} "
            f"{'RSS growth':>11}"
        )
        for mb, r, bare_rate in rows:
            rate = r["tokens"] / r["seconds"]
            print(
                f"{mb:>6}MB {r['tokens']:>12,} {rate:>14,.0f} {bare_rate:>19,.0f} {rate / bare_rate:>6.2f} "
                f"{r['grew_mb']:>9.0f}MB"
            )
        print(
            "prepare: read + tokenize + EOS + split + write shards, end to end; encode_batch: the same documents, "
            "already in memory, tokenized only. RSS growth: peak over the RSS after start-up."
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
