"""Everything that needs a GPU, in one command: prints one table and writes it as JSON.

    PYTHONPATH=. python3 bench/gpu_check.py [--json PATH] [--budget SECONDS]    # on the GPU machine (~7 minutes)
    python bench/gpu_check.py --smoke                                         # the same code on the CPU, toy sizes

Sections, in order (each row: what, value, reference, ok, note):
  tests       pytest -m cuda tests/test_cuda.py (the GPU-only paths against their references) runs first
  correct     the tiny preset's loss and gradient norms on the device (float32, Triton paths) and on the CPU (float32,
              C kernels) against the CPU in float64, within model_bound (below); routing decisions equal
  kernels     each Triton kernel against its PyTorch definition in float64 (error / tests/numerics.py bound) and its
              speed against that definition on the device; SDPA backends; grouped_mm against a loop of matmuls
  train       tokens/s and MFU (against the bf16 matmul peak measured in this run) of a ~1B-active config derived
              from seed-3b (16 of its 24 layers: 1.02B active) and of seed-3b, eager (train.compile: last section)
  parts       per-part time of a 1B step (attention, Mamba, MoE, dense FFN, norms, MoD routing, heads, optimizer)
  mamba       one Mamba layer (Triton scan, and the chunked PyTorch scan) against one attention layer, 2k and 8k tokens
  memory      the memory planner (training/memory.py) against torch.cuda.max_memory_allocated over a step
  bf16        bf16-mixed against fp32 over 50 training steps of the tiny preset on the embedded corpus
  generate    tokens/s of plain and self-speculative decoding against Hugging Face generate (Mixtral, same shape)
  compile     the train rows again with train.compile (last: compiling seed-3b takes minutes)

Runs with the machine's own python3 (torch 2.11, Triton 3.6 there): nothing to install, the repository on
PYTHONPATH. Each section is isolated (an error becomes a failed row), the JSON is rewritten after every section,
and a section that would not fit in --budget is skipped with a row saying so. --smoke runs every section at toy
sizes on the CPU (the Triton kernels under Triton's interpreter) in well under a minute, so the script cannot rot
(tests/test_gpu_check.py runs it in the default suite).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import gzip
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the package, and tests/numerics.py (the error bounds)


# ============================================================================================ the rounding bound
def model_bound(cfg, seq_len: int) -> float:
    """Relative bound on the float32 rounding error of this model's loss (gradients: twice it): gamma_n of the summed
    lengths of the reductions that one token's loss goes through, layer after layer, plus a few ulps per element-wise
    function (Higham's bound for a chain of dependent sums, first order, taking every step as well conditioned).
    Two float32 computations in different orders (the device, the CPU kernels) are each within it of the float64
    value. A wrong kernel (an index, a sign, a missing term) is off by 1e-3 to 1, far outside it."""
    from numerics import EXP_ULPS, gamma

    d, n = cfg.d_model, 0
    for i in range(cfg.n_layers):
        n += 2 * (d + 4)  # two RMSNorms: a sum of squares, rsqrt, two products
        if i in cfg.mamba_layers:
            di = cfg.mamba_expand * d
            n += d + cfg.mamba_d_conv + 1 + di + cfg.resolved_dt_rank + seq_len * (EXP_ULPS + 4) + cfg.mamba_d_state
            n += di + EXP_ULPS + 4  # out_proj, the gate
        else:
            hd = cfg.resolved_head_dim
            n += d + hd + seq_len + EXP_ULPS + cfg.n_heads * hd + 3  # qkv, scores, softmax . V, o_proj, RoPE
        width = cfg.d_ff_expert if i in cfg.moe_layers else cfg.d_ff
        n += d + width + EXP_ULPS + 4 + cfg.top_k  # gate/up, down, silu, the weighted sum of experts
        if cfg.mod_enabled and i in cfg.mod_layers:
            n += d + EXP_ULPS + 2
    n += d + 4 + d + cfg.vocab_size + EXP_ULPS + 4  # final norm, (MTP projection), logits, softmax
    return gamma(n)


# ============================================================================================ the table
class Report:
    def __init__(self, path: Path | None, smoke: bool, budget: float):
        self.rows: list[dict] = []
        self.meta: dict = {}
        self.path, self.smoke, self.budget, self.t0 = path, smoke, budget, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def fits(self, seconds: float) -> bool:
        return self.smoke or self.elapsed() + seconds <= self.budget

    def row(self, section: str, what: str, value, reference="", ok: bool | None = None, note: str = "") -> None:
        r = dict(section=section, what=what, value=value, reference=reference, ok=ok, note=note)
        self.rows.append(r)
        print(f"  {section:<9} {what:<44} {_fmt(value):>16} {_fmt(reference):>16} {_ok(ok):>4}  {note}", flush=True)

    def save(self) -> None:
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(
                json.dumps({"meta": self.meta, "rows": self.rows, "elapsed_s": self.elapsed()}, indent=1, default=str)
            )

    def table(self) -> str:
        lines = [f"{'section':<9} {'what':<44} {'value':>16} {'reference':>16} {'ok':>4}  note", "-" * 120]
        lines += [
            f"{r['section']:<9} {r['what']:<44} {_fmt(r['value']):>16} {_fmt(r['reference']):>16} "
            f"{_ok(r['ok']):>4}  {r['note']}"
            for r in self.rows
        ]
        bad = [r for r in self.rows if r["ok"] is False]
        lines.append(
            f"{len(self.rows)} rows, {sum(r['ok'] is True for r in self.rows)} ok, {len(bad)} failed, "
            f"{self.elapsed():.0f} s"
        )
        return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)


def _ok(ok) -> str:
    return {True: "ok", False: "FAIL", None: ""}[ok]


# ============================================================================================ shared helpers
def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


QUICK = False  # --smoke: one timed call, no warm-up (the interpreter is slow, and its times mean nothing)


def _time(fn, dev, warmup: int = 1, repeat: int = 3) -> float:
    """Median seconds per call."""
    if QUICK:
        warmup, repeat = 0, 1
    for _ in range(warmup):
        fn()
    _sync(dev)
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _free(dev) -> None:
    import torch

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _corpus_bytes(n: int):
    """The embedded corpus as byte tokens (real text for the learning comparison, no tokenizer training)."""
    import torch

    path = ROOT / "moe_arch" / "data" / "corpus" / "corpus.jsonl.gz"
    text = "\n\n".join(json.loads(line)["text"] for line in gzip.open(path, "rt"))
    return torch.frombuffer(bytearray(text.encode()[:n]), dtype=torch.uint8).long()


def _overrides(base, **kw):
    from moe_arch.config import ModelConfig

    d = dataclasses.asdict(base)
    d.update(kw)
    n = d["n_layers"]
    for k in ("moe_layers", "mamba_layers", "mod_layers"):
        d[k] = [i for i in d[k] if i < n]
    return ModelConfig(**d)


def configs(smoke: bool) -> dict:
    """The model configs of each section: the presets on a GPU, toy ones for --smoke."""
    from moe_arch.config import load_config

    seed = load_config("seed-3b").model
    tiny = load_config("tiny").model
    if smoke:
        toy = _overrides(
            tiny,
            d_model=32,
            n_heads=2,
            n_kv_heads=1,
            d_ff=64,
            d_ff_expert=32,
            vocab_size=300,
            mamba_d_state=4,
            n_layers=4,
        )
        return {"tiny": toy, "1b": toy, "seed-3b": _overrides(toy, n_layers=2), "seq": 32, "batch": 2}
    return {"tiny": tiny, "1b": _overrides(seed, n_layers=16), "seed-3b": seed, "seq": 2048, "batch": 1}


class Steps:
    """Training steps composed as the trainer composes them (training/memory.measure_step_peak does the same):
    precision policy, Muon + AdamW, clipping, zero_grad(set_to_none); no per-step host syncs of metrics."""

    def __init__(self, cfg, dev, precision: str, compile_blocks: bool = False, seed: int = 0, state=None):
        import torch

        from moe_arch.config import OptimConfig
        from moe_arch.model.transformer import build_model
        from moe_arch.precision import resolve_policy
        from moe_arch.training.optim import build_optimizers

        self.dev, self.cfg = dev, cfg
        self.policy = resolve_policy(precision, dev)
        self.model = build_model(cfg, seed=seed, device=dev)  # built where it trains (seed-3b: 3B parameters)
        if state is not None:
            self.model.load_state_dict(state)
        self.model = self.model.to(self.policy.param_dtype).train()
        if compile_blocks:
            self.model.compile_blocks()
        self.opts = build_optimizers(self.model, OptimConfig())
        torch.manual_seed(seed)

    def step(self, tokens, targets):
        from moe_arch.parallel.parallelize import clip_grads_

        with self.policy.autocast(self.dev):
            out = self.model(tokens, targets)
        out.loss.backward()
        clip_grads_([p for p in self.model.parameters() if p.grad is not None], 1.0)
        for o in self.opts.values():
            o.step()
        for o in self.opts.values():
            o.zero_grad(set_to_none=True)
        return out.loss.detach()


def _batch(cfg, B: int, T: int, dev, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, cfg.vocab_size, (B, T + cfg.n_predict), generator=g)
    return tok[:, :T].to(dev), tok[:, 1:].to(dev)


@contextlib.contextmanager
def triton_on_cpu(enabled: bool):
    """--smoke: CPU tensors take the Triton dispatch (under the interpreter) and the CPU kernels step aside."""
    from moe_arch.model import cpu_kernels, fused

    if not enabled:
        yield
        return
    saved = fused.TRITON_ON_CPU, fused._kernel_ok, cpu_kernels.supports
    fused.TRITON_ON_CPU, fused._kernel_ok, cpu_kernels.supports = True, (lambda *t: False), (lambda *t, **k: False)
    try:
        yield
    finally:
        fused.TRITON_ON_CPU, fused._kernel_ok, cpu_kernels.supports = saved


# ============================================================================================ sections
def section_env(rep: Report, dev, cfgs) -> None:
    import torch

    from moe_arch.model import fused
    from moe_arch.training.flops import measure_matmul_peak

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    rep.meta.update(device=name, torch=torch.__version__, triton=tv, python=platform.python_version(), smoke=rep.smoke)
    kind = torch.bfloat16 if dev.type == "cuda" else torch.float32
    peak = measure_matmul_peak(
        dev, kind, n=8192 if dev.type == "cuda" else 256, seconds=1.0 if dev.type == "cuda" else 0.05
    )
    rep.meta["peak_flops"] = peak
    rep.row(
        "env",
        f"device: {name}",
        f"torch {torch.__version__}",
        f"triton {tv}",
        note=f"Triton kernels {'on' if fused.triton() is not None else 'OFF: ' + str(fused._triton['error'])}",
    )
    rep.row(
        "env",
        f"{'bf16' if dev.type == 'cuda' else 'fp32'} matmul peak (TFLOP/s)",
        peak / 1e12,
        note="8192^3 on the GPU, best of 1 s: the MFU denominator" if dev.type == "cuda" else "256^3 (smoke)",
    )


def section_tests(rep: Report, dev, cfgs) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    tail = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    summary = tail[-1] if tail else proc.stderr.strip()[-200:]
    rep.meta["cuda_tests_output"] = proc.stdout[-6000:] + proc.stderr[-2000:]
    rep.row(
        "tests",
        "pytest -m cuda tests/test_cuda.py",
        summary.strip("= "),
        f"{time.perf_counter() - t0:.0f} s",
        ok=proc.returncode == 0,
        note="" if proc.returncode == 0 else "see meta.cuda_tests_output in the JSON",
    )


def section_correct(rep: Report, dev, cfgs) -> None:
    """The tiny preset: one forward/backward on the device (float32) and on the CPU (float32, C kernels), each
    against the CPU in float64 (PyTorch definitions), from the same weights and tokens."""
    import torch

    from moe_arch.model.transformer import build_model

    cfg = cfgs["tiny"]
    T = 128 if not rep.smoke else 16
    tok, tgt = _batch(cfg, 4, T, torch.device("cpu"))
    state = build_model(cfg, seed=0).state_dict()

    def run(device, dtype):
        import torch.nn.functional as F

        from moe_arch.model import transformer

        model, _, _ = transformer.materialize(cfg, {k: v.to(dtype) for k, v in state.items()}, device=device)
        head = transformer.linear_cross_entropy
        if dtype == torch.float64:  # the head's unfused path casts logits to float32: the reference stays float64
            transformer.linear_cross_entropy = lambda h, w, t: F.cross_entropy(
                F.linear(h.reshape(-1, h.shape[-1]), w), t.reshape(-1)
            )
        try:
            out = model.train()(tok.to(device), tgt.to(device))
            out.loss.backward()
        finally:
            transformer.linear_cross_entropy = head
        norms = {n: p.grad.double().norm().item() for n, p in model.named_parameters() if p.grad is not None}
        loads = {i: v.cpu().tolist() for i, v in out.aux.moe_load.items()}
        frac = {i: float(v) for i, v in out.aux.mod_frac.items()}
        return out.loss.item(), norms, loads, frac

    ref = run(torch.device("cpu"), torch.float64)
    rel = model_bound(cfg, T)
    runs = [("CPU float32 (C kernels)", torch.device("cpu"))]
    if dev.type == "cuda":
        runs.append(("CUDA float32 (Triton)", dev))
    for label, device in runs:
        loss, norms, loads, frac = run(device, torch.float32)
        err = abs(loss - ref[0])
        rep.row(
            "correct",
            f"tiny loss, {label}",
            loss,
            ref[0],
            ok=err <= rel * abs(ref[0]),
            note=f"|err| {err:.2e} vs bound {rel * abs(ref[0]):.2e} (model_bound {rel:.1e}, float64 reference)",
        )
        worst = max(abs(norms[n] - v) / max(v, 1e-30) for n, v in ref[1].items())
        total = math.sqrt(sum(v * v for v in norms.values()))
        total_ref = math.sqrt(sum(v * v for v in ref[1].values()))
        rep.row(
            "correct",
            f"tiny grad norms, {label}",
            total,
            total_ref,
            ok=worst <= 2 * rel,
            note=f"worst per-tensor relative error {worst:.2e} vs {2 * rel:.1e} over {len(norms)} tensors",
        )
        same = loads == ref[2] and frac == ref[3]
        rep.row(
            "correct",
            f"tiny routing, {label}",
            "equal" if same else "differs",
            "float64",
            ok=same or None,
            note="MoE loads and MoD selections" + ("" if same else ": a near-tie flipped (not an error by itself)"),
        )


def section_kernels(rep: Report, dev, cfgs) -> None:
    """Each Triton chain against its PyTorch definition: the error of the device's result (Triton) over the float32
    bound of tests/numerics.py at a moderate size, then fwd+bwd time of Triton vs the definition at the training
    size (bf16 where training feeds bf16)."""
    import numerics as nm
    import torch
    import torch.nn.functional as F

    from moe_arch.model import fused
    from moe_arch.model.losses import linear_cross_entropy
    from moe_arch.model.mamba import reference_scan, selective_scan

    big = cfgs["seed-3b"]
    smoke = rep.smoke
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0, pos=False):
        t = torch.rand(*shape, generator=g) if pos else torch.randn(*shape, generator=g)
        return t * scale

    def scan_case(B, L, D, N):
        u, dt = rnd(B, L, D), rnd(B, L, D, pos=True) * 0.5 + 0.01
        A = -(rnd(D, N, pos=True) * 4 + 0.1)
        return [u, dt, A, rnd(B, L, N), rnd(B, L, N), rnd(D), rnd(B, L, D)]

    def scan_fn(u, dt, A, Bm, Cm, Dp, z):
        return selective_scan(u, dt, A, Bm, Cm, D=Dp, z=z)[0]

    def scan_ref(u, dt, A, Bm, Cm, Dp, z):
        return (reference_scan(u, dt, A, Bm, Cm)[0] + u * Dp) * F.silu(z)

    def scan_bounds(u, dt, A, Bm, Cm, Dp, z, gy):
        yb, _, gb = nm.selective_scan_bounds(u, dt, A, Bm, Cm, None, Dp, z, gy)
        return yb, [gb[k] for k in ("u", "dt", "A", "B", "C", "D", "z")]

    def conv_pre(x, w, bias):
        K = w.shape[0]
        return F.conv1d(x.transpose(1, 2), w.t().unsqueeze(1), bias, padding=K - 1, groups=x.shape[2])[
            ..., : x.shape[1]
        ].transpose(1, 2)

    def xent_bounds(h, w, y, _g):
        lb, dhb, dwb = nm.softmax_xent_bounds(h, w, y)
        return lb, [dhb, dwb]

    def rope_bounds(x, c, sn, gy):
        yb, dxb = nm.rope_bounds(x, c, sn, gy)
        return yb, [dxb]

    def ints(n, hi):
        return torch.randint(0, hi, (n,), generator=g)

    # name, inputs (CPU float32), which get gradients, fn, reference, bounds, training-size inputs for the timing
    # (where training feeds bf16, bf16). --smoke: divided sizes, timed on the error inputs (the interpreter).
    s = 8 if smoke else 1
    D3, V3, di3 = big.d_model, big.vocab_size, big.mamba_expand * big.d_model
    cases = [
        (
            "selective scan (+D, gate)",
            scan_case(2, 256 // s, 64 // s, 16 // (2 if smoke else 1)),
            None,
            scan_fn,
            scan_ref,
            scan_bounds,
            lambda: scan_case(1, 2048, di3, big.mamba_d_state),
        ),
        (
            "causal conv + silu",
            [rnd(2, 100 // s, 96 // s), rnd(4, 96 // s), rnd(96 // s)],
            None,
            fused.causal_conv_silu,
            lambda x, w, b: F.silu(conv_pre(x, w, b)),
            lambda x, w, b, gy: nm.causal_conv_silu_bounds(x, w, b, gy, conv_pre),
            lambda: [rnd(1, 2048, di3), rnd(4, di3), rnd(di3)],
        ),
        (
            "RMSNorm",
            [rnd(64 // s, 1792 // s, scale=3), rnd(1792 // s, pos=True) + 0.5],
            None,
            lambda x, w: fused.rms_norm(x, w, 1e-6),
            lambda x, w: F.rms_norm(x, (x.shape[-1],), eps=1e-6) * w,
            nm.rms_norm_bounds,
            lambda: [rnd(2048, D3), rnd(D3, pos=True)],
        ),
        (
            "SwiGLU gate",
            [rnd(64 // s, 2304 // s, scale=4), rnd(64 // s, 2304 // s)],
            None,
            fused.swiglu,
            lambda a, b: F.silu(a) * b,
            nm.swiglu_bounds,
            lambda: [rnd(2048, big.d_ff).bfloat16(), rnd(2048, big.d_ff).bfloat16()],
        ),
        (
            "RoPE",
            [rnd(2, 4, 64 // s, 112 // s), rnd(64 // s, 112 // s), rnd(64 // s, 112 // s)],
            [0],
            fused.rope,
            fused.rope_reference,
            rope_bounds,
            lambda: [
                rnd(1, big.n_heads, 2048, big.resolved_head_dim).bfloat16(),
                rnd(2048, big.resolved_head_dim).bfloat16(),
                rnd(2048, big.resolved_head_dim).bfloat16(),
            ],
        ),
        (
            "head linear + cross-entropy",
            [rnd(64, 64 // s), rnd(1000 // s, 64 // s, scale=0.3), ints(64, 1000 // s)],
            [0, 1],
            linear_cross_entropy,
            lambda h, w, y: F.cross_entropy(h @ w.t(), y),
            xent_bounds,
            lambda: [rnd(2048, D3), rnd(V3, D3, scale=0.02), ints(2048, V3)],
        ),
    ]
    for name, inputs, wants, fn, ref_fn, bounds_fn, timing in cases:
        if not rep.fits(20):
            rep.row("kernels", name, "skipped", note="time budget")
            continue
        wants = wants if wants is not None else list(range(len(inputs)))
        try:
            with triton_on_cpu(smoke):
                ratio = _kernel_error(fn, ref_fn, bounds_fn, inputs, wants, dev)
                t_tri, t_ref = _kernel_speed(
                    fn,
                    inputs if smoke else timing(),
                    wants,
                    dev,
                    autocast=name.startswith("head") and dev.type == "cuda",
                )
            rep.row(
                "kernels",
                f"{name}: error / float32 bound",
                ratio,
                1.0,
                ok=ratio <= 1.0,
                note="output and every gradient, float64 reference (tests/numerics.py)",
            )
            rep.row(
                "kernels",
                f"{name}: fwd+bwd ms, Triton vs PyTorch",
                t_tri * 1e3,
                t_ref * 1e3,
                note=f"{t_ref / t_tri:.2f}x"
                + (" (interpreter: not a speed)" if smoke else " at seed-3b's training size"),
            )
        except Exception as e:  # noqa: BLE001
            rep.row("kernels", name, "error", ok=False, note=f"{type(e).__name__}: {str(e)[:150]}")
    _sdpa_backends(rep, dev, cfgs)
    _grouped_mm(rep, dev, cfgs)


def _kernel_error(fn, ref_fn, bounds_fn, inputs, wants, dev) -> float:
    """max over the output and the gradients of |device result - float64 reference| / bound."""
    import torch
    from numerics import TINY

    xs = [t.to(dev).requires_grad_(i in wants) for i, t in enumerate(inputs)]
    x64 = [(t.double() if t.is_floating_point() else t).requires_grad_(i in wants) for i, t in enumerate(inputs)]
    y = fn(*xs)
    ref = ref_fn(*x64)
    gy = (
        torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        if ref.dim()
        else torch.ones((), dtype=torch.float64)
    )
    grads = torch.autograd.grad(y, [xs[i] for i in wants], gy.to(y.dtype).to(dev))
    grads_ref = torch.autograd.grad(ref, [x64[i] for i in wants], gy)
    yb, gbs = bounds_fn(*[t.detach() for t in inputs], gy)
    ratio = 0.0
    for got, want, bound in zip([y] + list(grads), [ref] + list(grads_ref), [yb] + list(gbs)):
        err = (got.detach().double().cpu() - want.detach()).abs()
        ratio = max(ratio, float((err / (bound.double().expand_as(err) + TINY)).max()))
    return ratio


def _kernel_speed(fn, inputs, wants, dev, autocast: bool = False) -> tuple[float, float]:
    import torch

    from moe_arch.model import fused

    xs = [t.to(dev).requires_grad_(i in wants) for i, t in enumerate(inputs)]

    def run():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            y = fn(*xs)
        return torch.autograd.grad(y, [xs[i] for i in wants], torch.ones_like(y))

    t_tri = _time(run, dev)
    with fused.triton_disabled():
        t_ref = _time(run, dev)
    return t_tri, t_ref


def _sdpa_backends(rep: Report, dev, cfgs) -> None:
    """Which SDPA kernel attention runs (profiled kernel names of the default call), and each backend's error and
    time on seed-3b's attention shape (16 q / 4 kv heads of 112, GQA without repeated K/V, causal)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    big = cfgs["seed-3b"]
    T = 2048 if not rep.smoke else 32
    H, Hk, D = big.n_heads, big.n_kv_heads, big.resolved_head_dim
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, h, T, D, generator=g).to(dev, dtype) for h in (H, Hk, Hk))
    ref = F.scaled_dot_product_attention(*(t.double().cpu() for t in (q, k, v)), is_causal=True, enable_gqa=True)
    G = H // Hk  # query heads per kv head: the largest |score| (causal or not: a bound)
    s_max = max(
        float((q[0, j * G : (j + 1) * G].double().cpu() @ k[0, j].double().cpu().t()).abs().max()) for j in range(Hk)
    ) / math.sqrt(D)

    def call():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    chosen = "?"
    try:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        call()
        with profile(activities=acts) as prof:
            call()
            _sync(dev)
        names = {e.key for e in prof.key_averages()}
        for key, label in (
            ("flash", "flash"),
            ("cudnn", "cudnn"),
            ("efficient", "efficient"),
            ("fmha", "efficient"),
            ("math", "math"),
        ):
            if any(key in n.lower() for n in names):
                chosen = label
                break
    except Exception as e:  # noqa: BLE001
        chosen = f"? ({type(e).__name__})"
    rep.row("kernels", "SDPA backend of the default call", chosen, note=f"{dtype} [1, {H}/{Hk}, {T}, {D}] causal GQA")
    for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        b = getattr(SDPBackend, backend, None)
        if b is None:
            continue
        try:
            with sdpa_kernel([b]):
                out = call()
                t = _time(call, dev)
            err = float((out.double().cpu() - ref).abs().max())
            u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-24
            # rounding the scores (a kernel may keep them in the input dtype: the math backend), the probabilities
            # and the output, each a few ulps; the float32 sums over D and T
            bound = (4 * u + 2 * u * s_max + (T + D) * 2.0**-24) * float(v.abs().max())
            rep.row(
                "kernels",
                f"SDPA {backend.lower()}: ms, max error",
                t * 1e3,
                f"err {err:.2e}",
                ok=err <= bound,
                note=f"bound {bound:.1e}",
            )
        except Exception as e:  # noqa: BLE001
            rep.row(
                "kernels",
                f"SDPA {backend.lower()}",
                "unavailable",
                note=f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}",
            )


