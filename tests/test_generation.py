"""Generation: self-speculative decoding with the MTP heads (greedy = plain greedy token for token; sampling = the
plain sampling distribution), batches of prompts of different lengths, static caches and their rollback.

Exact-equality tests run the model in float64: a GEMM's rounding can depend on how many rows it multiplies (the
verification forward multiplies 1 + k rows where plain decoding multiplies one), and float64 keeps those
differences (~1e-16 relative) far below the gap between the two best logits, which ``assert_clear_greedy`` checks
for every greedy token the tests compare: the tokens are equal because no decision was closer than that."""

import random

import pytest
import torch
from conftest import small_overrides
from scipy.stats import chisquare

from moe_arch.config import ModelConfig
from moe_arch.model.generation import generate
from moe_arch.model.transformer import build_model


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(**small_overrides(n_predict=3))  # MoD, MoE and Mamba on; 2 MTP heads
    return build_model(cfg, seed=0).eval().double()


def prompts(n: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (n, length), generator=torch.Generator().manual_seed(seed))


def oracle(reference: torch.Tensor, wrong: float, seed: int = 0):
    """Drafts = the plain-greedy continuation, each draft replaced by a wrong token with probability ``wrong``:
    every pattern of accepted and rejected drafts, hence every rollback point, occurs."""
    rng = random.Random(seed)

    def draft(new: torch.Tensor, counts: torch.Tensor, k: int) -> torch.Tensor:
        padded = torch.cat([reference, torch.zeros_like(reference[:, :k])], 1)  # past the end: anything
        d = torch.stack([padded[b, int(n) : int(n) + k] for b, n in enumerate(counts)])
        for b in range(d.shape[0]):
            for j in range(d.shape[1]):
                if rng.random() < wrong:
                    d[b, j] = (d[b, j] + 1 + rng.randrange(510)) % 512
        return d

    return draft


def assert_clear_greedy(model, prompt: torch.Tensor, new: torch.Tensor) -> None:
    """Every greedy choice of ``new`` (1-D) after ``prompt`` (1-D) won by a margin far above float64 rounding
    (1e-9 of the logits' scale against ~1e-16): two computations of the same model cannot pick differently."""
    seq = torch.cat([prompt, new[:-1]])[None]
    with torch.no_grad():
        logits = model(seq, return_logits=True).logits[0, len(prompt) - 1 :]
    top2 = logits.topk(2, dim=-1)
    margin = (top2.values[:, 0] - top2.values[:, 1]).min().item()
    assert margin > 1e-9 * logits.abs().max().item(), margin  # first: a near-tie is the reason, not a bug
    assert torch.equal(top2.indices[:, 0], new)


