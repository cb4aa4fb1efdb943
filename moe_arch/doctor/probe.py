"""Model-aware probes: rebuild the model from its config, load the checkpoint, run one real batch.

- Gradient flow: per tensor, no gradient / all-zero gradient / non-finite / its norm; per expert slice of
  stacked expert tensors.
- MoE router health on real tokens: per layer, the share of tokens each expert gets, load percentiles over
  experts (p50 / p90 / max of load / mean), max/mean and min/mean load, normalised entropy (and its place between
  top-k collapse and balance), Gini coefficient, dead experts (no token routed), and whether the load collapsed
  (:mod:`moe_arch.doctor.routing`, the rule the logged loads are judged by too).
- Mixture-of-Depths: selected fraction and router weight statistics per MoD block.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field

import torch

from moe_arch.checkpoint.readers import CheckpointView
from moe_arch.config import Config
from moe_arch.data.corpus import Corpus, DataError
from moe_arch.data.dataset import open_corpus, prepare_data
from moe_arch.data.tokenizer import TextTokenizer
from moe_arch.doctor.routing import collapse_reasons, routing_stats
from moe_arch.model.transformer import materialize


@dataclass
class ProbeResult:
    batch_tokens: int
    text_source: str
    loss: float
    lm_loss: float
    no_grad: list[str] = field(default_factory=list)
    zero_grad: list[str] = field(default_factory=list)
    nonfinite_grad: list[str] = field(default_factory=list)
    grad_norms: dict[str, float] = field(default_factory=dict)
    expert_zero_grad: dict[str, list[int]] = field(default_factory=dict)
    router: dict[int, dict] = field(default_factory=dict)
    mod: dict[int, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["router"] = {str(k): v for k, v in self.router.items()}
        d["mod"] = {str(k): v for k, v in self.mod.items()}
        return d


def _tokens(cfg: Config, view: CheckpointView, n_tokens: int) -> tuple[torch.Tensor, str]:
    if view.meta.get("tokenizer_json"):
        tok = TextTokenizer.from_checkpoint(view.meta, "checkpoint")
    else:
        tok = prepare_data(cfg.data, cfg.model.vocab_size, log=lambda *a: None).tokenizer
    try:
        corpus, source = open_corpus(cfg.data), cfg.data.source
        docs = corpus.documents()
        first = next(docs)
        docs = itertools.chain([first], docs)
    except (DataError, StopIteration):
        corpus, source = Corpus("embedded"), "embedded (the configured data source is not readable here)"
        docs = corpus.documents()
    ids: list[int] = []
    for d in docs:
        ids.extend(tok.encode_documents([d])[0])
        if len(ids) >= n_tokens + 1:
            break
    if max(ids) >= cfg.model.vocab_size:
        raise ValueError("the tokenizer produces ids beyond model.vocab_size")
    return torch.tensor(ids[: n_tokens + cfg.model.n_predict], dtype=torch.long), source


def run_probe(view: CheckpointView, cfg: Config, batch: int = 4, seq_len: int | None = None) -> ProbeResult:
    T = min(seq_len or cfg.train.seq_len, 256)
    sd = {name: ti.get().float() if ti.dtype.is_floating_point else ti.get() for name, ti in view.tensors.items()}
    model, missing, unexpected = materialize(cfg.model, sd, "cpu", strict=False)
    model.float().train()
    ids, source = _tokens(cfg, view, batch * T)
    need = batch * T + cfg.model.n_predict
    if ids.numel() < need:
        batch = max(1, (ids.numel() - cfg.model.n_predict) // T)
    rows = torch.stack([ids[i * T : i * T + T + cfg.model.n_predict] for i in range(batch)])
    inp, tgt = rows[:, :T], rows[:, 1:]
    out = model(inp, tgt)
    out.loss.backward()
    res = ProbeResult(inp.numel(), source, float(out.loss.detach()), float(out.lm_loss.detach()))
    if missing:
        res.notes.append(
            f"{len(missing)} model tensors missing from the checkpoint (left uninitialised): {missing[:5]}"
        )
    if unexpected:
        res.notes.append(f"{len(unexpected)} checkpoint tensors not in the model: {unexpected[:5]}")
    for name, p in model.named_parameters():
        g = p.grad
        if g is None:
            res.no_grad.append(name)
        elif not bool(torch.isfinite(g).all()):
            res.nonfinite_grad.append(name)
        elif not bool(g.any()):
            res.zero_grad.append(name)
        else:
            res.grad_norms[name] = float(g.norm())
            if p.ndim == 3 and ".experts." in name:
                zero = [i for i in range(p.shape[0]) if not bool(g[i].any())]
                if zero:
                    res.expert_zero_grad[name] = zero
    aux = out.aux
    for layer, load in sorted(aux.moe_load.items()):
        stats = routing_stats(load, cfg.model.top_k)
        res.router[layer] = {"tokens_per_expert": [int(x) for x in load], **stats, "collapse": collapse_reasons(stats)}
    for layer, frac in sorted(aux.mod_frac.items()):
        wm, ws = aux.mod_weight.get(layer, (torch.tensor(float("nan")), torch.tensor(float("nan"))))
        res.mod[layer] = {
            "selected_fraction": float(frac),
            "router_weight_mean": float(wm),
            "router_weight_std": float(ws),
            "capacity": cfg.model.mod_capacity,
        }
    return res
