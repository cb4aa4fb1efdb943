"""Generation speed: moe_arch plain and self-speculative decoding vs Hugging Face ``generate`` on the nearest HF
architecture of the same shape (Mixtral: same width, depth, GQA heads, experts, top-k, expert width and vocabulary;
it has no Mamba or MoD layers), greedy, 1 and 8 prompts, 256 new tokens, KV caches on both sides.

The model is the checkpoint `make train` leaves (runs/tiny/checkpoints/final.pt; pass another with --checkpoint),
so the acceptance rate is that of trained MTP heads; prompts are 32-token windows of the embedded corpus's
validation text. The HF model has random weights (speed does not depend on them) and is forced to produce all 256
tokens (min_new_tokens). Implementations alternate over --rounds rounds; medians. The torch.compile row compiles
the decode step's dense parts (``--compile``; slow to warm up).

    python bench/bench_generate.py [--checkpoint PATH] [--rounds 5] [--new 256]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import ROOT, header

from moe_arch.checkpoint import load_model
from moe_arch.model.generation import generate


def load(path: Path):
    from moe_arch.data.tokenizer import TextTokenizer

    model, w = load_model(path)
    return model.eval(), w.config, TextTokenizer.from_checkpoint(w.meta, path)


def prompts(tok, n: int, length: int = 32) -> torch.Tensor:
    import gzip
    import json

    path = ROOT / "moe_arch" / "data" / "corpus" / "corpus.jsonl.gz"
    docs = [json.loads(line)["text"] for line in gzip.open(path, "rt")]
    ids = tok.encode("\n\n".join(docs[-50:]))  # the tail documents: the validation split
    step = (len(ids) - length) // n
    return torch.tensor([ids[i * step : i * step + length] for i in range(n)])


def hf_mixtral(cfg):
    from transformers import MixtralConfig, MixtralForCausalLM

    m = cfg.model
    hc = MixtralConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.d_model,
        intermediate_size=m.d_ff_expert,
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads,
        head_dim=m.resolved_head_dim,
        num_local_experts=m.n_experts,
        num_experts_per_tok=m.top_k,
        max_position_embeddings=m.max_seq_len,
        rope_theta=m.rope_theta,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return MixtralForCausalLM(hc).eval()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=str(ROOT / "runs" / "tiny" / "checkpoints" / "final.pt"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    path = Path(args.checkpoint)
    if not path.exists():
        raise SystemExit(f"{path} not found: run `make train` first (or pass --checkpoint)")
    model, cfg, tok = load(path)
    hf = hf_mixtral(cfg)
    k = len(model.mtp_heads)
    header(
        f"generation: greedy, {args.new} new tokens, {cfg.model.n_layers} layers d_model {cfg.model.d_model}, "
        f"{k} MTP heads"
    )
    print(
        f"{'prompts':>7} {'implementation':>34} {'new tok/s':>10} {'vs HF':>7} {'acceptance':>11} {'tok/forward':>12}"
    )
    for n in (1, 8):
        p = prompts(tok, n)
        runs = {
            "HF Mixtral generate (KV cache)": lambda: hf.generate(
                p, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, use_cache=True, pad_token_id=0
            ),
            "moe_arch plain": lambda: generate(model, p, args.new, temperature=0),
            f"moe_arch speculative ({k} draft{'s' if k > 1 else ''})": lambda: generate(
                model, p, args.new, temperature=0, draft_tokens=k
            ),
        }
        if args.compile:
            compiled = _compiled(model)
            runs["moe_arch speculative, compiled"] = lambda: generate(
                compiled, p, args.new, temperature=0, draft_tokens=k
            )
        with torch.no_grad():
            for fn in runs.values():  # warm-up (and compilation)
                fn()
            times = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name, fn in runs.items():
                    times[name].append(timed(fn))
            spec = generate(model, p, args.new, temperature=0, draft_tokens=k)
            plain = generate(model, p, args.new, temperature=0)
        # float32: the verification forward is another GEMM shape than one-token decoding, so a near-tie between
        # two logits may be decided differently (the tests check exact agreement in float64); report, not assert.
        same = spec.tokens == plain.tokens
        first = [int(r.nonzero()[0]) if bool(r.any()) else None for r in ~same]
        print(
            f"{n:>7} speculative tokens equal to plain greedy's: {int(same.sum())}/{same.numel()}"
            + ("" if same.all() else f" (rows diverge at new token {first})")
        )
        ref = statistics.median(times["HF Mixtral generate (KV cache)"])
        for name, ts in times.items():
            t = statistics.median(ts)
            acc = f"{spec.acceptance_rate:.1%}" if "speculative" in name else ""
            tpf = f"{spec.tokens_per_forward:.2f}" if "speculative" in name else ("1.00" if "plain" in name else "")
            print(f"{n:>7} {name:>34} {n * args.new / t:>10.0f} {ref / t:>6.2f}x {acc:>11} {tpf:>12}")
    print(
        "vs HF: HF's time / ours for the same prompts and token count. The speculative tokens are compared with "
        "plain greedy decoding's in this run (float32: a near-tie may be decided either way)."
    )


def _compiled(model):
    import copy

    m = copy.deepcopy(model)
    m.compile_blocks()
    return m


if __name__ == "__main__":
    main()
