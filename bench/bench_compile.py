"""torch.compile (``train.compile``) against eager on the tiny preset: training step time measured in one run,
the compile time, and the loss / gradient differences on the same batch.

    python bench/bench_compile.py [--steps 8]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import header, timeit_pair

from moe_arch.config import load_config
from moe_arch.model import cpu_kernels
from moe_arch.model.mamba import use_compiled_scan
from moe_arch.model.transformer import build_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    header("torch.compile of the blocks vs eager (tiny preset, forward+backward)")
    cfg = load_config("tiny")
    eager = build_model(cfg.model, seed=0)
    compiled = build_model(cfg.model, seed=0)
    tok = torch.randint(
        0,
        cfg.model.vocab_size,
        (cfg.train.batch_size, cfg.train.seq_len + cfg.model.n_predict),
        generator=torch.Generator().manual_seed(0),
    )
    T = cfg.train.seq_len

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(tok[:, :T], tok[:, 1:]).loss.backward()

        return run

    use_compiled_scan(False)
    step(eager)()
    ref_loss = float(eager(tok[:, :T], tok[:, 1:]).loss.detach())
    ref_grads = {n: p.grad.clone() for n, p in eager.named_parameters()}
    t0 = time.perf_counter()
    compiled.compile_blocks()
    step(compiled)()
    compile_s = time.perf_counter() - t0
    loss = float(compiled(tok[:, :T], tok[:, 1:]).loss.detach())
    worst = max(
        float((p.grad - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp_min(1e-12))
        for n, p in compiled.named_parameters()
    )

    # Alternate eager and compiled steps (the compiled scan kernels are process-wide, so switch them per call).
    def eager_step():
        use_compiled_scan(False)
        step(eager)()

    def compiled_step():
        use_compiled_scan(True)
        step(compiled)()

    use_compiled_scan(True)
    compiled_step()  # the re-installed kernels compile again (cached by shape)
    t_e, t_c = timeit_pair(eager_step, compiled_step, rounds=args.rounds)

    # The same pair with the CPU kernels switched off (the path without a C compiler): plain PyTorch eager against
    # compiled. With the kernels on, the compiled regions still run inductor's code (the kernels step aside while
    # compiling), so compile can only help where the kernels do not reach.
    real_available = cpu_kernels.available
    cpu_kernels.available = lambda: False
    try:
        eager_step(), compiled_step()  # recompiles the scan for the chunked path
        t_e0, t_c0 = timeit_pair(eager_step, compiled_step, rounds=args.rounds)
    finally:
        cpu_kernels.available = real_available
    print(f"compile time (first step)     {compile_s:8.1f} s")
    print(f"eager step                    {t_e * 1e3:8.1f} ms   (CPU kernels on)")
    print(f"compiled step                 {t_c * 1e3:8.1f} ms   (CPU kernels on outside compiled regions)")
    print(f"speed-up                      {t_e / t_c:8.2f}x")
    print(f"eager step, kernels off       {t_e0 * 1e3:8.1f} ms")
    print(f"compiled step, kernels off    {t_c0 * 1e3:8.1f} ms")
    print(f"speed-up, kernels off         {t_e0 / t_c0:8.2f}x")
    print(f"loss difference               {abs(loss - ref_loss):8.1e} (eager {ref_loss:.6f})")
    print(f"worst relative grad difference {worst:7.1e}")


if __name__ == "__main__":
    main()
