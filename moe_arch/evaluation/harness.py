"""An lm-evaluation-harness model for this project's checkpoints (``pip install 'moe-arch[eval]'``).

Importing this module registers the model as ``moe_arch`` in lm_eval's registry; ``moe-arch lm-eval CKPT
--tasks ...`` does that and runs ``lm_eval.simple_evaluate``. From Python::

    import lm_eval, moe_arch.evaluation.harness
    lm_eval.simple_evaluate(model="moe_arch", model_args="checkpoint=runs/tiny/checkpoints/final.pt", tasks=[...])

Conventions, as lm_eval's Hugging Face model has them: a continuation's leading spaces come from the context
(``_encode_pair``), each request is scored after a document-start token (BOS where the tokenizer puts one, else
EOS: how documents are framed in training), rolling log-likelihoods use ``get_rolling_token_windows`` with the
model's full context, and ``generate_until`` decodes greedily unless the task asks for sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string

from moe_arch.evaluation.loss import load_for_eval
from moe_arch.precision import resolve_policy
from moe_arch.utils import resolve_device


@register_model("moe_arch", "moe-arch")
class MoeArchLM(LM):
    def __init__(
        self, checkpoint: str, device: str = "auto", batch_size: int | str = 1, max_length: int | None = None, **kwargs
    ):
        super().__init__()
        self._device = resolve_device(device, "device")
        ck = load_for_eval(checkpoint, self._device)
        self.model, self.cfg, self.tok = ck.model, ck.cfg, ck.tokenizer
        self.policy = resolve_policy(self.cfg.train.precision, self._device)
        self.max_length = int(max_length or self.cfg.model.max_seq_len)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 1
        self.prefix_token_id = self.tok.bos_id if self.tok.add_bos else self.tok.eos_id

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "MoeArchLM":
        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k in ("device", "batch_size")}
        return cls(**{**args, **extra})

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _logprobs(self, tokens: list[int]) -> torch.Tensor:
        """log p(tokens[i+1] | tokens[:i+1]) for i < len-1, float32 on the CPU."""
        x = torch.tensor([tokens[:-1]], device=self._device)
        with self.policy.autocast(self._device):
            logits = self.model(x, return_logits=True, mtp=False).logits
        return F.log_softmax(logits.float()[0], dim=-1).cpu()

    def score(self, context_tokens: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Summed log-probability of ``continuation`` after ``context_tokens`` (left-truncated to the model's
        context), and whether greedy decoding would produce it."""
        whole = (context_tokens + continuation)[-(self.max_length + 1) :]
        lp = self._logprobs(whole)[-len(continuation) :]
        target = torch.tensor(continuation)
        ll = float(lp.gather(1, target[:, None]).sum())
        return ll, bool((lp.argmax(-1) == target).all())

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context)
        return [self.prefix_token_id] + ctx, whole[len(ctx) :]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            ctx, cont = self._encode_pair(context, continuation)
            if not cont:
                raise ValueError(f"lm_eval request with an empty continuation after tokenization: {continuation!r}")
            res = self.score(ctx, cont)
            self.cache_hook.add_partial("loglikelihood", (context, continuation), res)
            out.append(res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            windows = map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok.encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            )
            total = sum(self.score(ctx, pred)[0] for ctx, pred in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if sample else 0.0
            ids = [self.prefix_token_id] + self.tok.encode(context)
            ids = ids[-max(1, self.max_length - max_new) :]
            room = min(max_new, self.cfg.model.max_seq_len - len(ids))
            prompt = torch.tensor([ids], device=self._device)
            gen = self.model.generate(prompt, room, temperature=temperature, top_k=0, eos_id=self.tok.eos_id)[
                0, len(ids) :
            ].tolist()
            if self.tok.eos_id in gen:
                gen = gen[: gen.index(self.tok.eos_id)]
            text = self.tok.decode(gen)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            self.cache_hook.add_partial("generate_until", (context, {"until": until}), text)
            out.append(text)
        return out