def _grouped_mm(rep: Report, dev, cfgs) -> None:
    """torch's grouped GEMM (MoE experts) against a loop of matmuls, bf16 and float32, seed-3b's expert shapes."""
    import torch

    big = cfgs["seed-3b"]
    E, d, f = big.n_experts, big.d_model, big.d_ff_expert
    n = 2048 * big.top_k if not rep.smoke else 64
    g = torch.Generator().manual_seed(3)
    counts = torch.multinomial(torch.ones(E), n, replacement=True, generator=g).bincount(minlength=E)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(n, d, generator=g).to(dev, dtype)
        w = (torch.randn(E, d, f, generator=g) * 0.02).to(dev, dtype)
        offs = counts.cumsum(0).to(torch.int32).to(dev)
        ref = torch.cat(
            [x[a:b].double() @ w[e].double() for e, (a, b) in enumerate(zip([0] + offs[:-1].tolist(), offs.tolist()))]
        )
        fn = getattr(torch.nn.functional, "grouped_mm", None)
        try:
            if fn is None:
                raise RuntimeError("torch.nn.functional.grouped_mm does not exist in this torch")
            out = fn(x, w, offs=offs)
            t = _time(lambda: fn(x, w, offs=offs), dev)
            bounds = list(zip([0] + offs[:-1].tolist(), offs.tolist()))
            t_loop = _time(lambda: torch.cat([x[a:b] @ w[e] for e, (a, b) in enumerate(bounds)]), dev)
            u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-24
            err = float((out.double().cpu() - ref.cpu()).abs().max())
            bound = float(((u + d * 2.0**-24) * (x.double().abs() @ w.double().abs().max(0).values)).max())
            rep.row(
                "kernels",
                f"grouped_mm {str(dtype)[6:]}: ms vs loop of matmuls",
                t * 1e3,
                t_loop * 1e3,
                ok=err <= bound,
                note=f"max error {err:.2e} <= {bound:.1e}? {t_loop / t:.2f}x",
            )
        except Exception as e:  # noqa: BLE001
            rep.row(
                "kernels",
                f"grouped_mm {str(dtype)[6:]}",
                "unavailable",
                ok=None if dtype != torch.bfloat16 or dev.type != "cuda" else False,
                note=f"{type(e).__name__}: {str(e).splitlines()[0][:90]} (moe.py then loops over experts)",
            )


