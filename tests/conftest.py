import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from moe_arch.config import Config  # noqa: E402

_BF16_SDPA: list = []


def skip_unless_bf16_attention_runs() -> None:
    """Skip when bf16 SDPA cannot run in this process. PyTorch's CPU flash attention chooses its bf16 GEMM by the
    CPU's features (AVX512-BF16 present) but packs with the kernels of ``ATEN_CPU_CAPABILITY``: forced to avx2 on
    such a CPU (the portability run, tools/test_portable.py) it raises "pack_vnni2 is only supported when avx512
    is supported". A real AVX2 CPU never takes that branch, so nothing of ours is untested by the skip."""
    if not _BF16_SDPA:
        q = torch.randn(1, 4, 64, 32, dtype=torch.bfloat16)  # long enough for the flash kernel
        try:
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
            _BF16_SDPA.append(None)
        except RuntimeError as e:
            _BF16_SDPA.append(
                f"bf16 attention cannot run under ATEN_CPU_CAPABILITY="
                f"{os.environ.get('ATEN_CPU_CAPABILITY', 'default')} on this CPU: {e}"
            )
    if _BF16_SDPA[0]:
        pytest.skip(_BF16_SDPA[0])


def small_overrides(**extra) -> dict:
    """A model with every feature on, small enough for sub-second steps on 2 CPU cores."""
    model = dict(
        vocab_size=512,
        d_model=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        d_ff=128,
        max_seq_len=256,
        moe_layers=[1, 3],
        n_experts=4,
        top_k=2,
        d_ff_expert=64,
        mamba_layers=[2],
        mamba_d_state=8,
        mod_layers=[1, 3],
        mod_capacity=0.75,
        n_predict=2,
    )
    model.update(extra)
    return model


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One tokenizer/token cache for the whole session (BPE training takes a few seconds)."""
    return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture
def small_cfg(tmp_path, data_cache) -> Config:
    return Config.from_dict(
        {
            "model": small_overrides(),
            "train": dict(
                out_dir=str(tmp_path / "runs"),
                run_name="t",
                steps=6,
                batch_size=4,
                seq_len=32,
                warmup_steps=2,
                log_every=2,
                eval_every=0,
                ckpt_every=0,
                eval_max_tokens=2048,
                sample_tokens=0,
                progress="plain",
                tensorboard=False,
            ),
            "data": dict(cache_dir=data_cache),
            "monitor": dict(enabled=False),
        }
    )


def trained_checkpoint(root, data_cache: str, steps: int):
    """The final checkpoint of a short quiet run of the small model (for tests that read a real checkpoint)."""
    from moe_arch.training.trainer import Trainer

    cfg = Config.from_dict(
        {
            "model": small_overrides(),
            "data": {"cache_dir": data_cache},
            "monitor": {"enabled": False},
            "train": dict(
                out_dir=str(root),
                run_name="r",
                steps=steps,
                batch_size=4,
                seq_len=32,
                warmup_steps=1,
                log_every=1,
                eval_every=0,
                ckpt_every=0,
                eval_max_tokens=512,
                sample_tokens=0,
                progress="none",
                tensorboard=False,
            ),
        }
    )
    return Trainer(cfg).run().last_checkpoint, cfg


@pytest.fixture(params=["avx512", "avx2", "portable"])
def kernel_isa(request):
    """Run the test on one SIMD path of the CPU kernels (each path this CPU supports; the others skip), so one
    machine checks every build it can run, not only the one ``auto`` picks."""
    from moe_arch.model import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip(f"the CPU kernels cannot be built here: {cpu_kernels._error}")
    if request.param not in cpu_kernels.supported_isas():
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    with cpu_kernels.use_isa(request.param):
        yield request.param


@pytest.fixture
def cli(capsys):
    """``moe-arch ARGS`` in this process (a subprocess per call would cost seconds of imports): the exit code and
    what it printed. An exception other than the CLI's own one-line errors fails the test, as a traceback would."""
    from moe_arch.cli import main

    def run(*args) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse: --help, usage errors
            rc = e.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, out.out, out.err)

    return run


def one_line_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr
    lines = [l for l in out.stderr.splitlines() if l.strip() and not l.startswith(("warning", "  warnings.warn"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