def test_speculative_greedy_gives_the_plain_greedy_tokens(model):
    p = prompts(3, 7)
    plain = generate(model, p, 40, temperature=0)
    for b in range(3):
        assert_clear_greedy(model, p[b], plain.tokens[b])
    assert plain.forwards == 39 and plain.tokens.shape == (3, 40)
    mtp = generate(model, p, 40, temperature=0, draft_tokens=2)  # the model's own (untrained) heads
    assert torch.equal(mtp.tokens, plain.tokens)
    for k, wrong in ((1, 0.3), (2, 0.3), (4, 0.5), (4, 0.0)):
        spec = generate(model, p, 40, temperature=0, draft_tokens=k, drafter=oracle(plain.tokens, wrong, k))
        assert torch.equal(spec.tokens, plain.tokens), (k, wrong)
        assert spec.accepted > 0 and spec.forwards < plain.forwards
        if wrong == 0.0:  # every draft right: 1 + k tokens per forward
            assert spec.acceptance_rate == 1.0 and spec.forwards <= -(-39 // (k + 1)) + 1


def test_batches_of_different_lengths_equal_each_prompt_alone(model):
    rows = [prompts(1, n, seed=n)[0] for n in (3, 11, 6, 1)]
    batch = generate(model, rows, 25, temperature=0)
    for b, r in enumerate(rows):
        alone = generate(model, r[None], 25, temperature=0)
        assert_clear_greedy(model, r, alone.tokens[0])
        assert torch.equal(batch.tokens[b], alone.tokens[0]), b
    reference = batch.tokens
    spec = generate(model, rows, 25, temperature=0, draft_tokens=2, drafter=oracle(reference, 0.25))
    assert torch.equal(spec.tokens, reference) and spec.accepted > 0


def test_model_generate_keeps_its_interface(model):
    p = prompts(2, 5)
    out = model.generate(p, 12, temperature=0, speculative=True)
    assert out.shape == (2, 17) and torch.equal(out[:, :5], p)
    for b in range(2):
        assert_clear_greedy(model, p[b], out[b, 5:])
    assert torch.equal(out, model.generate(p, 12, temperature=0))
    eos = int(out[0, 5])  # the first new token of row 0 as EOS: row 0 stops at once, row 1 goes on
    stopped = model.generate(p, 12, temperature=0, eos_id=eos)
    assert (stopped[0, 5:] == eos).all()
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(p, 1000, temperature=0)
    with pytest.raises(ValueError, match="draft_tokens=3: the model has 2 MTP heads"):
        generate(model, p, 4, temperature=0, draft_tokens=3)


def exact_joint(model, prompt: torch.Tensor, n: int, V: int) -> torch.Tensor:
    """P(x1..xn | prompt) for every continuation, from full forwards (no cache): [V] * n."""
    conts = torch.cartesian_prod(*[torch.arange(V)] * n).reshape(-1, n)
    seqs = torch.cat([prompt.expand(conts.shape[0], -1), conts], 1)
    with torch.no_grad():
        logp = model(seqs[:, :-1], return_logits=True).logits.double().log_softmax(-1)
    T = prompt.shape[1]
    picked = logp[:, T - 1 :].gather(2, conts[:, :, None]).squeeze(2)
    return picked.sum(1).exp().reshape([V] * n)


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.8, 4)])
def test_speculative_sampling_has_the_plain_sampling_distribution(temperature, top_k):
    """Four tokens from an 8-token vocabulary, 4000 sequences each way (batches of 8); chi-square of the pair marginals
    (x1, x2), (x2, x3), (x3, x4) against the exact joint, for speculative (2 drafts: positions 2 and 3 are drafted, 4 is
    the verification's own sample) and plain sampling. The MTP heads are untrained, so drafts are rejected and accepted
    at every position (checked)."""
    V = 8
    cfg = ModelConfig(
        **small_overrides(
            vocab_size=V, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, d_ff_expert=32, n_predict=3, max_seq_len=32
        )
    )
    model = build_model(cfg, seed=3).eval().double()
    with torch.no_grad():  # a sharper target than at initialisation (the drafts stay near uniform)
        model.lm_head.weight.mul_(20)
    prompt = torch.tensor([[1, 5, 2, 7, 3]])
    joint = exact_joint(model, prompt, 4, V)
    if top_k or temperature != 1.0:  # the exact joint of the transformed distributions
        from moe_arch.model.generation import transform_logits

        conts = torch.cartesian_prod(*[torch.arange(V)] * 4)
        seqs = torch.cat([prompt.expand(conts.shape[0], -1), conts], 1)
        with torch.no_grad():
            logits = model(seqs[:, :-1], return_logits=True).logits.double()[:, 4:]
        logp = transform_logits(logits, temperature, top_k, 1.0).log_softmax(-1)
        joint = logp.gather(2, conts[:, :, None]).squeeze(2).sum(1).exp().reshape([V] * 4)
    g = torch.Generator().manual_seed(0)
    for draft_tokens in (2, 0):
        samples, accepted, drafted = [], 0, 0
        for _ in range(500):
            out = generate(
                model,
                prompt.expand(8, -1),
                4,
                temperature=temperature,
                top_k=top_k,
                generator=g,
                draft_tokens=draft_tokens,
            )
            samples.append(out.tokens)
            accepted, drafted = accepted + out.accepted, drafted + out.drafted
        s = torch.cat(samples)
        if draft_tokens:
            assert 0.1 < accepted / drafted < 0.9, accepted / drafted
        for i, j, dims in ((0, 1, (2, 3)), (1, 2, (0, 3)), (2, 3, (0, 1))):
            expected = joint.sum(dims).reshape(-1) * s.shape[0]
            observed = torch.bincount(s[:, i] * V + s[:, j], minlength=V * V).double()
            keep = expected > 5
            obs = torch.cat([observed[keep], observed[~keep].sum()[None]])
            exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
            assert chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-3, (draft_tokens, i, j)


def test_generate_cli_speculative_auto_and_off(tmp_path, data_cache, capsys):
    from conftest import trained_checkpoint

    from moe_arch.cli import main

    ckpt, _ = trained_checkpoint(tmp_path, data_cache, steps=4)
    capsys.readouterr()  # the training run's output
    texts = {}
    for mode in ("auto", "off"):
        assert (
            main(
                [
                    "generate",
                    str(ckpt),
                    "--prompt",
                    "The hacker",
                    "--max-new-tokens",
                    "20",
                    "--temperature",
                    "0",
                    "--speculative",
                    mode,
                ]
            )
            == 0
        )
        out = capsys.readouterr()
        texts[mode] = out.out
        if mode == "auto":
            assert "speculative (1 MTP draft per forward): acceptance" in out.err and "tokens/s" in out.err
        else:
            assert "plain decoding" in out.err
    assert texts["auto"] == texts["off"]  # greedy: the same text either way
