"""Mixture-of-Depths token routing (Raposo et al., 2024), in a causal form.

The paper picks, per sequence, the top ``capacity`` fraction of tokens by router score. That choice looks at
the whole sequence: changing token t can push an earlier token out of the top-k, so outputs before t change
and cached generation cannot reproduce the training forward. Here the same rule is applied *causally*:

    token t is selected  <=>  its score ranks within the top ceil(capacity * (t+1)) of the scores r_0..r_t

(ties go to the earlier token). Each token is ranked only against its prefix, so training, evaluation and
generation compute exactly the same function, the model is causal, and no predictor has to be trained to
stand in for the top-k at inference (the train/eval gap is zero by construction; tests check it). In
expectation a fraction ~capacity of the tokens is selected (slightly more, because early tokens are ranked
against few others); the trainer logs the measured fraction.

Selected tokens are gathered *in their original order* with their original positions (RoPE and causal
masking intact), run through the block, and added back scaled by sigmoid(router logit), so the router is
trained by the language-model loss. Skipped tokens pass through the residual stream unchanged.
"""

from __future__ import annotations

import math

import torch


def _within_capacity(keys: torch.Tensor, q: torch.Tensor, qpos: torch.Tensor, capacity: float) -> torch.Tensor:
    """The causal rule. keys [B, n]: scores by position; q [B, t]: the queries' scores at positions qpos ([t], or
    [B, t] per sequence) -> [B, t]: fewer than ceil(capacity * (p + 1)) earlier positions score at least as high
    (ties go to the earlier token)."""
    earlier = torch.arange(keys.shape[1], device=keys.device) < qpos[..., None]  # [(B,) t, n]
    rank = ((keys[:, None, :] >= q[:, :, None]) & earlier).sum(-1)  # earlier tokens scoring at least as high
    return rank < torch.ceil(capacity * (qpos + 1).double() - 1e-9).long()


def causal_capacity_select(
    scores: torch.Tensor, capacity: float, past: torch.Tensor | None = None, query_chunk: int = 512
) -> torch.Tensor:
    """scores [B, T] (positions P..P+T-1), past [B, P] (scores of positions 0..P-1) -> selected [B, T] bool."""
    B, T = scores.shape
    full = scores if past is None or past.numel() == 0 else torch.cat([past, scores], dim=1)
    P = full.shape[1] - T
    pos = torch.arange(P, P + T, device=scores.device)
    out = torch.empty(B, T, dtype=torch.bool, device=scores.device)
    for s in range(0, T, query_chunk):  # queries in chunks: [B, chunk, P + T] comparisons at a time
        out[:, s : s + query_chunk] = _within_capacity(
            full, scores[:, s : s + query_chunk], pos[s : s + query_chunk], capacity
        )
    return out


def gather_selected(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """selected [B, T] -> positions [B, K] of the selected tokens in order (padded), valid [B, K] or None."""
    counts = selected.sum(1)
    K = int(counts.max())
    # A stable sort on "not selected" puts the selected positions first, in their original order.
    order = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :K]
    if bool((counts == K).all()):
        return order, None
    valid = torch.arange(K, device=selected.device)[None, :] < counts[:, None]
    return order, valid


def capacity_tokens(capacity: float, T: int) -> float:
    """Expected number of tokens selected in a sequence of length T (for FLOP estimates)."""
    return float(sum(math.ceil(capacity * (t + 1) - 1e-9) / (t + 1) for t in range(T)))


class ModScores:
    """Router scores of one MoD block by position, for generation: [B, max_len], allocated once. A new token is
    ranked against the scores of the positions before it in its own sequence, so sequences of different lengths
    decode together and speculative tokens that were not accepted are simply overwritten later."""

    def __init__(self, batch: int, max_len: int, device):
        self.scores = torch.zeros(batch, max_len, dtype=torch.float32, device=device)

    def row(self, b: int) -> "ModScores":
        view = ModScores.__new__(ModScores)
        view.scores = self.scores[b : b + 1]
        return view

    def select(self, scores: torch.Tensor, positions: torch.Tensor, capacity: float) -> torch.Tensor:
        """scores, positions [B, T] -> selected [B, T]: the rule of :func:`causal_capacity_select` at each
        token's own position (every position before it in its sequence is filled)."""
        self.scores.scatter_(1, positions, scores.float())
        n = int(positions.max()) + 1
        return _within_capacity(self.scores[:, :n], scores.float(), positions, capacity)
