"""One diagnosis, from a path to a :class:`~moe_arch.doctor.report.Diagnosis`: locate, read, analyse, decide.

:func:`locate` resolves what a path means once (the checkpoint of a run folder or another stack's output folder,
the run's history); :func:`diagnose` reads the checkpoint and its reference, builds the per-tensor evidence, runs
the registered causes (:mod:`moe_arch.doctor.causes`), corroborates them with the model-aware probe, and joins the
run's history. ``moe-arch diagnose``, ``reproduce-seed`` and the benches call it; writing the reports is
:func:`moe_arch.doctor.report.publish`.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from rich.progress import Progress

from moe_arch.checkpoint import initial_checkpoint
from moe_arch.checkpoint.readers import CheckpointView, LoadError, open_checkpoint, resolve_checkpoint_path
from moe_arch.config import Config, ConfigError, load_config
from moe_arch.doctor.analyze import TensorEvidence, analyze_tensors
from moe_arch.doctor.causes import REGISTRY, CheckpointCause, CurveCause, Finding
from moe_arch.doctor.curves import curve_findings
from moe_arch.doctor.engine import diagnose as diagnose_evidence
from moe_arch.doctor.engine import status_of
from moe_arch.doctor.history import HistoryError, find_history, read_history
from moe_arch.doctor.optim_map import OptimizerSummary, map_optimizers
from moe_arch.doctor.probe import run_probe
from moe_arch.doctor.report import Diagnosis
from moe_arch.doctor.stacks import OPTIMIZER_FILE, REFERENCE_FILE, detect_stacks, first_for, rounding_unknown
from moe_arch.model.params import count_parameters
from moe_arch.model.transformer import HybridLM


@dataclass(frozen=True)
class DiagnoseOptions:
    against: str | None = None  # the reference checkpoint (default: the run's initial checkpoint, when ours)
    model_config: str | None = None  # a config name or file: the model for parameter counts and the probe
    probe: bool = True  # run one real batch through the model when its config is known
    trust_pickle: bool = False  # allow arbitrary pickles (torch.load without weights_only)
    progress: bool = False  # a progress bar on a terminal
    logs: str | None = None  # the run's history (default: the one found in a run folder)


@dataclass(frozen=True)
class Target:
    """What a diagnosis reads, located once: ``source`` as given, the ``checkpoint`` it means (None: a folder
    that holds only a run's history), and that ``history`` (``--logs``, or the one found in the folder)."""

    source: Path
    checkpoint: Path | None
    history: Path | None

    @property
    def path(self) -> Path:
        """The checkpoint, or the folder when there is none: the reports go next to it."""
        return self.checkpoint or self.source


def locate(path: str | Path, logs: str | None = None) -> Target:
    """Resolve ``path`` (a checkpoint, a run folder, another stack's output folder) and find the run's history. A
    folder with a history but no checkpoint is diagnosed from its history; anything else unusable is a
    LoadError."""
    source = Path(path)
    found = find_history(source) if source.is_dir() else None
    try:
        checkpoint = resolve_checkpoint_path(source)
    except LoadError:
        if found is None:
            raise
        checkpoint = None
    return Target(source, checkpoint, Path(logs) if logs else found)


def diagnose(path: str | Path | Target, options: DiagnoseOptions | None = None) -> Diagnosis:
    """The diagnosis of a checkpoint, or of a run folder (its newest checkpoint and its history), or of a run's
    history alone when its folder holds no checkpoint (or only one that cannot be read). ``path`` may be a
    :class:`Target` the caller located already (the CLI does, to check its output folders first)."""
    opts = options or DiagnoseOptions()
    if opts.logs and not Path(opts.logs).exists():
        raise LoadError(f"{opts.logs}: no such file or folder (--logs)")
    target = path if isinstance(path, Target) else locate(path, opts.logs)
    view = None
    if target.checkpoint is not None:
        try:
            view = open_checkpoint(target.checkpoint, opts.trust_pickle)
        except LoadError:
            if target.history is None or not target.source.is_dir():
                raise
    if view is None:
        return _with_history(_history_only(target.source), target.history, None)
    d = _analyse(view, opts)
    d = _with_history(d, target.history, view) if target.history is not None else d
    _stack_fixes(d, detect_stacks(view))
    return d


def _stack_fixes(d: Diagnosis, stacks: tuple[str, ...]) -> None:
    """Each finding's fix in the words of the stack that wrote the checkpoint (a cause's ``fixes``)."""
    for f in d.findings:
        c = REGISTRY.get(f.cause)
        if c is not None:
            f.recommendation = c.fix_for(stacks, f.recommendation)


def default_reference(view: CheckpointView) -> Path | None:
    """Our run's step-0 checkpoint (the true initialisation) next to the checkpoint, if it exists."""
    if view.format not in ("moe_arch", "moe_arch-dcp"):
        return None
    return initial_checkpoint(view.path)


def _history_only(folder: Path) -> Diagnosis:
    checkpoint = {
        "path": str(folder),
        "format": "none (history only)",
        "step": None,
        "epoch": None,
        "tokens_seen": None,
        "reference": None,
        "n_tensors": 0,
        "n_parameters": 0,
        "dtypes": {},
        "precision": None,
        "config": None,
        "optimizer_steps": None,
    }
    missing = [
        "no checkpoint in the folder: only the run's history was read, so frozen tensors, precision and "
        "optimizer problems cannot be ruled out; diagnose a checkpoint of the run (or pass the folder that "
        "holds one)"
    ]
    return Diagnosis("inconclusive", checkpoint, [], [], [], None, [], missing)


# ---------------------------------------------------------------------------------------------- history
def _run_config(view: CheckpointView | None, history: Path) -> dict:
    """What the curve rules use from the run's config: vocabulary, experts, MoD capacity, clip threshold."""
    cfg = view.meta.get("config") if view is not None and isinstance(view.meta.get("config"), dict) else None
    if cfg is None:
        for folder in (history.parent, history.parent.parent):
            if (folder / "config.yaml").is_file():
                try:
                    cfg = yaml.safe_load((folder / "config.yaml").read_text())
                except (yaml.YAMLError, UnicodeDecodeError):
                    cfg = None
                break
    out: dict = {}
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        m, t = cfg["model"], cfg.get("train") or {}
        out = {
            "vocab_size": m.get("vocab_size"),
            "n_experts": m.get("n_experts") if m.get("moe_layers") else None,
            "mod_capacity": m.get("mod_capacity") if m.get("mod_layers") else None,
            "grad_clip": t.get("grad_clip") or None,
        }
    hf = view.meta.get("hf_config") if view is not None else None
    if isinstance(hf, dict):
        out["vocab_size"] = hf.get("vocab_size")
        out["n_experts"] = hf.get("num_local_experts") or hf.get("num_experts")
    if history.name == "trainer_state.json" and (history.parent / "config.json").is_file() and "vocab_size" not in out:
        try:
            out["vocab_size"] = json.loads((history.parent / "config.json").read_text()).get("vocab_size")
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    if "vocab_size" not in out and view is not None:  # the input embedding's rows are the vocabulary
        emb = [
            t
            for n, t in view.tensors.items()
            if len(t.shape) == 2
            and re.search(r"(^|\.)(embed|embed_tokens|wte|tok_embeddings|word_embeddings)(\.weight)?$", n)
        ]
        if len(emb) == 1:
            out["vocab_size"] = emb[0].shape[0]
    return {k: v for k, v in out.items() if v}


def _with_history(d: Diagnosis, history: Path, view: CheckpointView | None) -> Diagnosis:
    """Add the run's history: its curve findings join the checkpoint's, and findings that explain each other are
    linked (tensors that never trained + a loss that does not fall)."""
    try:
        h = read_history(history)
    except HistoryError as e:
        raise LoadError(str(e)) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LoadError(
            f"{history}: unreadable history ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"
        ) from None
    cfg = _run_config(view, history)
    found = curve_findings(h, **cfg)
    if "vocab_size" not in cfg:
        d.notes.append(
            "vocabulary size unknown (no config with it, no input embedding in a checkpoint): the "
            "loss-at-ln(vocab) check was skipped"
        )
    weights = [f for f in d.findings if isinstance(c := REGISTRY.get(f.cause), CheckpointCause) and c.never_trained]
    for f in found:
        if isinstance(c := REGISTRY.get(f.cause), CurveCause) and c.flat_loss and weights:
            f.evidence["related"] = [w.cause for w in weights]
            f.summary += f" (see {', '.join(sorted({w.cause for w in weights}))}: tensors that never trained)"
            for w in weights:
                w.evidence.setdefault("related", []).append(f.cause)
    d.findings = sorted(d.findings + found, key=lambda f: f.severity != "critical")
    d.history = h
    d.notes.append(
        f"history: {h.format} from {history} ({', '.join(h.found()[:12]) or 'no series'}"
        + (f"; not mapped: {', '.join(h.unmapped[:8])}" if h.unmapped else "")
        + ")"
    )
    if not h.found():
        d.notes.append("the history holds no series this doctor reads (loss, lr, grad norm, ...)")
    if d.checkpoint["format"].startswith("none"):
        d.status = status_of(d.findings, d.inconclusive)
    else:
        d.status = status_of(d.findings, d.inconclusive, d.status == "untrained")
    return d


# ---------------------------------------------------------------------------------------------- checkpoint
def _evidence(view: CheckpointView, ref: CheckpointView | None, slots, kinds, progress: bool) -> list[TensorEvidence]:
    """The per-tensor evidence, with a progress bar over the elements when asked and stderr is a terminal."""
    if not (progress and sys.stderr.isatty()):
        return analyze_tensors(view, ref, slots, kinds, None)
    bar = Progress(transient=True)
    bar.start()
    task = bar.add_task("analysing tensors", total=sum(t.numel for t in view.tensors.values()))
    try:
        return analyze_tensors(view, ref, slots, kinds, lambda n: bar.advance(task, n))
    finally:
        bar.stop()


def _analyse(view: CheckpointView, opts: DiagnoseOptions) -> Diagnosis:
    ref_path = Path(opts.against) if opts.against else default_reference(view)
    ref = open_checkpoint(ref_path, opts.trust_pickle) if ref_path else None
    notes = list(view.notes)
    if ref is None:
        notes.append(
            "no reference checkpoint: change-based evidence (unchanged tensors, relative change, dead experts "
            "by change) is unavailable. Pass --against with the run's initial or an earlier checkpoint; an "
            "unseeded fresh initialisation is never used as a reference"
        )
    else:
        missing = [n for n in view.tensors if n not in ref.tensors]
        if missing:
            notes.append(f"{len(missing)} tensors are not in the reference (no change measured): {missing[:4]}")
    slots, summaries = map_optimizers(view)
    kinds = {s.name: s.kind for s in summaries}
    total = sum(t.numel for t in view.tensors.values())
    evidence = _evidence(view, ref, slots, kinds, opts.progress)
    steps = _optimizer_steps(view, evidence, notes)
    identical = ref is not None and _same_state(view, ref, evidence)
    findings = diagnose_evidence(
        evidence, summaries, bool(view.optimizers), str(ref_path) if ref_path else None, steps, identical, view=view
    )
    untrained = steps == 0
    if untrained:
        notes.insert(
            0,
            "nothing trained yet: the checkpoint records 0 optimizer steps (a run's initial checkpoint); "
            "there is nothing to diagnose",
        )
        findings = [f for f in findings if REGISTRY[f.cause].before_training]
    stacks = detect_stacks(view)
    inconclusive = [] if untrained else _missing_evidence(view, ref, evidence, summaries, identical, stacks)
    unknown = rounding_unknown(view)
    if unknown and ref is None and any(e.low_precision for e in evidence):
        notes.append(unknown)
    kept = sorted({e.subulp_kept for e in evidence if e.subulp_kept})
    if kept:
        notes.append(
            f"low-precision weights whose optimizer keeps updates below half a ULP ({'; '.join(kept)}): the "
            "rounding rule does not apply to them"
        )
    checkpoint = {
        "path": str(view.path),
        "format": view.format,
        "step": _plain(view.meta.get("step")),
        "epoch": _plain(view.meta.get("epoch")),
        "tokens_seen": _plain(view.meta.get("tokens_seen")),
        "reference": str(ref_path) if ref_path else None,
        "n_tensors": len(view.tensors),
        "n_parameters": total,
        "dtypes": dict(Counter(str(t.dtype).replace("torch.", "") for t in view.tensors.values())),
        "precision": view.meta.get("precision"),
        "config": view.meta.get("config"),
        "stack": list(stacks),
    }
    probe_res = None
    cfg = _model_config(view, opts.model_config, notes)
    if cfg is not None:
        with torch.device("meta"):
            counts = count_parameters(HybridLM(cfg.model))
        checkpoint["params_total"], checkpoint["params_active"] = counts["total"], counts["active"]
        m = cfg.model
        checkpoint["config_summary"] = (
            f"d_model {m.d_model}, {m.n_layers} layers, {m.n_experts} experts "
            f"top-{m.top_k}, Mamba layers {m.mamba_layers}, MoD {m.mod_capacity}, "
            f"{m.n_predict} heads"
        )
        if opts.probe:
            try:
                probe_res = run_probe(view, cfg).to_dict()
            except Exception as e:  # the probe is corroboration; its failure must not hide the findings
                notes.append(
                    f"model-aware probe failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                )
    summaries_json = [
        {
            "name": s.name,
            "kind": s.kind,
            "mapping": s.method,
            "n_params": s.n_params,
            "n_mapped": s.n_mapped,
            "n_with_state": s.n_with_state,
            "groups": [{k: _plain(v) for k, v in g.items()} for g in s.groups],
            "ambiguous": s.ambiguous,
            "unmatched": s.unmatched,
        }
        for s in summaries
    ]
    for s in summaries:
        if s.method == "unmapped":
            notes.append(
                f"optimizer {s.name!r}: its parameters could not be matched to the model's tensors by shape "
                "and order (was it saved for another model?); optimizer-based analyses skip it"
            )
    if probe_res:
        _corroborate(findings, probe_res)
    checkpoint["optimizer_steps"] = steps
    return Diagnosis(
        status_of(findings, inconclusive, untrained),
        checkpoint,
        findings,
        summaries_json,
        evidence,
        probe_res,
        notes,
        inconclusive,
    )


ACCUMULATION_KEYS = (
    "gradient_accumulation_steps",
    "grad_accum",
    "accumulate_grad_batches",
    "grad_accum_steps",
    "gradient_accumulation_iters",
    "accum_steps",
)


def _accumulation(config) -> int | None:
    """Gradient accumulation from a checkpoint's saved config (any nesting), when it names it."""
    if isinstance(config, dict):
        for k, v in config.items():
            if k in ACCUMULATION_KEYS and isinstance(v, int) and not isinstance(v, bool) and v >= 1:
                return v
            found = _accumulation(v)
            if found:
                return found
    return None


def _optimizer_steps(view: CheckpointView, evidence, notes: list[str] | None = None) -> int | None:
    """Optimizer steps the checkpoint records (None when nothing says).

    Its step counter is used unless the optimizer state's own step count (Adam's per-parameter ``step``, which
    counts optimizer steps and nothing else) disagrees: a counter of micro-steps (forward/backward passes) is
    ``accumulation`` times larger. Then the state's count is the answer, and a note says what the counter was."""
    notes = notes if notes is not None else []
    counts = [e.state_step for e in evidence if e.state_step is not None]
    opt_steps = int(max(counts)) if counts else None
    step = view.meta.get("step")
    try:
        counter = int(step) if step is not None else None
    except (TypeError, ValueError):
        counter = None
    accum = _accumulation(view.meta.get("config"))
    if counter is None:
        return opt_steps
    if opt_steps is None or opt_steps == counter:
        if accum and accum > 1 and opt_steps is None:
            notes.append(
                f"the checkpoint's step counter is {counter} and its config sets gradient accumulation "
                f"{accum}: if the counter counts micro-steps, that is {counter // accum} optimizer steps (the "
                "optimizer state has no step count to tell)"
            )
        return counter
    if accum and accum > 1 and counter // accum == opt_steps:
        notes.append(
            f"the checkpoint's step counter ({counter}) counts micro-steps: with gradient accumulation "
            f"{accum} that is {opt_steps} optimizer steps, as the optimizer state's own step count says; "
            "steps here are optimizer steps"
        )
    else:
        notes.append(
            f"the checkpoint's step counter ({counter}) differs from the optimizer state's step count "
            f"({opt_steps}); steps here are the optimizer's (a counter of micro-steps, or an optimizer "
            "re-created on resume, would explain it)"
        )
    return opt_steps


def _same_state(view: CheckpointView, ref: CheckpointView, evidence) -> bool:
    """The reference is the checkpoint's own state: the same file, or every shared tensor bitwise equal while
    neither records an earlier step than the other (a run frozen since step 0 is not this: its reference is an
    earlier step)."""
    if view.path.resolve() == ref.path.resolve():
        return True
    shared = [e for e in evidence if e.has_reference and not e.buffer_like]
    if not shared or not all(e.unchanged for e in shared):
        return False
    a, b = view.meta.get("step"), ref.meta.get("step")
    return a is None or b is None or a == b


def _missing_evidence(
    view: CheckpointView,
    ref,
    evidence,
    summaries: list[OptimizerSummary],
    identical: bool = False,
    stacks: tuple[str, ...] = (),
) -> list[str]:
    """Why the evidence cannot support "healthy": each reason names the fact that is missing and the file (in the
    words of the stack that wrote the checkpoint) or flag that would settle it (empty: the evidence can)."""
    reasons = []
    params = [e for e in evidence if not e.buffer_like]
    stacks = stacks or ("torch",)
    reference = f"--against {first_for(REFERENCE_FILE, stacks)}"
    if ref is not None:
        shared = [e for e in params if e.has_reference]
        if not shared:
            reasons.append(
                "missing: a reference of the same model (no tensor name is shared with the reference, so no change "
                f"could be measured); settled by {reference}"
            )
        elif identical:
            reasons.append(
                "missing: an earlier state (the reference is identical to the checkpoint, every tensor bitwise "
                f"equal); settled by {reference}"
            )
        return reasons
    if not view.optimizers:
        reasons.append(
            "missing: neither optimizer state nor a reference (learning rates, moments, step counts, or the initial "
            "weights), so nothing shows "
            f"whether the tensors trained; settled by {first_for(OPTIMIZER_FILE, stacks)}, or by {reference}"
        )
    elif not all(s.fully_mapped for s in summaries):
        parts = [
            f"{s.name!r} ({s.n_params - s.n_mapped} of {s.n_params} parameters)"
            for s in summaries
            if not s.fully_mapped
        ]
        reasons.append(
            "missing: which tensor each optimizer state belongs to: the optimizer state could not be mapped to the "
            f"tensors for {', '.join(parts)}, and there is no reference; settled by {reference}, or by "
            "param_names in the saved param groups (torch.optim built on model.named_parameters())"
        )
    else:
        no_lr = [e.name for e in params if e.optimizer is not None and e.lr is None]
        if no_lr:
            reasons.append(
                f"missing: the learning rate of {len(no_lr)} tensors' param groups (a zero learning rate cannot be "
                f"ruled out), and there is no reference; settled by {reference}"
            )
    return reasons


def _corroborate(findings: list[Finding], probe: dict) -> None:
    for f in findings:
        c = REGISTRY.get(f.cause)
        if isinstance(c, CheckpointCause):
            c.corroborate(f, probe)


def _plain(v):
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, tuple):
        return list(v)
    return v


def _model_config(view: CheckpointView, spec: str | None, notes: list[str]) -> Config | None:
    if spec:  # asked for by name (--model): a bad one is the user's error, not a probe to skip quietly
        return load_config(spec)
    try:
        if isinstance(view.meta.get("config"), dict) and view.format in ("moe_arch", "moe_arch-dcp"):
            return Config.from_dict(view.meta["config"], f"{view.path} (config)")
    except ConfigError as e:
        notes.append(f"model-aware probes skipped: {e}")
    return None
