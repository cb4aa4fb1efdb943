"""A run's history, from whatever logger wrote it, as one set of named series.

Readers (each reads the files that logger writes; none needs the training stack installed):

===========================  =========================================================================
format                       files
===========================  =========================================================================
``moe_arch``                 ``metrics.jsonl`` rows ``{"kind": "train"|"eval"|"monitor", "step", ...}``
``hf-trainer-state``         ``trainer_state.json``: ``log_history`` (``loss``, ``learning_rate``,
                             ``grad_norm``, ``eval_loss``, ...)
``tensorboard``              ``events.out.tfevents.*`` of any writer (read with the ``tensorboard``
                             package's ``EventAccumulator``)
``lightning-csv``            Lightning ``CSVLogger``'s ``metrics.csv`` (``step`` column, sparse rows)
``csv`` / ``jsonl``          any table with a step column (``step``, ``global_step``, ``iter``, ``iteration``)
===========================  =========================================================================

Every logger's metric names are mapped onto one schema (``CANONICAL``): ``loss``, ``lm_loss``, ``eval_loss``,
``lr`` (or ``lr/<group>`` per param group), ``grad_norm``, ``tokens_per_s`` (or ``steps_per_s``, derived from
TensorBoard event wall times when nothing else gives the speed), ``clip_rate``,
``moe_imbalance/<layer>`` (max / mean expert load), ``mod_fraction/<layer>``. Names that map to nothing are kept
under their own name and listed as unmapped.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from moe_arch.checkpoint.readers.base import LoadError, load_with_inert_classes

STEP_KEYS = ("step", "global_step", "iter", "iteration", "iter_num", "trainer/global_step")

# (pattern on the metric name, canonical name; \1 is a group / layer captured by the pattern)
CANONICAL: list[tuple[str, str]] = [
    (r"(?:train[/_])?loss(?:_step)?|train/train_loss", "loss"),
    (r"(?:train[/_])?lm_loss", "lm_loss"),
    (r"(?:eval|val|validation)[/_]loss|eval/loss|val_loss_epoch", "eval_loss"),
    (r"(?:train[/_])?(?:learning_rate|lr)", "lr"),
    (r"lr[-_/](.+)", r"lr/\1"),
    (r"(?:train[/_])?(?:grad_norm|gradient_norm|grad-norm)", "grad_norm"),
    (r"(?:train[/_])?(?:tokens_per_s|tokens_per_second|tok_per_s|throughput_tokens)", "tokens_per_s"),
    (r"(?:train[/_])?clip_rate", "clip_rate"),
    (r"(?:train[/_])?steps_per_s(?:econd)?", "steps_per_s"),
    (r"moe_max_over_mean_(L\d+)", r"moe_imbalance/\1"),
    (r"mod_selected_(L\d+)", r"mod_fraction/\1"),
]
_COMPILED = [(re.compile(rf"^(?:{p})$"), c) for p, c in CANONICAL]


def canonical(name: str) -> str | None:
    for pat, c in _COMPILED:
        m = pat.match(name)
        if m:
            return m.expand(c)
    return None


@dataclass
class Series:
    name: str
    source: str  # the metric's name in the log
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, step: int, value: float) -> None:
        self.steps.append(int(step))
        self.values.append(float(value))


@dataclass
class History:
    path: Path
    format: str
    series: dict[str, Series] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # vocab_size, unigram_loss, mod_capacity, grad_clip, ... when known
    # raw columns by the log's own metric names, in order of first appearance; finish() maps them to series
    _cols: dict[str, tuple[list, list]] = field(default_factory=dict, repr=False)

    def get(self, name: str) -> Series | None:
        s = self.series.get(name)
        return s if s is not None and s.values else None

    def found(self) -> list[str]:
        return sorted(n for n, s in self.series.items() if s.values)

    def column(self, metric: str) -> tuple[list, list]:
        """The (steps, values) lists a reader appends a metric's points to (the fast path for long logs)."""
        c = self._cols.get(metric)
        if c is None:
            c = self._cols[metric] = ([], [])
        return c

    def add(self, metric: str, step, value) -> None:
        if step is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        steps, values = self.column(metric)
        steps.append(int(step))
        values.append(float(value))

    def finish(self) -> "History":
        """Map the columns onto the schema (two log names for one series, e.g. ``loss`` and ``train/loss``: the
        first seen is kept), each series sorted by step with the last value of a repeated step."""
        for metric, (steps, values) in self._cols.items():
            if not steps:
                continue
            name = canonical(metric)
            if name is None:
                self.unmapped.append(metric)
                name = metric
            if name in self.series:
                continue
            if any(b <= a for a, b in zip(steps, steps[1:])):
                pairs = dict(zip(steps, values))
                steps, values = sorted(pairs), [pairs[k] for k in sorted(pairs)]
            self.series[name] = Series(name, metric, list(steps), [float(v) for v in values])
        self._cols = {}
        return self


