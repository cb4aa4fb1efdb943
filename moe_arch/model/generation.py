"""Generation with the KV / Mamba / MoD caches, and self-speculative decoding with the MTP heads.

Plain decoding runs one forward per new token. The model already has heads that predict tokens t+2 .. t+k+1 from
the hidden state of token t (multi-token prediction, trained with the LM). Self-speculative decoding uses them as
the draft model, as Medusa and DeepSeek-V3 do:

    h_t          hidden state of the last token the caches hold
    x_{t+1}      the next token, sampled from the LM head's p(. | h_t) (always exact)
    d_{t+2..}    drafts: MTP head i samples token t+i+1 from q_i(. | h_t)
    verify       ONE forward over [x_{t+1}, d_{t+2}, ..., d_{t+k+1}] gives p at every drafted position
    accept       greedy: the longest prefix of drafts equal to the argmax of p; sampling: the speculative-sampling
                 rule (accept d with probability min(1, p(d) / q(d)); at the first rejection sample from
                 normalise(max(0, p - q))), so every emitted token has exactly the distribution of plain sampling
    roll back    the caches forget the rejected tokens: KV entries past the accepted position are invalidated,
                 each Mamba layer restores the state it recorded after the accepted row, MoD scores are simply
                 overwritten by the next call (they are indexed by position)

Sequences of a batch may have prompts of different lengths (each prompt is prefilled alone into its row of the
caches; decoding then runs all rows together, each at its own position), and each row keeps as many drafts as it
accepted: rows drift apart in position, which the caches (indexed by position per row) allow. Caches are allocated
once: the KV cache and the MoD scores by position, the Mamba states updated in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_arch.model.attention import KVCache


@dataclass
class Generated:
    tokens: torch.Tensor  # [B, n] new tokens, n = max_new_tokens unless every row stopped at EOS (then EOS)
    forwards: int  # model forwards after the prefill
    drafted: int  # draft tokens proposed (per row, summed over rows)
    accepted: int  # of which accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens.shape[1] / max(1, self.forwards)


def transform_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, top-k and top-p (nucleus) applied to logits [..., V]; the result's softmax is what is sampled."""
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    return logits


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row of logits [B, V] (argmax at temperature 0)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = transform_logits(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _row_caches(caches: list[dict], b: int) -> list[dict]:
    return [
        {"seq": c["seq"].row(b), "mod": c["mod"].row(b) if c["mod"] is not None else None, "selected": None}
        for c in caches
    ]


def _recording(caches: list[dict], on: bool) -> None:
    for c in caches:
        if not isinstance(c["seq"], KVCache):
            c["seq"].recording = on


def _rollback(model, caches: list[dict], pos: torch.Tensor, keep: torch.Tensor) -> None:
    """Row b keeps the first ``keep[b]`` tokens of the last (verification) call, which started at ``pos[b]``."""
    end = pos + keep
    for blk, c in zip(model.layers, caches):
        seq = c["seq"]
        if isinstance(seq, KVCache):
            seq.rollback(end)
        elif blk.mod_router is not None:
            # a MoD block's layers saw only the tokens it selected, in order: keep those among the first keep[b]
            sel = c["selected"]
            first = torch.arange(sel.shape[1], device=sel.device)[None, :] < keep[:, None]
            seq.rollback((sel & first).sum(1))
        else:
            seq.rollback(keep)


@torch.no_grad()
def generate(
    model,
    prompts: torch.Tensor | list[torch.Tensor],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    draft_tokens: int = 0,
    drafter=None,
) -> Generated:
    """``prompts``: a [B, T] tensor or a list of 1-D token tensors (lengths may differ). ``draft_tokens``: tokens
    drafted per forward (0: plain decoding; at most the number of MTP heads). ``drafter``, for greedy speculative
    decoding with another draft source (tests use an oracle): ``drafter(new_tokens [B, N], counts [B], k)`` returns
    [B, k] draft tokens for the positions after the first counts[b] new tokens of row b; it replaces the MTP heads."""
    device = model.embed.weight.device
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.shape[1] == 0:
            raise ValueError(f"prompt must be a non-empty [batch, tokens] tensor, got shape {tuple(prompts.shape)}")
        rows, same = [p for p in prompts], True
    else:
        rows = [torch.as_tensor(p, device=device).reshape(-1) for p in prompts]
        if not rows or any(r.numel() == 0 for r in rows):
            raise ValueError("every prompt needs at least one token")
        same = len({r.numel() for r in rows}) == 1
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
    B = len(rows)
    lengths = torch.tensor([r.numel() for r in rows], device=device)
    max_len = int(lengths.max()) + max_new_tokens
    if max_len > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt ({int(lengths.max())}) + max_new_tokens ({max_new_tokens}) exceeds model.max_seq_len="
            f"{model.cfg.max_seq_len}"
        )
    k = draft_tokens
    if drafter is not None and temperature > 0:
        raise ValueError("a drafter gives tokens, not distributions: it works with greedy decoding only")
    if drafter is None and not 0 <= k <= len(model.mtp_heads):
        raise ValueError(
            f"draft_tokens={k}: the model has {len(model.mtp_heads)} MTP heads to draft with "
            f"(model.n_predict={model.cfg.n_predict})"
        )
    out = torch.full((B, max_new_tokens), eos_id if eos_id is not None else 0, dtype=torch.long, device=device)
    result = Generated(out, 0, 0, 0)
    if max_new_tokens == 0:
        return result
    # Verification writes up to k positions past a row's last token (rolled back if not accepted): room for them.
    caches = model.new_caches(B, max_len + k)
    table = model.rotary.cos_sin(torch.arange(max_len + k, device=device), torch.float32)
    # ---- prefill: one forward for equal lengths, else each prompt alone into its row of the caches
    if same:
        h = model.hidden_states(torch.stack(rows), caches=caches, start=0, table=table)[:, -1]
    else:
        hs = []
        for b, r in enumerate(rows):
            part = _row_caches(caches, b)
            hs.append(model.hidden_states(r[None], caches=part, start=0, table=table)[:, -1])
        h = torch.cat(hs)
    greedy = temperature <= 0
    ar = torch.arange(B, device=device)
    n = torch.zeros(B, dtype=torch.long, device=device)  # tokens emitted per row
    active = torch.ones(B, dtype=torch.bool, device=device)  # neither finished nor stopped at EOS

    def emit(tokens: torch.Tensor, counts: torch.Tensor) -> None:
        """Append the first counts[b] of tokens[b] to row b (cut after an EOS), and update ``active``."""
        m = tokens.shape[1]
        if m == 0:
            return
        j = torch.arange(m, device=device)[None, :]
        if eos_id is not None:  # nothing after a row's first EOS
            first = torch.where(tokens == eos_id, j, m).amin(1)
            counts = torch.minimum(counts, first + 1)
            active.copy_(active & (first >= counts))
        take = j < counts[:, None]
        out[ar[:, None].expand(-1, m)[take], (n[:, None] + j)[take]] = tokens[take]
        n.add_(counts)
        active.copy_(active & (n < max_new_tokens))

    nxt = sample_next(model.lm_head(h).float(), temperature, top_k, top_p, generator)
    pos = lengths.clone()  # position of nxt in each row (it is emitted, not yet in the caches)
    while True:
        emit(nxt[:, None], active.long())
        if not bool(active.any()):
            break
        # ---- drafts from the MTP heads at h (the hidden state of the token before nxt). A row may keep at most
        # cap drafts: they and the token after them must fit in max_new_tokens.
        cap = torch.where(active, max_new_tokens - n - 1, 0)
        kk = min(k, int(cap.max()))
        drafts, q = [], []
        if drafter is not None and kk:
            drafts = list(drafter(out, n.clone(), kk).to(device).unbind(1))
        for head in model.mtp_heads[:kk] if drafter is None else ():
            logits = head(h).float()
            if greedy:
                drafts.append(logits.argmax(-1))
            else:
                qi = transform_logits(logits, temperature, top_k, top_p).softmax(-1)
                drafts.append(torch.multinomial(qi, 1, generator=generator).squeeze(-1))
                q.append(qi)
        inp = torch.stack([nxt] + drafts, 1)  # [B, 1 + kk]
        if kk:
            _recording(caches, True)
        hidden = model.hidden_states(inp, caches=caches, start=pos, table=table)  # [B, 1 + kk, d]
        if kk:
            _recording(caches, False)
        result.forwards += 1
        p_logits = model.lm_head(hidden).float()  # p_logits[:, j] is the distribution of the token after inp[:, j]
        # ---- accept, per row
        if kk:
            d = torch.stack(drafts, 1)
            if greedy:
                ok = d == p_logits[:, :kk].argmax(-1)
            else:
                p = transform_logits(p_logits[:, :kk], temperature, top_k, top_p).softmax(-1)  # [B, kk, V]
                qs = torch.stack(q, 1)
                pd = p.gather(2, d[:, :, None]).squeeze(2)
                qd = qs.gather(2, d[:, :, None]).squeeze(2)
                u = torch.rand(pd.shape, generator=generator, device=device)
                ok = u * qd < pd  # accept with probability min(1, p(d) / q(d))
            accepted = torch.cumprod(ok.long(), 1).sum(1)  # leading accepted drafts
            result.drafted += kk * int(active.sum())
            result.accepted += int(accepted[active].sum())
            a = torch.where(active, torch.minimum(accepted, cap), 0)
        else:
            d = inp[:, :0]
            accepted = a = torch.zeros(B, dtype=torch.long, device=device)
        keep = torch.where(active, 1 + a, 0)  # a finished row keeps nothing: its caches stay where they were
        emit(d, a)
        if kk and bool((keep < 1 + kk).any()):  # every row kept every token: the caches are already right
            _rollback(model, caches, pos, keep)
        pos = pos + keep
        h = hidden[ar, a]
        at_a = p_logits[ar, a]  # the distribution of the token after the last kept one
        if greedy:
            nxt = at_a.argmax(-1)
        else:
            nxt = sample_next(at_a, temperature, top_k, top_p, generator)
            if kk:
                # a row that rejected draft a+1 samples from normalise(max(0, p - q)) there; a row that accepted it
                # but may not keep more (cap) takes that draft
                rejected = (accepted == a) & (a < kk)
                ai = a.clamp(max=kk - 1)
                resid = (p[ar, ai] - qs[ar, ai]).clamp(min=0)
                mass = resid.sum(-1, keepdim=True)
                resid = torch.where(mass > 0, resid / mass.clamp(min=1e-30), p[ar, ai])
                fixed = torch.multinomial(resid, 1, generator=generator).squeeze(-1)
                nxt = torch.where(rejected, fixed, torch.where(accepted > a, d[ar, ai], nxt))
    result.tokens = out[:, : int(n.max())]  # shorter when every row stopped at EOS
    return result
