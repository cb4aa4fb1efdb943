"""The training loop.

One optimizer *step* = ``train.grad_accum`` micro-batches of ``train.batch_size`` sequences on every process.
Tokens seen counts input tokens exactly (windows are never padded). The loss the optimizer minimises is the
next-token loss plus the weighted multi-token-prediction and auxiliary terms; each is logged on its own, and
evaluation reports the next-token loss alone, so perplexity is honest.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_arch import checkpoint as ckpt
from moe_arch.checkpoint import RunLock, claim_for_fresh_start, existing_checkpoints
from moe_arch.checkpoint import field as _field
from moe_arch.checkpoint import loading as _loading
from moe_arch.config import Config, ConfigError, save_config
from moe_arch.data.dataset import (
    TokenData,
    WindowSampler,
    eval_batches,
    eval_windows,
    prepare_data,
    resolve_tokenizer,
    token_counts,
)
from moe_arch.data.tokenizer import TRAIN_BPE, TextTokenizer, padded_vocab, tokenizer_difference
from moe_arch.doctor.monitor import Monitor
from moe_arch.doctor.nonfinite import first_nonfinite_module
from moe_arch.model import cpu_kernels
from moe_arch.model.params import count_parameters, flops_per_token
from moe_arch.model.roles import named_parameter_roles
from moe_arch.model.transformer import HybridLM, build_model, materialize
from moe_arch.parallel.distributed import DistEnv
from moe_arch.parallel.parallelize import clip_grads_, global_grad_norm, is_fsdp, parallelize
from moe_arch.precision import resolve_policy
from moe_arch.training.flops import measure_matmul_peak
from moe_arch.training.metrics import ConsoleUI, MetricsLogger, check_histories
from moe_arch.training.optim import build_optimizers, build_schedulers, plan_parameters
from moe_arch.training.precision import CompensatedUpdates, preflight
from moe_arch.utils import human, resolve_device, tune_cpu_malloc


class NonFiniteLossError(RuntimeError):
    pass


class TrainingStopped(RuntimeError):
    """A monitor policy stopped the run on a critical alert."""


@dataclass
class RunResult:
    steps: int
    tokens_seen: int
    val_loss: float | None
    val_ppl: float | None
    unigram_loss: float | None
    sample: str | None
    run_dir: Path
    interrupted: int | None = None  # the signal number, when a signal stopped the run
    last_checkpoint: Path | None = None


def unigram_cross_entropy(train, val, vocab: int) -> float:
    """Cross-entropy (nats) of the validation tokens under the training split's add-one-smoothed unigram model.
    Streams over the token shards (the corpus may be larger than memory)."""
    counts = token_counts(train, vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-(token_counts(val, vocab) * logp).sum() / max(len(val), 1))


def resolve_config(cfg: Config, tok: TextTokenizer, log=None) -> Config:
    """The run's final config, resolved once before any model is built: the model's vocabulary follows the
    tokenizer (padded up to a multiple of 64), as torchtitan sets vocab_size from its tokenizer; a train-bpe
    tokenizer is trained to model.vocab_size instead. A vocabulary set by hand (config file, command line) that
    does not match is an error naming both numbers. ``log`` hears of a vocabulary that changed."""
    have, want = cfg.model.vocab_size, padded_vocab(tok.vocab_size)
    if cfg.data.tokenizer in TRAIN_BPE:
        if tok.vocab_size > have:
            raise ConfigError(f"data.tokenizer: the tokenizer has {tok.vocab_size} tokens but model.vocab_size={have}")
        return cfg
    if have in (want, tok.vocab_size):
        return cfg
    if "model.vocab_size" in cfg.explicit:
        raise ConfigError(
            f"model.vocab_size={have} was set by hand, but data.tokenizer={cfg.data.tokenizer!r} has "
            f"{tok.vocab_size} tokens (the model needs {want}, padded to a multiple of 64); remove "
            f"model.vocab_size or set it to {want}"
        )
    try:  # replace() validates the changed section and the whole config again
        out = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=want))
    except ConfigError as e:
        raise ConfigError(f"config (vocabulary from the tokenizer): {e}") from None
    out.explicit = cfg.explicit
    if log is not None:
        log(
            f"model.vocab_size {have} -> {want}: follows the tokenizer's {tok.vocab_size} tokens (padded to a "
            "multiple of 64)"
        )
    return out


def check_fits(cfg: Config, device: torch.device, shards: int) -> None:
    """Refuse, with the numbers, a model whose weights, gradients and optimizer state alone (16 bytes per
    parameter in float32: weight, gradient, two moments) exceed this device's free memory, before the data and
    the model take minutes to build and the allocation fails (or the machine swaps)."""
    n = cfg.model.estimated_parameters()
    need = 16 * n / max(1, shards)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = psutil.virtual_memory().available
    if need > free:
        raise ConfigError(
            f"model: ~{n:,} parameters need at least {need / 2**30:,.1f} GiB on each device for "
            f"weights, gradients and optimizer state, and {device} has {free / 2**30:,.1f} GiB free; "
            "shrink model.d_model / model.n_layers, or shard it over more GPUs (torchrun, "
            "--train.parallel fsdp)"
        )


class Trainer:
    phase = "start-up"  # what the run is doing, for the message when a second signal stops it at once

    def __init__(self, cfg: Config, resume: str | None = None, log=None, init_state: dict | None = None):
        self.cfg = cfg
        self._build_device()
        self.ui = ConsoleUI("none", 0, enabled=False)  # replaced in run(); messages before it go to `log`
        self._log = log or (print if self.dist.is_main else (lambda *a, **k: None))
        resume_path = self._open_run_folder(resume)
        torch.manual_seed(cfg.train.seed)
        # The checkpoint to resume, and its tokenizer, before the data: the data is tokenized with that tokenizer
        # (a train-bpe run's is in the checkpoint), and a data.tokenizer file changed since is refused here rather
        # than after hours of tokenizing the corpus with it.
        ck_tok = self._checkpoint_tokenizer(resume_path) if resume_path is not None else None
        self.data: TokenData = self._build_data(ck_tok)
        # The final config: everything from here on (model, optimizers, monitor, checkpoints) is built from it.
        self.cfg = resolve_config(cfg, self.data.tokenizer, log=self._log)
        self._build_model(init_state if resume_path is None else None)
        self._build_optimizers()
        self.sampler = WindowSampler(
            self.data.train,
            self.cfg.train.seq_len,
            self.cfg.model.n_predict,
            self.cfg.train.batch_size * self.dist.world,
            self.cfg.train.seed,
        )
        self._tokenizer_entries = self.data.tokenizer.checkpoint_entries()  # in every checkpoint (self-contained)
        self.stop_reason: str | None = None
        self.step = 0
        self.tokens_seen = 0
        self.nan_skips = 0
        self._stop_signal: int | None = None
        self.resumed_from: Path | None = None
        self.last_checkpoint: Path | None = None
        if resume_path is not None:
            self._resume(resume_path)
            if init_state is not None:  # e.g. `train --init-from DIR --resume latest` run a second time
                self._log(
                    f"--init-from: not applied, the run continues from {self.resumed_from} (its weights "
                    "descend from the folder's if the run began with it)"
                )
        # After resuming: the monitor's first reference is the weights training continues from.
        self.monitor = self._build_monitor()

    # ------------------------------------------------------------------------------------------ set-up
    def _build_device(self) -> None:
        """The device, the process group and the precision policy; refuses a model that cannot fit before anything
        takes minutes to build."""
        t = self.cfg.train
        self.device = resolve_device(t.device)
        self.dist = DistEnv.from_env(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if self.dist.world % t.expert_parallel:
            raise ConfigError(
                f"train.expert_parallel={t.expert_parallel}: must divide the number of processes "
                f"({self.dist.world}); launch with torchrun --nproc-per-node {t.expert_parallel} (or a multiple), "
                "or set it to 1"
            )
        self.policy = resolve_policy(t.precision, self.device)
        if self.device.type == "cpu" and t.cpu_malloc_cache:
            tune_cpu_malloc()
        check_fits(self.cfg, self.device, self.dist.world if t.parallel in ("auto", "fsdp") else 1)
        if self.device.type == "cpu":
            cpu_kernels.requested_isa()  # a bad MOE_ARCH_KERNEL_ISA is a one-line error now, not at the first step

    def _open_run_folder(self, resume: str | None) -> Path | None:
        """Lock the run folder and find the checkpoint to resume (None: a fresh start). The folder is this run's
        alone: locked for the run's lifetime, and never a fresh start over another run's checkpoints
        (checkpoint/layout.py). Checked before the data and the model take minutes."""
        t = self.cfg.train
        self.run_dir = Path(t.out_dir) / t.run_name
        self.ckpt_dir = ckpt.checkpoint_dir(self.run_dir)
        self._lock = RunLock(self.run_dir) if self.dist.is_main else None
        if self.dist.is_main:
            check_histories(self.run_dir)
        if resume == "latest" and not existing_checkpoints(self.run_dir):
            self._log(f"--resume latest: no checkpoint in {self.ckpt_dir} yet; starting a new run")
            resume = None
        if resume is None and self.dist.is_main:
            claim_for_fresh_start(self.run_dir, t.overwrite)
        return ckpt.resolve_resume(resume, self.run_dir, log=self._log) if resume else None

    def _build_data(self, tokenizer) -> TokenData:
        """Rank 0 tokenizes (and caches) first; the others read the cache."""
        cfg, t = self.cfg, self.cfg.train
        data = None
        if self.dist.is_main:
            data = prepare_data(
                cfg.data,
                cfg.model.vocab_size,
                log=self._log,
                tokenizer=tokenizer,
                progress=t.progress in ("auto", "rich"),
            )
        self.dist.barrier()
        if not self.dist.is_main:
            data = prepare_data(cfg.data, cfg.model.vocab_size, log=lambda *a: None, tokenizer=tokenizer)
        return data

    def _build_model(self, init_state: dict | None) -> None:
        """The model, in the precision policy's storage dtype, compiled and parallelised as configured;
        ``init_state``: the weights a fresh run starts from (train --init-from)."""
        cfg, t = self.cfg, self.cfg.train
        self.raw_model: HybridLM = build_model(cfg.model, seed=t.seed, device=self.device)
        if init_state is not None:
            with torch.no_grad(), _loading("--init-from", "model"):
                self.raw_model.load_state_dict(init_state, strict=True)
        self.raw_model.to(self.policy.param_dtype)
        self.raw_model.set_activation_checkpointing(t.activation_checkpointing)
        if t.compile:
            self.raw_model.compile_blocks()
        self.model = self._parallelize(self.raw_model)
        self.fsdp = is_fsdp(self.raw_model)
        self.roles = {n: r for n, _, r in named_parameter_roles(self.raw_model)}

    def _build_optimizers(self) -> None:
        self.plans = plan_parameters(self.raw_model, self.cfg.optim)
        self.optimizers = build_optimizers(self.raw_model, self.cfg.optim, self.plans)
        self.schedulers = build_schedulers(self.optimizers, self.cfg.train)
        self.compensator = (
            CompensatedUpdates(dict(self.raw_model.named_parameters())) if self.policy.compensated else None
        )

    def _build_monitor(self) -> Monitor | None:
        if not self.cfg.monitor.enabled:
            return None
        return Monitor(
            self.raw_model,
            self.optimizers,
            self.cfg.monitor,
            run_dir=self.run_dir,
            enabled_output=self.dist.is_main,
            start_step=self.step,
        )

    def _parallelize(self, model: HybridLM):
        mode = self.cfg.train.parallel
        if not self.dist.enabled or mode == "none":
            return model
        return parallelize(model, mode, self.policy, self.device, self.cfg.train.expert_parallel)

    def _checkpoint_tokenizer(self, path: Path):
        """The tokenizer stored in the checkpoint at ``path`` (read lazily: no tensor is loaded), after checking
        that data.tokenizer still is that tokenizer; None for checkpoints that carry none."""
        state = ckpt.read_meta(path)
        step = state.get("step") if isinstance(state, dict) else None
        if isinstance(step, int) and not isinstance(step, bool) and step > self.cfg.train.steps:
            # The loop would not run and final.pt would be rewritten at the checkpoint's step: a "finished" run
            # that trained nothing, and a history that claims the lower train.steps.
            raise ckpt.CheckpointError(
                f"{path} is at step {step}, past train.steps={self.cfg.train.steps}; raise "
                f"--train.steps above {step} to train on, or evaluate it with moe-arch eval"
            )
        saved_cfg = _field(path, state, "config", dict) if "config" in state else {}
        data_diffs = [d for d in ckpt.config_differences(saved_cfg, self.cfg.to_dict()) if d.startswith("data.")]
        if data_diffs and saved_cfg:  # the rest of the config is compared once the model exists
            raise ckpt.CheckpointError(
                f"cannot resume {path} with this config; these fields differ: "
                f"{'; '.join(data_diffs)}. Resume with the checkpoint's config or start a new "
                "run (--train.run_name)"
            )
        if not isinstance(state.get("tokenizer_json"), str):
            return None
        try:
            saved = TextTokenizer.from_checkpoint(state, str(path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exceptions for a malformed JSON
            raise ckpt.CheckpointError(
                f"{path}: 'tokenizer_json' is not a readable tokenizer "
                f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
            ) from None
        del state
        current = resolve_tokenizer(self.cfg.data)
        if current is not None and current.fingerprint() != saved.fingerprint():
            raise ckpt.CheckpointError(
                f"{path}: data.tokenizer={self.cfg.data.tokenizer!r} is not the tokenizer this checkpoint was trained "
                f"with ({tokenizer_difference(saved, current)}); restore the tokenizer it was trained with, or start "
                "a new run (--train.run_name)"
            )
        return saved

    def _resume(self, path: Path) -> None:
        def fp32_optimizers():  # compensated runs keep fp32 optimizer state: load it while the weights are fp32
            return self.compensator.fp32_view(with_grads=False) if self.compensator else nullcontext()

        state = ckpt.load(
            path,
            self.raw_model,
            self.optimizers,
            device=self.device,
            sharded=self.fsdp,
            check=lambda meta: self._check_resume_config(path, meta),
            optimizer_context=fp32_optimizers,
        )
        if self.compensator is not None:
            # fp32_view re-split the weights on exit; the checkpoint's buffers are the exact remainder.
            with _loading(path, "precision_state"):
                self.compensator.load_state_dict(state.get("precision_state", {}))
        schedulers = _field(path, state, "schedulers", dict)
        for name, sch in self.schedulers.items():
            with _loading(path, f"schedulers.{name}"):
                sch.load_state_dict(_field(path, schedulers, name, dict, f"schedulers.{name}"))
        with _loading(path, "data_state"):
            self.sampler.load_state_dict(_field(path, state, "data_state", dict))
        with _loading(path, "step"):
            self.step = int(_field(path, state, "step", int))
            self.tokens_seen = int(_field(path, state, "tokens_seen", int))
            # cumulative: max_nan_skips spans resumes; checkpoints written before the count was saved resume at 0
            if "nan_skips" in state:
                self.nan_skips = int(_field(path, state, "nan_skips", int))
        with _loading(path, "rng"):
            ckpt.set_rng_state(_field(path, state, "rng", dict))
        self.resumed_from = path
        self._log(f"resumed from {path} at step {self.step} ({human(self.tokens_seen)} tokens seen)")

    def _check_resume_config(self, path, state: dict) -> None:
        if "config" not in state:
            raise ckpt.CheckpointError(f"{path}: no moe_arch config in this checkpoint; it cannot be resumed")
        _field(path, state, "config", dict)
        diffs = ckpt.config_differences(state["config"], self.cfg.to_dict())
        if diffs:
            raise ckpt.CheckpointError(
                f"cannot resume {path} with this config; these fields differ: "
                f"{'; '.join(diffs)}. Resume with the checkpoint's config or start a new run "
                "(--train.run_name)"
            )

    # ------------------------------------------------------------------------------------------ checkpoints
    def _meta(self, kind: str) -> dict:
        """Everything in a checkpoint except the weights and optimizer state."""
        return {
            "kind": kind,
            "step": self.step,
            "epoch": self.sampler.epoch,
            "tokens_seen": self.tokens_seen,
            "nan_skips": self.nan_skips,  # batches nan_policy: skip dropped: the doctor's skipped_steps reads them
            "data_state": self.sampler.state_dict(),
            "rng": ckpt.rng_state(),
            "config": self.cfg.to_dict(),
            "precision": self.policy.name,
            "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
            "param_roles": dict(self.roles),
            "buffers": [n for n, _ in self.raw_model.named_buffers()],
            **self._tokenizer_entries,
            "world_size": self.dist.world,
        }

    def save(self, kind: str, name: str | None = None) -> Path | None:
        """A checkpoint named ``name`` (default ``step_NNNNNNN``): one ``.pt`` file, or under FSDP2 a distributed
        checkpoint folder written by every rank."""
        name = name or ckpt.step_name(self.step)
        path = ckpt.save(
            self.ckpt_dir,
            name,
            self.raw_model,
            self.optimizers,
            self._meta(kind),
            sharded=self.fsdp,
            writer=self.dist.is_main,
            extra=lambda: {"precision_state": self.compensator.state_dict() if self.compensator else {}},
        )
        if self.dist.is_main:
            ckpt.write_latest(self.ckpt_dir, path.name)
            if kind == "periodic":
                ckpt.prune(self.ckpt_dir, self.cfg.train.keep_last, self.step)
        self.dist.barrier()
        return path

    # ------------------------------------------------------------------------------------------ one step
    def _micro_batch(self):
        T = self.cfg.train.seq_len
        batch = self.sampler.batch(self.dist.rank, self.dist.world).to(self.device, non_blocking=True)
        return batch[:, :T], batch[:, 1:]

    def train_step(self) -> dict:
        t = self.cfg.train
        self.model.train()
        acc = {"loss": 0.0, "lm_loss": 0.0, "mtp_loss": 0.0}
        aux_sums: dict[str, float] = {}
        loads: dict[int, torch.Tensor] = {}
        mod_frac: dict[int, float] = {}
        mod_w: dict[int, tuple[float, float]] = {}
        skipped = False
        for micro in range(t.grad_accum):
            inp, tgt = self._micro_batch()
            self.tokens_seen += inp.numel() * self.dist.world
            with self.policy.autocast(self.device):
                out = self.model(inp, tgt)
            bad = torch.tensor([0.0 if torch.isfinite(out.loss.detach()) else 1.0], device=self.device)
            if self.dist.all_reduce_max(bad).item() > 0:  # every rank takes the same branch
                skipped = self._non_finite(out.loss.item(), micro, inp, tgt)
                break
            (out.loss / t.grad_accum).backward()
            acc["loss"] += out.loss.item() / t.grad_accum
            acc["lm_loss"] += out.lm_loss.item() / t.grad_accum
            if out.mtp_losses:
                acc["mtp_loss"] += torch.stack(out.mtp_losses).mean().item() / t.grad_accum
            for k, v in out.aux_losses.items():
                aux_sums[k] = aux_sums.get(k, 0.0) + v.item() / t.grad_accum
            for i, load in out.aux.moe_load.items():
                loads[i] = loads.get(i, 0) + load
            for i, f in out.aux.mod_frac.items():
                mod_frac[i] = mod_frac.get(i, 0.0) + f.item() / t.grad_accum
            for i, (m, s) in out.aux.mod_weight.items():
                mod_w[i] = (m.item(), s.item())
        if skipped:
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
            return {"skipped": True}

        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        group_norms = {
            name: float(global_grad_norm([p for g in opt.param_groups for p in g["params"]]))
            for name, opt in self.optimizers.items()
        }
        # Every parameter is in exactly one optimizer: the global norm follows from the per-optimizer norms.
        total = clip_grads_(params, t.grad_clip, math.sqrt(sum(v * v for v in group_norms.values())))
        if not math.isfinite(total):
            if self._non_finite(total, None, None, None, what="gradient norm"):
                for opt in self.optimizers.values():
                    opt.zero_grad(set_to_none=True)
                return {"skipped": True}

        ctx = self.compensator.fp32_view() if self.compensator else nullcontext()
        with ctx:
            for opt in self.optimizers.values():
                opt.step()
        for sch in self.schedulers.values():
            sch.step()
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        if loads:
            for i in loads:
                self.dist.all_reduce_sum(loads[i])
            self.raw_model.update_router_biases(loads)
        if self.dist.enabled:  # losses, aux terms and MoD fractions averaged over ranks (one small all-reduce)
            flat = {**acc, **aux_sums, **{f"mod_frac/{i}": v for i, v in mod_frac.items()}}
            keys = sorted(flat)
            vec = torch.tensor([flat[k] for k in keys], dtype=torch.float64, device=self.device)
            vec = self.dist.all_reduce_sum(vec) / self.dist.world
            merged = dict(zip(keys, vec.tolist()))
            acc = {k: merged[k] for k in acc}
            aux_sums = {k: merged[k] for k in aux_sums}
            mod_frac = {i: merged[f"mod_frac/{i}"] for i in mod_frac}
        self.step += 1
        return {
            **acc,
            **aux_sums,
            "grad_norm": total,
            "clipped": t.grad_clip > 0 and total > t.grad_clip,
            "group_grad_norms": group_norms,
            "moe_load": {i: l.detach().float().cpu() for i, l in loads.items()},
            "mod_frac": mod_frac,
            "mod_weight": mod_w,
            "skipped": False,
        }

    def _nonfinite_state(self) -> list[str]:
        """Names of the weights and optimizer-state tensors holding NaN/inf (then no batch can be trained)."""
        bad = [n for n, p in self.raw_model.named_parameters() if not bool(torch.isfinite(p.detach()).all())]
        names = {id(p): n for n, p in self.raw_model.named_parameters()}
        for opt_name, opt in self.optimizers.items():
            for p, st in opt.state.items():
                for k, v in st.items():
                    if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                        bad.append(f"{opt_name} {k} of {names.get(id(p), '?')}")
        return bad

    def _non_finite(self, value: float, micro: int | None, inp, tgt, what: str = "loss") -> bool:
        """Stop (with the module where the non-finite value first appeared) or skip the batch, per policy."""
        t = self.cfg.train
        where = ""
        if inp is not None:
            with self.policy.autocast(self.device):  # every rank runs it (FSDP forwards are collective)
                module = first_nonfinite_module(self.raw_model, inp, tgt)
            if self.dist.enabled:
                found = [None] * self.dist.world
                dist.all_gather_object(found, (value, module))
                value, module = next(((v, m) for v, m in found if m is not None), (value, module))
            where = f"; first non-finite output in module {module!r}" if module else ""
        batch = (
            f"micro-batch {micro + 1} of {t.grad_accum}"
            if micro is not None
            else f"after the backward of all {t.grad_accum} micro-batch{'es' if t.grad_accum > 1 else ''}"
        )
        msg = f"step {self.step + 1}: {what} is {value} ({batch}){where}"
        broken = self._nonfinite_state()
        if broken:  # skipping cannot help: every later batch starts from the same non-finite state
            shown = ", ".join(broken[:5]) + (f" and {len(broken) - 5} more" if len(broken) > 5 else "")
            raise NonFiniteLossError(
                f"{msg}; the model's state is already non-finite ({len(broken)} tensors: "
                f"{shown}), so skipping batches cannot recover; stopping. Resume an earlier "
                f"checkpoint from {self.ckpt_dir} with a lower learning rate"
            )
        if t.nan_policy == "skip" and self.nan_skips < t.max_nan_skips:
            self.nan_skips += 1
            self.ui.print(f"[yellow]warning:[/] {msg}; skipping this batch ({self.nan_skips}/{t.max_nan_skips} skips)")
            return True
        hint = (
            "train.nan_policy=skip allows skipping bad batches"
            if t.nan_policy == "stop"
            else f"already skipped {self.nan_skips} batches (train.max_nan_skips)"
        )
        raise NonFiniteLossError(
            f"{msg}; stopping ({hint}). Lower the learning rate or check the data; the last "
            f"checkpoint is in {self.ckpt_dir}"
        )

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, max_tokens: int | None = None) -> tuple[float, int]:
        """Mean next-token loss on the validation split (non-overlapping windows, every token once).

        Windows are taken in global batches of batch_size x world; every rank runs one forward per global batch
        (a dummy one when its slice is empty) so FSDP's collective forwards stay in lockstep."""
        t = self.cfg.train
        max_tokens = t.eval_max_tokens if max_tokens is None else max_tokens
        model = self.model
        was_training = model.training
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        windows = list(eval_windows(self.data.val, t.seq_len, max_tokens))
        for gb in eval_batches(windows, t.seq_len, t.batch_size * self.dist.world):
            mine = (
                gb[self.dist.rank * t.batch_size : (self.dist.rank + 1) * t.batch_size]
                if len(gb) > 1
                else (gb if self.dist.rank == 0 else [])
            )
            dummy = not mine
            if dummy:
                mine = [gb[0]]
            inp = torch.stack([w[0] for w in mine]).to(self.device)
            tgt = torch.stack([w[1] for w in mine]).to(self.device)
            with self.policy.autocast(self.device):
                logits = model(inp, return_logits=True, mtp=False).logits
            if not dummy:
                total[0] += F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum"
                ).double()
                total[1] += tgt.numel()
        self.dist.all_reduce_sum(total)
        model.train(was_training)
        n = int(total[1].item())
        return (float(total[0].item()) / max(n, 1)), n

    @torch.no_grad()
    def sample(self, prompt: str, max_new_tokens: int, temperature: float = 0.8, top_k: int = 50) -> str | None:
        """Generate on rank 0 (under FSDP2 every rank must call it: the weights are gathered to rank 0 first)."""
        model = self.raw_model
        if self.fsdp:
            sd = ckpt.full_model_state(self.raw_model)
            if not self.dist.is_main:
                return None
            model, _, _ = materialize(self.cfg.model, sd, "cpu")
        elif not self.dist.is_main:
            return None
        tok = self.data.tokenizer
        dev = next(model.parameters()).device
        ids = torch.tensor([tok.encode(prompt) or [tok.eos_id]], device=dev)
        gen = torch.Generator(device=dev).manual_seed(self.cfg.train.seed)
        model.eval()
        room = max(0, min(max_new_tokens, self.cfg.model.max_seq_len - ids.shape[1]))
        out = model.generate(ids, room, temperature=temperature, top_k=top_k, generator=gen)
        model.train()
        return tok.decode(out[0].tolist())

    def close(self) -> None:
        """Release the run folder's lock and the process group in order: every rank done, the DDP wrapper (and
        its reducer thread) gone first, then the group destroyed. Tearing down in another order aborts a rank at
        exit."""
        if self._lock is not None:
            self._lock.release()
        if not self.dist.enabled:
            return
        self.dist.barrier()
        if self.monitor is not None:
            self.monitor.close()
        self.model = self.raw_model
        gc.collect()
        self.dist.close()

    # ------------------------------------------------------------------------------------------ the run
    def request_stop(self) -> None:
        """Stop after the current step and save ``checkpoint_interrupted.pt`` (what SIGINT/SIGTERM do)."""
        if self._stop_signal is None:
            self._stop_signal = 0

    def _stop_requested(self) -> bool:
        """Whether any rank was asked to stop: all ranks agree, so they stop after the same step."""
        if not self.dist.enabled:
            return self._stop_signal is not None
        flag = torch.tensor([-1 if self._stop_signal is None else self._stop_signal], device=self.device)
        self.dist.all_reduce_max(flag)
        if flag.item() >= 0 and self._stop_signal is None:
            self._stop_signal = int(flag.item())
        return self._stop_signal is not None

    def _install_signals(self):
        if threading.current_thread() is not threading.main_thread():
            return {}
        old = {}

        def handler(signum, frame):
            if self._stop_signal is not None:  # second signal: stop now
                signal.signal(signum, old.get(signum, signal.SIG_DFL))
                raise KeyboardInterrupt
            self._stop_signal = signum
            if self.step >= self.cfg.train.steps:  # the last step is done: final.pt is being written
                self.ui.print(
                    f"[yellow]received {signal.Signals(signum).name}: training is complete (step "
                    f"{self.step}); finishing the final save[/] (send again to stop immediately)"
                )
                return
            self.ui.print(
                f"[yellow]received {signal.Signals(signum).name}: finishing step {self.step + 1}, then "
                "saving checkpoint_interrupted.pt[/] (send again to stop immediately)"
            )

        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, handler)
        return old

    def run(self) -> RunResult:
        """Train to ``train.steps`` (or a stop signal), then evaluate; the run folder is released at the end."""
        try:
            return self._run()
        finally:
            if self._lock is not None:
                self._lock.release()

    def _run(self) -> RunResult:
        cfg, t = self.cfg, self.cfg.train
        main = self.dist.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        counts = count_parameters(self.raw_model)
        fpt = flops_per_token(cfg.model, t.seq_len, self.raw_model)["train_flops_per_token"]
        peak = t.peak_flops or measure_matmul_peak(self.device, torch.float32 if self.device.type == "cpu" else None)
        peak *= self.dist.world
        peak_rechecked = False
        unigram = unigram_cross_entropy(self.data.train, self.data.val, cfg.model.vocab_size)
        self._log(
            f"model: {human(counts['total'])} parameters ({human(counts['active'])} active), "
            f"{counts['n_norms']} RMSNorm weights | precision {self.policy.name} on {self.device} "
            f"x{self.dist.world} | optimizers: "
            + ", ".join(
                f"{n} ({sum(len(g['params']) for g in o.param_groups)} tensors)" for n, o in self.optimizers.items()
            )
        )
        frozen = preflight(self.raw_model, self.optimizers)
        if frozen:
            self._log(
                f"precision preflight: {len(frozen)} tensors cannot move under {self.policy.name} "
                f"(expected update < half a ULP for most elements):"
            )
            for f in frozen[:60]:
                self._log(
                    f"  {f.name:<40} {f.dtype:<9} {f.optimizer:<11} update ~{f.expected_update:.1e} < half-ULP "
                    f"{f.half_ulp:.1e} at |w|~{f.median_abs:.3g} ({f.fraction_lost:.0%} of elements)"
                )
            if self.policy.name == "bf16-pure":
                self._log(
                    "  training anyway (bf16-pure reproduces this on purpose); use --train.precision "
                    "bf16-mixed or bf16-compensated to train these tensors"
                )
        # Resumed at its last step (a finished run started again), the final validation runs again: its earlier
        # rows at this step are replaced, not doubled.
        logger = MetricsLogger(
            self.run_dir,
            t.tensorboard,
            t.wandb,
            t.wandb_project,
            cfg.to_dict(),
            enabled=main,
            start_step=self.step,
            log=self._log,
            redone_evals=self.resumed_from is not None and self.step >= t.steps,
        )
        if self.monitor is not None:
            self.monitor.attach(logger, self)
        if self.resumed_from is None and t.save_step0 and self.step == 0:
            self.last_checkpoint = self.save("init", "step_0000000")
        self.ui = ConsoleUI(t.progress, t.steps, self.step, enabled=main)
        old_handlers = self._install_signals()
        interval = {"loss": [], "lm_loss": [], "mtp_loss": [], "clipped": 0, "steps": 0, "tokens": 0, "t0": time.time()}
        val_loss = None
        try:
            self.phase = "training"
            while self.step < t.steps:
                tokens_before = self.tokens_seen
                stats = self.train_step()
                if stats.get("skipped"):
                    continue
                interval["steps"] += 1
                interval["tokens"] += self.tokens_seen - tokens_before
                for k in ("loss", "lm_loss", "mtp_loss"):
                    interval[k].append(stats[k])
                interval["clipped"] += int(stats["clipped"])
                if self.monitor is not None:
                    self.monitor.after_step(self.step, stats)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    if not t.peak_flops and not peak_rechecked:
                        # Contention only ever lowers a measured peak (at start-up, tokenizer or loader threads
                        # may still hold a core): measure once more after the first steps and keep the larger.
                        measured_at = time.time()
                        peak = max(
                            peak,
                            self.dist.world
                            * measure_matmul_peak(self.device, torch.float32 if self.device.type == "cpu" else None),
                        )
                        interval["t0"] += time.time() - measured_at  # not training time
                        peak_rechecked = True
                    self._log_interval(logger, interval, stats, fpt, peak)
                paused = time.time()  # evaluation and checkpoints are not training throughput
                if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
                    val_loss, n = self.evaluate()
                    logger.log(
                        self.step, {"val_loss": val_loss, "val_ppl": math.exp(val_loss), "val_tokens": n}, "eval"
                    )
                    self.ui.print(
                        f"step {self.step}: validation loss {val_loss:.4f} (ppl {math.exp(val_loss):.1f}, "
                        f"unigram baseline {unigram:.4f})"
                    )
                if t.ckpt_every and self.step % t.ckpt_every == 0 and self.step < t.steps:
                    self.last_checkpoint = self.save("periodic") or self.last_checkpoint
                interval["t0"] += time.time() - paused
                if self._stop_requested():
                    self.last_checkpoint = self.save("interrupted", "checkpoint_interrupted")
                    self.ui.close()
                    self._log(
                        f"interrupted at step {self.step}: saved {self.last_checkpoint}; resume with "
                        f"`moe-arch train ... --resume {self.last_checkpoint}`"
                    )
                    self.dist.barrier()
                    logger.close()
                    return RunResult(
                        self.step,
                        self.tokens_seen,
                        None,
                        None,
                        unigram,
                        None,
                        self.run_dir,
                        interrupted=self._stop_signal,
                        last_checkpoint=self.last_checkpoint,
                    )
            self.last_checkpoint = self.save("final", "final") or self.last_checkpoint
            self.phase = "the final validation"
        finally:
            self.ui.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        val_loss, n = self.evaluate()
        logger.log(
            self.step,
            {"val_loss": val_loss, "val_ppl": math.exp(val_loss), "val_tokens": n, "unigram_loss": unigram},
            "eval",
        )
        text = None
        if t.sample_tokens > 0:
            text = self.sample(t.sample_prompt, t.sample_tokens)
            if text is not None:
                logger.log_text(self.step, "sample", text)
        logger.close()
        self._log(
            f"validation: loss {val_loss:.4f}, perplexity {math.exp(val_loss):.2f} on {n:,} tokens "
            f"(unigram baseline: loss {unigram:.4f}, perplexity {math.exp(unigram):.1f})"
        )
        if text is not None:
            self._log(f"sample: {text!r}")
        if main and self.last_checkpoint is not None:
            self._log(f"checkpoints: {self.ckpt_dir} (final: {self.last_checkpoint.name}); metrics: {logger.path}")
        return RunResult(
            self.step,
            self.tokens_seen,
            val_loss,
            math.exp(val_loss),
            unigram,
            text,
            self.run_dir,
            last_checkpoint=self.last_checkpoint,
        )

    def _log_interval(self, logger: MetricsLogger, interval: dict, stats: dict, fpt: float, peak: float) -> None:
        t = self.cfg.train
        elapsed = max(time.time() - interval["t0"], 1e-9)
        tok_s = interval["tokens"] / elapsed
        n = max(interval["steps"], 1)
        m = {
            "loss": float(np.mean(interval["loss"])),
            "lm_loss": float(np.mean(interval["lm_loss"])),
            "tokens_seen": self.tokens_seen,
            "epoch": self.sampler.epoch,
            "tokens_per_s": tok_s,
            "mfu": fpt * tok_s / peak,
            "grad_norm": stats["grad_norm"],
            "clip_rate": interval["clipped"] / n,
            "step_time_s": elapsed / n,
        }
        if self.cfg.model.n_predict > 1:
            m["mtp_loss"] = float(np.mean(interval["mtp_loss"]))
        for k in ("moe_load_balance", "moe_z_loss", "mod_router"):
            if k in stats:
                m[f"aux_{k}"] = stats[k]
        for name, opt in self.optimizers.items():
            for gi, g in enumerate(opt.param_groups):
                m[f"lr_{name}" + (f"_{gi}" if len(opt.param_groups) > 1 else "")] = g["lr"]
        for k, v in stats["group_grad_norms"].items():
            m[f"grad_norm_{k}"] = v
        for i, load in stats["moe_load"].items():
            frac = load / load.sum().clamp_min(1)
            m[f"moe_max_over_mean_L{i}"] = float(frac.max() * len(frac))
            m[f"moe_load_L{i}"] = [round(float(x), 4) for x in frac]
        for i, f in stats["mod_frac"].items():
            m[f"mod_selected_L{i}"] = f
        for i, (wm, ws) in stats["mod_weight"].items():
            m[f"mod_weight_mean_L{i}"] = wm
            m[f"mod_weight_std_L{i}"] = ws
        logger.log(self.step, m)
        status = f"loss {m['lm_loss']:.3f} | {human(tok_s)} tok/s | MFU {m['mfu']:.1%}"
        line = (
            f"step {self.step}/{t.steps} | loss {m['loss']:.4f} (lm {m['lm_loss']:.4f}) | "
            f"lr {self.optimizers[next(iter(self.optimizers))].param_groups[0]['lr']:.2e} | "
            f"grad {stats['grad_norm']:.2f} | {human(tok_s)} tok/s | MFU {m['mfu']:.1%}"
        )
        self.ui.update(self.step, status, line)
        interval.update(
            {"loss": [], "lm_loss": [], "mtp_loss": [], "clipped": 0, "steps": 0, "tokens": 0, "t0": time.time()}
        )