def section_train(rep: Report, dev, cfgs) -> None:
    _train(rep, dev, cfgs, compiled=False)


def section_compile(rep: Report, dev, cfgs) -> None:
    """train.compile last: its compilation (minutes for seed-3b) must not crowd out the other sections."""
    _train(rep, dev, cfgs, compiled=True)


def _train(rep: Report, dev, cfgs, compiled: bool) -> None:
    import torch

    from moe_arch.model.params import flops_per_token
    from moe_arch.training.memory import plan_memory

    T, B = cfgs["seq"], cfgs["batch"]
    peak = rep.meta["peak_flops"]
    precision = "bf16-mixed" if dev.type == "cuda" else "fp32"
    rep.meta.setdefault("train", {})
    for name in ("1b", "seed-3b"):
        cfg = cfgs[name]
        if dev.type == "cuda":
            from moe_arch.config import Config

            plan = plan_memory(
                Config.from_dict({"model": dataclasses.asdict(cfg)}),
                gpus=1,
                batch_size=B,
                seq_len=T,
                precision=precision,
                device="cuda",
                checkpointing="none",
            )
            total = torch.cuda.get_device_properties(dev).total_memory / 2**30
            if plan.peak_gb > 0.9 * total:
                rep.row("train", f"{name}", "does not fit", f"{plan.peak_gb:.0f} GB planned", note=f"{total:.0f} GB")
                continue
        label = f"{name} {'compiled' if compiled else 'eager'} tokens/s"
        if compiled and rep.smoke:
            rep.row("train", label, "skipped", note="--smoke: compiling takes minutes on a CPU (make test-slow)")
            continue
        if not rep.fits(150 if compiled else 40):
            rep.row("train", label, "skipped", note="time budget")
            continue
        try:
            res = _throughput(cfg, dev, precision, compiled, B, T, steps=2 if rep.smoke else 8)
        except Exception as e:  # noqa: BLE001
            rep.row("train", label, "error", ok=False, note=f"{type(e).__name__}: {str(e)[:150]}")
            _free(dev)
            continue
        fpt = flops_per_token(cfg, T)["train_flops_per_token"]
        mfu = fpt * res["tok_s"] / peak
        rep.meta["train"][label] = res
        rep.row(
            "train",
            label,
            res["tok_s"],
            f"step {res['step_s'] * 1e3:.0f} ms",
            note=f"batch {B} x {T}, "
            f"{precision}, first step {res['first_s']:.1f} s" + (" (compilation)" if compiled else ""),
        )
        rep.row(
            "train",
            f"{name} {'compiled' if compiled else 'eager'} MFU",
            mfu,
            f"{peak / 1e12:.3g} TFLOP/s",
            note=f"{fpt / 1e9:.2f} GFLOP/token (6 x active matmul params + "
            "attention + scan; MoD at its selected fraction)",
        )
        _free(dev)


