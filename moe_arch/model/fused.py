"""Fused element-wise chains (RMSNorm, the SwiGLU gate, Mamba's causal conv + silu, RoPE) for eager float32 CPU
training, forward and backward in one pass each (``kernels/fused_cpu.c``), and on CUDA tensors the Triton kernels of
``triton_kernels.py`` (dispatch: ``triton_use`` below).

Each function here has one definition of its math in PyTorch ops (the ``_reference`` functions), which is what
runs on GPUs, for other dtypes, inside ``torch.compile`` (where inductor fuses the same chain itself) and when the
CPU kernels cannot be built; the kernel path is tested against it, values and gradients. Why bother: at the tiny
preset's sizes each PyTorch op is a memory pass plus a dispatch, and these four chains were ~30 ops per block
forward and backward (bench/RESULTS.md has the step time with and without them).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings

import torch
import torch.nn.functional as F

from moe_arch.model import cpu_kernels

# ---- dispatch to the Triton kernels (CUDA) ----
#
# The CPU paths never reach Triton: triton_use() returns False at its first test for a CPU tensor, and
# triton_kernels (which imports Triton) is loaded only when a CUDA tensor asks for it. Without Triton one
# RuntimeWarning says so and every chain runs its PyTorch definition (the chunked scan for Mamba): the same
# functions, slower. MOE_ARCH_NO_TRITON=1 chooses those on purpose, triton_disabled() inside a block (gpu_check
# measures each kernel against its reference that way). Tests run the kernels on CPU tensors under Triton's
# interpreter (TRITON_INTERPRET=1, read by triton.jit when a kernel is defined, i.e. when triton_kernels is first
# imported) with TRITON_ON_CPU set.

TRITON_TYPES = (torch.float32, torch.bfloat16, torch.float16)
TRITON_ON_CPU = False
_triton_lock = threading.Lock()
_triton = {"module": None, "error": None}
_triton_off = threading.local()


def triton():
    """The ``triton_kernels`` module, or None (one warning, the first time) when Triton cannot be imported."""
    if _triton["module"] is not None or _triton["error"] is not None:
        return _triton["module"]
    with _triton_lock:
        if _triton["module"] is None and _triton["error"] is None:
            if os.environ.get("MOE_ARCH_NO_TRITON", "") not in ("", "0"):
                _triton["error"] = "disabled by MOE_ARCH_NO_TRITON"
                return None
            try:
                from moe_arch.model import triton_kernels  # lazy: imports triton (optional, GPU), guarded

                _triton["module"] = triton_kernels
            except Exception as e:  # noqa: BLE001 - any import failure means the documented PyTorch path
                _triton["error"] = f"{type(e).__name__}: {e}"
                warnings.warn(
                    f"moe_arch: the Triton kernels are unavailable ({_triton['error']}); on the GPU the "
                    "Mamba layers run the chunked PyTorch scan and RMSNorm, SwiGLU, the causal conv, RoPE "
                    "and the heads' cross-entropy their PyTorch definitions (same results, slower). "
                    "Install triton to enable them.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _triton["module"]


def triton_use(*tensors: torch.Tensor, dtypes=TRITON_TYPES) -> bool:
    """Whether a chain on these tensors runs its Triton kernel: all on one CUDA device (CPU only under the test
    interpreter), of the given dtypes, outside torch.compile (inductor fuses the PyTorch definitions itself)."""
    t0 = tensors[0]
    if not (t0.is_cuda or TRITON_ON_CPU):
        return False
    if torch.compiler.is_compiling() or getattr(_triton_off, "v", False):  # (Dynamo never sees the thread-local)
        return False
    if any(t.device != t0.device or t.dtype not in dtypes for t in tensors):
        return False
    return triton() is not None


@contextlib.contextmanager
def triton_disabled(flag: bool = True):
    """Inside the block (this thread), the chains run their PyTorch definitions instead of the Triton kernels."""
    old = getattr(_triton_off, "v", False)
    _triton_off.v = flag
    try:
        yield
    finally:
        _triton_off.v = old


# ---- the CPU kernels ----


def _kernel_ok(*tensors: torch.Tensor) -> bool:
    return (
        not torch.compiler.is_compiling()
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and cpu_kernels.available()
    )


def _no_grad(*tensors: torch.Tensor) -> bool:
    """Nothing to differentiate: call the forward kernel directly (an autograd.Function's bookkeeping costs more
    than the kernel on one decoding token)."""
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


# ---- RMSNorm ----


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps) * weight.float()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y, rstd = cpu_kernels.rmsnorm_forward(x2, weight.contiguous(), eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = cpu_kernels.rmsnorm_backward(x2, weight.contiguous(), rstd, dy.reshape(x2.shape).contiguous())
        return dx.view(dy.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dim, in float32 (the caller casts back)."""
    if _kernel_ok(x, weight) and x.shape[-1] == weight.shape[0]:
        if _no_grad(x, weight):
            return cpu_kernels.rmsnorm_forward(x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(), eps)[
                0
            ].view(x.shape)
        return _RMSNorm.apply(x, weight, eps)
    if triton_use(x, weight) and triton().rms_norm_supported(x, weight):
        return triton().rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