class HistoryError(ValueError):
    """A history file that cannot be read: one line naming the file and the problem."""


def _num(x):
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return x
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return None
    return None


def _step_of(row: dict):
    for k in STEP_KEYS:
        v = _num(row.get(k))
        # int(inf) raises, and a step beyond int64 breaks the plots and arrays later: such a row has no step
        if v is not None and (isinstance(v, int) or math.isfinite(v)) and abs(v) < 2**63:
            return int(v)
    return None


def _json_rows(path: Path) -> list:
    text = path.read_text(errors="replace")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return []
    try:  # one C-level parse for the whole file: ~2x faster than a json.loads per line on long logs
        return json.loads("[" + ",".join(lines) + "]")
    except json.JSONDecodeError:
        pass
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == 0:
                raise HistoryError(f"{path}: line 1 is not JSON") from None
            # a line cut by a crash: the rest is still the history
    return rows


_SKIP = frozenset(STEP_KEYS) | {"kind", "time", "epoch"}


def read_metrics_jsonl(path: Path) -> History:
    """This project's metrics.jsonl, or any JSON-lines log whose rows carry a step."""
    h = History(path, "jsonl")
    ours = False
    cols: dict = {}
    for row in _json_rows(path):
        if not isinstance(row, dict):
            continue
        kind = row.get("kind")
        step = row.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or abs(step) >= 2**63:
            step = _step_of(row)
            if step is None:
                continue
        if kind is not None:
            ours |= kind in ("train", "eval", "monitor")
            if kind == "eval":
                row = {k: row[k] for k in ("val_loss", "unigram_loss") if k in row}
        for k, v in row.items():
            if k in _SKIP or v.__class__ not in (float, int):
                continue
            c = cols.get(k)
            if c is None:
                c = cols[k] = h.column(k)
            c[0].append(step)
            c[1].append(v)
    h.format = "moe_arch" if ours else "jsonl"
    h.finish()
    u = h.series.pop("unigram_loss", None)
    if u is not None and u.values:
        h.meta["unigram_loss"] = u.values[-1]
        h.unmapped = [n for n in h.unmapped if n != "unigram_loss"]
    return h


def read_trainer_state(path: Path) -> History:
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HistoryError(f"{path}: not JSON ({e.__class__.__name__})") from None
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        raise HistoryError(f"{path}: no log_history list (not a Hugging Face trainer_state.json?)")
    h = History(path, "hf-trainer-state")
    for row in state["log_history"]:
        if not isinstance(row, dict):
            continue
        step = _step_of(row)
        for k, v in row.items():
            if (
                k in STEP_KEYS
                or k in ("epoch", "total_flos")
                or k.startswith(("train_", "eval_runtime", "eval_samples", "eval_steps"))
            ):
                continue
            h.add(k, step, _num(v))
    h.meta["max_steps"] = state.get("max_steps")
    clip = _hf_max_grad_norm(path.parent / "training_args.bin")
    if clip:
        h.meta["grad_clip"] = clip
    return h.finish()