def _throughput(cfg, dev, precision, compiled, B, T, steps) -> dict:
    import torch

    run = Steps(cfg, dev, precision, compile_blocks=compiled)
    tok, tgt = _batch(cfg, B, T, dev)
    t0 = time.perf_counter()
    run.step(tok, tgt)
    _sync(dev)
    first = time.perf_counter() - t0
    run.step(tok, tgt)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = run.step(tok, tgt)
        _sync(dev)
        ts.append(time.perf_counter() - t0)
    res = {"step_s": statistics.median(ts), "first_s": first, "loss": float(loss)}
    res["tok_s"] = B * T / res["step_s"]
    if dev.type == "cuda":
        res["max_allocated_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
    del run
    return res


def section_parts(rep: Report, dev, cfgs) -> None:
    """Where a 1B training step's time goes: module forward and backward hooks record events on the stream
    (wall-clock stamps on the CPU), so each part's forward+backward is measured inside a real step."""
    import torch

    from moe_arch.model.attention import Attention
    from moe_arch.model.layers import RMSNorm, SwiGLU
    from moe_arch.model.mamba import Mamba
    from moe_arch.model.moe import MoE
    from moe_arch.model.transformer import Block

    cfg, T, B = cfgs["1b"], cfgs["seq"], cfgs["batch"]
    run = Steps(cfg, dev, "bf16-mixed" if dev.type == "cuda" else "fp32")
    tok, tgt = _batch(cfg, B, T, dev)
    run.step(tok, tgt)
    stamps: list[tuple[int, str, object]] = []  # (module id, "fwd0"|"fwd1"|"bwd0"|"bwd1", event or time)

    def mark(key, what):
        if dev.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
        else:
            e = time.perf_counter()
        stamps.append((key, what, e))

    kinds = {Attention: "attention", Mamba: "mamba", MoE: "moe", SwiGLU: "dense ffn", RMSNorm: "norms"}
    block_ffns = {id(b.ffn) for b in run.model.layers}  # a shared expert's SwiGLU counts as MoE time
    part_of: dict[int, str] = {}
    handles = []
    for mod in run.model.modules():
        part = next((p for k, p in kinds.items() if type(mod) is k), None)
        if isinstance(mod, Block) and mod.mod_router is not None:
            part = "mod block"
        if part is None or (part == "dense ffn" and id(mod) not in block_ffns):
            continue
        part_of[id(mod)] = part
        handles += [
            mod.register_forward_pre_hook(lambda m, a: mark(id(m), "fwd0")),
            mod.register_forward_hook(lambda m, a, o: mark(id(m), "fwd1")),
            mod.register_full_backward_pre_hook(lambda m, g: mark(id(m), "bwd0")),
            mod.register_full_backward_hook(lambda m, gi, go: mark(id(m), "bwd1")),
        ]
    try:
        from moe_arch.parallel.parallelize import clip_grads_

        mark("step", "fwd0")
        with run.policy.autocast(dev):
            out = run.model(tok, tgt)
        mark("step", "fwd1")
        mark("step", "bwd0")
        out.loss.backward()
        mark("step", "bwd1")
        mark("optimizer", "fwd0")
        clip_grads_([p for p in run.model.parameters() if p.grad is not None], 1.0)
        for o in run.opts.values():
            o.step()
        mark("optimizer", "fwd1")
        for o in run.opts.values():
            o.zero_grad(set_to_none=True)
        _sync(dev)
    finally:
        for h in handles:
            h.remove()

    def dt(a, b):
        return a.elapsed_time(b) / 1e3 if dev.type == "cuda" else b - a

    per_module: dict = {}
    open_: dict = {}
    for key, what, e in stamps:  # pair each start with its end, per module and phase
        if what.endswith("0"):
            open_.setdefault((key, what[:3]), []).append(e)
        elif open_.get((key, what[:3])):
            per_module[key] = per_module.get(key, 0.0) + dt(open_[(key, what[:3])].pop(), e)
    step = per_module.pop("step", 0.0)
    optimizer = per_module.pop("optimizer", 0.0)
    parts = {"optimizer": optimizer}
    for mid, t in per_module.items():
        if part_of[mid] != "mod block":
            parts[part_of[mid]] = parts.get(part_of[mid], 0.0) + t
    # a MoD block's own time (router, causal top-k, gather, scatter): its time less its hooked layers'
    mod = 0.0
    for blk in run.model.layers:
        if id(blk) in per_module:
            mod += per_module[id(blk)] - sum(per_module.get(id(m), 0.0) for m in blk.modules() if m is not blk)
    parts["MoD routing (block - its layers)"] = mod
    step += optimizer
    parts["heads, embedding, rest"] = step - sum(parts.values())
    for p, v in sorted(parts.items(), key=lambda kv: -kv[1]):
        rep.row("parts", p, v * 1e3, f"{v / step:.1%}" if step else "", note="ms per step, forward + backward")
    rep.row("parts", "whole step (hooked)", step * 1e3, note=f"1b config, batch {B} x {T}; hooks add a little")
    del run
    _free(dev)


def section_mamba(rep: Report, dev, cfgs) -> None:
    import torch

    from moe_arch.model import fused
    from moe_arch.model.attention import Attention, SeqContext
    from moe_arch.model.layers import Rotary
    from moe_arch.model.mamba import Mamba

    cfg = cfgs["1b"]
    lens = (2048, 8192) if not rep.smoke else (32, 64)
    cfg = _overrides(cfg, max_seq_len=max(lens))
    mamba, attn = Mamba(cfg, 0).to(dev), Attention(cfg, 0).to(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    mamba.init_weights(0.02, 0.02, gen)
    attn.init_weights(0.02, 0.02, gen)
    rot = Rotary(cfg.resolved_head_dim, cfg.rope_theta)
    amp = dev.type == "cuda"
    for L in lens:
        x = torch.randn(1, L, cfg.d_model, device=dev, requires_grad=True)
        ctx = SeqContext(torch.arange(L, device=dev)[None], rot)

        def run(layer):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                y = layer(x, ctx)
            y.float().sum().backward()

        res = {}
        for label, layer, off in (
            ("Mamba (Triton scan)", mamba, False),
            ("Mamba (chunked PyTorch scan)", mamba, True),
            ("attention (SDPA)", attn, False),
        ):
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            with fused.triton_disabled(off), triton_on_cpu(rep.smoke and not off and layer is mamba):
                res[label] = _time(lambda: run(layer), dev)
            mem = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else float("nan")
            rep.row(
                "mamba",
                f"{label} at {L} tokens",
                res[label] * 1e3,
                f"{mem:.0f} MB peak" if amp else "",
                note=f"fwd+bwd ms, d_model {cfg.d_model}, batch 1" + (", bf16 autocast" if amp else ""),
            )
        rep.row(
            "mamba",
            f"Mamba / attention at {L} tokens",
            res["Mamba (Triton scan)"] / res["attention (SDPA)"],
            note=f"Triton scan vs chunked: {res['Mamba (chunked PyTorch scan)'] / res['Mamba (Triton scan)']:.2f}x",
        )
    del mamba, attn
    _free(dev)


def section_memory(rep: Report, dev, cfgs) -> None:
    """Planner vs measured: on the GPU torch.cuda.max_memory_allocated over a step (Triton on, and the PyTorch
    definitions the planner models); with --smoke the CPU's profiler-based measure_step_peak."""
    import torch

    from moe_arch.config import Config
    from moe_arch.model import fused
    from moe_arch.training.memory import GiB, measure_step_peak, plan_memory

    T, B = cfgs["seq"], cfgs["batch"]
    for name in ("1b", "seed-3b"):
        if not rep.fits(40):
            rep.row("memory", name, "skipped", note="time budget")
            continue
        cfg = Config.from_dict({"model": dataclasses.asdict(cfgs[name])})
        prec = "bf16-mixed" if dev.type == "cuda" else "fp32"
        plan = plan_memory(cfg, gpus=1, batch_size=B, seq_len=T, precision=prec, device=dev.type, checkpointing="none")
        if dev.type != "cuda":
            got = measure_step_peak(cfg, prec, "none", B, T, steps=2) / GiB
            rep.row(
                "memory",
                f"{name} planned vs measured GB",
                plan.peak_gb,
                got,
                ok=abs(plan.peak_gb / got - 1) <= 0.15,
                note=f"{plan.peak_gb / got - 1:+.1%} (CPU profiler peak)",
            )
            continue
        for label, off in (("Triton kernels", False), ("PyTorch definitions", True)):
            try:
                with fused.triton_disabled(off):
                    run = Steps(cfgs[name], dev, prec)
                    tok, tgt = _batch(cfgs[name], B, T, dev)
                    run.step(tok, tgt)
                    _sync(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                    run.step(tok, tgt)
                    _sync(dev)
                    got = torch.cuda.max_memory_allocated(dev) / GiB
                del run
            except Exception as e:  # noqa: BLE001
                rep.row("memory", f"{name} ({label})", "error", ok=False, note=f"{type(e).__name__}: {str(e)[:120]}")
                continue
            finally:
                _free(dev)
            err = plan.peak_gb / got - 1
            rep.row(
                "memory",
                f"{name} planned vs max_allocated GB ({label})",
                plan.peak_gb,
                got,
                ok=abs(err) <= 0.15 if off else None,
                note=f"{err:+.1%}; planner phase: {plan.phase}"
                + ("" if off else " (the planner models the PyTorch definitions)"),
            )


def section_bf16(rep: Report, dev, cfgs) -> None:
    cfg = cfgs["tiny"]
    steps = 50 if not rep.smoke else 4
    B, T = (8, 128) if not rep.smoke else (2, 16)
    data = _corpus_bytes(B * (T + cfg.n_predict) * steps + 1) % cfg.vocab_size
    windows = data[: B * (T + cfg.n_predict) * steps].view(steps, B, T + cfg.n_predict)
    curves = {}
    from moe_arch.model.transformer import build_model

    state = build_model(cfg, seed=0).state_dict()
    for prec in ("fp32", "bf16-mixed"):
        run = Steps(cfg, dev, prec, state=state)
        curves[prec] = [float(run.step(w[:, :T].to(dev), w[:, 1:].to(dev))) for w in windows]
        del run
    fp, bf = curves["fp32"], curves["bf16-mixed"]
    diff = max(abs(a - b) / a for a, b in zip(fp, bf))
    learned = fp[-1] < fp[0] and bf[-1] < bf[0]
    rep.meta["bf16_vs_fp32"] = curves
    rep.row(
        "bf16",
        f"final loss after {steps} steps, bf16-mixed vs fp32",
        bf[-1],
        fp[-1],
        ok=learned and abs(bf[-1] - fp[-1]) <= 0.02 * fp[-1],
        note=f"first {fp[0]:.3f}; both learn: {learned}; worst step {diff:.1e} apart (a heuristic 2% on the "
        f"final loss: bf16 rounds at 2^-8 = 0.4%)",
    )


def section_generate(rep: Report, dev, cfgs) -> None:
    import torch

    from moe_arch.model.generation import generate
    from moe_arch.model.transformer import build_model

    cfg = cfgs["1b"]
    new = 64 if not rep.smoke else 8
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = build_model(cfg, seed=0, device=dev).to(dtype).eval()
    k = len(model.mtp_heads)
    hf = None
    try:
        sys.path.insert(0, str(ROOT / "bench"))
        from bench_generate import hf_mixtral

        class _Cfg:
            model = cfg

        with torch.device(dev):  # random weights, initialised where they run (~3B parameters at the 1b shape)
            hf = hf_mixtral(_Cfg).to(dtype)
    except Exception as e:  # noqa: BLE001
        rep.row("generate", "HF Mixtral generate", "unavailable", note=f"{type(e).__name__}: {str(e)[:120]}")
    for n in (1, 8):
        p = torch.randint(0, cfg.vocab_size, (n, 32), generator=torch.Generator().manual_seed(n)).to(dev)
        runs = {
            "moe_arch plain": lambda: generate(model, p, new, temperature=0),
            f"moe_arch speculative ({k} drafts)": lambda: generate(model, p, new, temperature=0, draft_tokens=k),
        }
        if hf is not None:
            runs["HF Mixtral generate"] = lambda: hf.generate(
                p, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0
            )
        with torch.no_grad():
            times = {name: _time(fn, dev, warmup=1, repeat=2 if not rep.smoke else 1) for name, fn in runs.items()}
            plain, spec = runs["moe_arch plain"](), runs[f"moe_arch speculative ({k} drafts)"]()
        same = torch.equal(plain.tokens, spec.tokens)
        ref = times.get("HF Mixtral generate")
        for name, t in times.items():
            note = f"{ref / t:.2f}x HF" if ref else ""
            if "speculative" in name:
                note += (
                    f"; acceptance {spec.acceptance_rate:.0%}, {spec.tokens_per_forward:.2f} tok/forward; tokens "
                    f"{'equal' if same else 'differ from'} plain greedy ({dtype})"
                )
            rep.row("generate", f"{name}, {n} prompt{'s' if n > 1 else ''}", n * new / t, "tokens/s", note=note)
    _free(dev)  # (the weights go when this returns)


SECTIONS = [
    ("env", section_env, 5),
    ("tests", section_tests, 60),
    ("correct", section_correct, 20),
    ("kernels", section_kernels, 60),
    ("train", section_train, 60),
    ("parts", section_parts, 20),
    ("mamba", section_mamba, 20),
    ("memory", section_memory, 40),
    ("bf16", section_bf16, 30),
    ("generate", section_generate, 40),
    ("compile", section_compile, 150),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (Triton under its interpreter)")
    ap.add_argument("--json", default="gpu_check.json", help="where to write the rows (default gpu_check.json)")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds; later sections that would not fit skip")
    ap.add_argument("--only", default="", help="comma-separated sections to run (default: all)")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the Triton kernels are defined (their first import)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (run with --smoke for the CPU version)", file=sys.stderr)
        return 2
    dev = torch.device("cuda" if not args.smoke else "cpu")
    if args.smoke:
        global QUICK
        QUICK = True
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    rep = Report(Path(args.json) if args.json else None, args.smoke, args.budget)
    cfgs = configs(args.smoke)
    only = {s for s in args.only.split(",") if s}
    print(
        f"gpu_check {'--smoke ' if args.smoke else ''}on {dev}: "
        f"{'section':<9} {'what':<44} {'value':>16} {'reference':>16} {'ok':>4}  note",
        flush=True,
    )
    for name, fn, need in SECTIONS:
        if only and name not in only and name != "env":
            continue
        if not rep.fits(need):
            rep.row(name, "section", "skipped", note=f"time budget ({rep.elapsed():.0f} of {rep.budget:.0f} s used)")
            continue
        t0 = time.perf_counter()
        try:
            fn(rep, dev, cfgs)
        except Exception as e:  # noqa: BLE001 - one section's failure must not hide the others
            rep.row(name, "section", "error", ok=False, note=f"{type(e).__name__}: {str(e)[:160]}")
            rep.meta.setdefault("tracebacks", {})[name] = traceback.format_exc()[-3000:]
        rep.meta.setdefault("section_s", {})[name] = time.perf_counter() - t0
        rep.save()
    print("\n" + rep.table())
    rep.save()
    return 1 if any(r["ok"] is False for r in rep.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