# ---- SwiGLU gate ----


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        a, b = a.contiguous(), b.contiguous()
        ctx.save_for_backward(a, b)
        return cpu_kernels.swiglu_forward(a, b)

    @staticmethod
    def backward(ctx, dy):
        a, b = ctx.saved_tensors
        return cpu_kernels.swiglu_backward(a, b, dy.contiguous())


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b."""
    if a.shape == b.shape and _kernel_ok(a, b):
        if _no_grad(a, b):
            return cpu_kernels.swiglu_forward(a.contiguous(), b.contiguous())
        return _SwiGLU.apply(a, b)
    if a.shape == b.shape and a.dtype == b.dtype and triton_use(a, b):
        return triton().swiglu(a, b)
    return F.silu(a) * b


# ---- Mamba's causal depthwise conv + silu, [B, T, D] layout ----


def shifted_conv_silu(xp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """silu(bias + sum_j weight[j] * xp[:, t + j]) for t < T = len(xp) - K + 1: xp is the input with its K-1
    predecessors in front (zeros at a sequence start, the cached inputs when generating). The same arithmetic as
    conv1d(groups=D) as K shifted multiply-adds, without the two layout transposes."""
    K = weight.shape[0]
    T = xp.shape[1] - K + 1
    y = torch.addcmul(bias, xp[:, :T], weight[0])
    for j in range(1, K):
        y = torch.addcmul(y, xp[:, j : j + T], weight[j])
    return F.silu(y)


def causal_conv_silu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """silu(bias + sum_j weight[j] * x[:, t - K + 1 + j]) with zeros before the sequence start; weight [K, D]."""
    return shifted_conv_silu(F.pad(x, (0, 0, weight.shape[0] - 1, 0)), weight, bias)


class _CausalConvSilu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        if x.stride(2) != 1 or x.stride(0) != x.shape[1] * x.stride(1):
            x = x.contiguous()
        weight, bias = weight.contiguous(), bias.contiguous()
        ctx.save_for_backward(x, weight, bias)
        return cpu_kernels.conv_silu_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        return cpu_kernels.conv_silu_backward(x, weight, bias, dy.contiguous())


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [B, T, D], weight [K, D] (tap j multiplies x[t - K + 1 + j]), bias [D] -> [B, T, D]."""
    if _kernel_ok(x, weight, bias):
        return _CausalConvSilu.apply(x, weight, bias)
    if triton_use(x, weight, bias) and x.shape[1] > 0:
        return triton().causal_conv_silu(x, weight, bias)
    return causal_conv_silu_reference(x, weight, bias)


# ---- rotary position embedding ----


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, T, D] or [T, D]: x * cos + rotate_half(x) * sin (Llama's convention)."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return cpu_kernels.rope(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        return cpu_kernels.rope(dy, cos, sin, backward=True), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    B, H, T, D = x.shape
    if (
        _kernel_ok(x, cos, sin)
        and D % 2 == 0
        and x.stride(-1) == 1
        and not cos.requires_grad
        and not sin.requires_grad
        and cos.is_contiguous()
        and sin.is_contiguous()
        and cos.shape == sin.shape
        and cos.shape[-2:] == (T, D)
        and (cos.dim() == 2 or cos.shape[0] == B)
    ):
        if _no_grad(x):
            return cpu_kernels.rope(x, cos, sin)
        return _Rope.apply(x, cos, sin)
    if triton_use(x, cos, sin) and triton().rope_supported(x, cos, sin):
        return triton().rope(x, cos, sin)
    return rope_reference(x, cos, sin)