def _hf_max_grad_norm(path: Path) -> float | None:
    """``max_grad_norm`` from the Trainer's pickled TrainingArguments, read with weights_only=True and inert
    stand-ins for transformers' classes (no transformers code runs; None when it cannot be read)."""
    if not path.is_file():
        return None
    try:
        args = load_with_inert_classes(path, ("transformers.", "accelerate."))
    except LoadError:
        return None
    v = getattr(args, "max_grad_norm", None)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None


def read_csv(path: Path) -> History:
    with open(path, newline="", errors="replace") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or not any(k in header for k in STEP_KEYS):
            raise HistoryError(f"{path}: no step column (looked for {', '.join(STEP_KEYS)})")
        h = History(path, "lightning-csv" if path.name == "metrics.csv" and "epoch" in header else "csv")
        step_at = next(header.index(k) for k in STEP_KEYS if k in header)
        cols = [(i, h.column(k)) for i, k in enumerate(header) if k not in STEP_KEYS and k not in ("epoch", "time")]
        for row in reader:
            if len(row) != len(header):
                continue
            try:
                step = int(float(row[step_at]))
            except (ValueError, OverflowError):  # not a number, or inf / nan: a row with no step
                continue
            for i, (steps, values) in cols:
                cell = row[i]
                if cell:  # Lightning writes sparse rows: a metric's cell is empty at steps it was not logged
                    try:
                        values.append(float(cell))
                    except ValueError:
                        continue
                    steps.append(step)
    return h.finish()


def read_tensorboard(folder: Path) -> History:
    from tensorboard.backend.event_processing import event_accumulator  # lazy: seconds to import, for TB runs only

    h = History(folder, "tensorboard")
    files = sorted(folder.rglob("events.out.tfevents.*"))
    if not files:
        raise HistoryError(f"{folder}: no TensorBoard event files")
    for f in files:
        acc = event_accumulator.EventAccumulator(str(f), size_guidance={event_accumulator.SCALARS: 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            events = acc.Scalars(tag)
            for ev in events:
                h.add(tag, ev.step, ev.value)
            if canonical(tag) == "loss" and "steps_per_s" not in h._cols:
                # Event wall times give the run's speed even where no throughput metric is logged (HF's Trainer)
                for a, b in zip(events, events[1:]):
                    if b.step > a.step and b.wall_time > a.wall_time:
                        h.add("steps_per_s", b.step, (b.step - a.step) / (b.wall_time - a.wall_time))
    return h.finish()


def find_history(path: Path) -> Path | None:
    """The history file (or event folder) for a run folder, a checkpoint, or a history file itself."""
    p = Path(path)
    if p.is_file():
        if (
            p.name == "metrics.jsonl"
            or p.suffix in (".jsonl", ".csv")
            or p.name == "trainer_state.json"
            or p.name.startswith("events.out.tfevents.")
        ):
            return p
        p = p.parent
    for folder in (p, p.parent, p.parent.parent):
        if (folder / "metrics.jsonl").is_file():
            return folder / "metrics.jsonl"
    # Hugging Face output_dir: the newest checkpoint's trainer_state.json holds the whole log_history
    states = sorted(
        p.glob("checkpoint-*/trainer_state.json"),
        key=lambda q: int(q.parent.name.split("-")[-1]) if q.parent.name.split("-")[-1].isdigit() else -1,
    )
    if (p / "trainer_state.json").is_file():
        return p / "trainer_state.json"
    if states:
        return states[-1]
    csvs = sorted(p.rglob("metrics.csv"), key=lambda q: q.stat().st_mtime)
    if csvs:
        return csvs[-1]
    if any(p.rglob("events.out.tfevents.*")):
        return p
    return None


def read_history(path: Path) -> History:
    p = Path(path)
    if p.is_dir():
        return read_tensorboard(p)
    if p.name.startswith("events.out.tfevents."):
        return read_tensorboard(p.parent)
    if p.name == "trainer_state.json":
        return read_trainer_state(p)
    if p.suffix == ".csv":
        return read_csv(p)
    return read_metrics_jsonl(p)
