"""Per-rank ``torch.save`` files: a folder where every rank saved its own copy of the model, the rank index in the
file name (``ckpt_rank0.pt``, ``model-rank_1.pth``) or in a folder name (``rank_0/model.pt``, ``rank1/ckpt.pt``).

A plain DDP loop that saves on every rank writes such a folder, and so does a user who saves per rank to compare
them (pytorch#104336: DDP that stopped synchronising after ``model.cpu(); model.cuda()``). Data parallelism
replicates every tensor, so the copies must be bitwise equal; the doctor's ``replicas_diverged`` compares them.
The lowest rank's file is the checkpoint every other cause reads (an ordinary torch file); the other ranks' copies
go to ``view.replicas`` only when the set is one run's ranks: ranks exactly 0..n-1, every file the same tensor
names and shapes, and the same saved step (a rank whose step differs is a stale file of an earlier run and is left
out, as is a rank whose file cannot be read). Anything else (a sweep's ``best_rank1.pt``/``best_rank2.pt``,
pipeline stages, FSDP local state dicts) is named in a note and not compared. Model-parallel names
(``mp_rank_00``, ``tp_rank1``, ``ep_rank2``) hold shards, so only their norms are compared, as for DeepSpeed's
``mp_rank_XX`` files. Several saves in one folder (``step0_rank0.pt`` ... ``step5_rank1.pt``, ``rank_0/model.pt``
beside ``rank_0/optim.pt``): the one with the highest step number in its name (else the newest) that holds a
model state is read, the others are named in the notes (pass one as ``--against``: the reference is read the same
way).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from moe_arch.checkpoint.readers.base import CheckpointView, LoadError, TensorInfo
from moe_arch.checkpoint.readers.torch_file import read_torch_file

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# "rank" not preceded by a letter (so "prank3" / "frank1" are not ranks), an optional separator, the index
_RANK = re.compile(r"(?<![A-Za-z])rank[_-]?(\d+)", re.IGNORECASE)
# Model-parallel rank names (Megatron / NeMo ``mp_rank_00``, hand-written ``tp_rank1``, ``ep_rank2``): each file is
# a shard, and only the norms (which tensor and expert parallelism replicate) are copies of one tensor.
_MODEL_PARALLEL = re.compile(r"(?<![A-Za-z])(mp|tp|ep)[_-]?rank", re.IGNORECASE)
# Pipeline stages (the same local names on every stage hold different layers) and FSDP local state dicts (each rank
# a slice of flat parameters): no tensor is a copy of another rank's, nothing is compared.
_NO_COPIES = re.compile(r"(?<![A-Za-z])pp[_-]?rank|fsdp", re.IGNORECASE)
MAX_TRIED = 8  # saves tried, best first, for the one holding a model state (each try reads one file's header)


@dataclass(frozen=True)
class RankSet:
    """One save made by every rank: ``label`` is its path pattern with the rank as ``{r}``."""

    label: str
    files: dict[int, Path]

    @property
    def mtime(self) -> int:
        return max(p.stat().st_mtime_ns for p in self.files.values())


def _pattern(name: str) -> tuple[str, int] | None:
    found = list(_RANK.finditer(name))
    if len(found) != 1:  # no rank, or an ambiguous name: not read as a per-rank file
        return None
    m = found[0]
    return name[: m.start(1)] + "{r}" + name[m.end(1) :], int(m.group(1))


def _torch_file(p: Path) -> bool:
    return p.suffix in TORCH_SUFFIXES and p.is_file()


def rank_sets(folder: Path) -> list[RankSet]:
    """The per-rank saves in ``folder`` (two ranks or more each), in file-name order."""
    sets: dict[str, dict[int, Path]] = {}
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    for p in entries:
        pat = _pattern(p.name)
        if pat is None:
            continue
        label, rank = pat
        if _torch_file(p):
            sets.setdefault(label, {})[rank] = p
        elif p.is_dir():
            try:
                inner = sorted(p.iterdir())
            except OSError:
                continue
            for q in inner:
                if _torch_file(q):
                    sets.setdefault(f"{label}/{q.name}", {})[rank] = q
    return [RankSet(label, files) for label, files in sets.items() if len(files) > 1]


def is_per_rank_dir(p: Path) -> bool:
    # A Hugging Face checkpoint-N (or any model folder with a config.json) is the hf reader's, rank-named files
    # in it (accelerate's FSDP saves, per-rank RNG states) notwithstanding.
    if not p.is_dir() or (p / "trainer_state.json").is_file() or (p / "config.json").is_file():
        return False
    return bool(rank_sets(p))


def _order(s: RankSet) -> tuple:
    """Best save first: the numbers in its name (``step5`` after ``step0``), then the newest, then the name."""
    numbers = tuple(int(x) for x in re.findall(r"\d+", s.label.replace("{r}", "")))
    return numbers, s.mtime, s.label


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def read_per_rank(path: Path, trust_pickle: bool = False) -> CheckpointView:
    sets = sorted(rank_sets(path), key=_order, reverse=True)
    # The save holding a model state: beside it the same ranks may have saved optimizer or RNG states
    # (``rank_0/optim.pt``, ``rng_rank0.pth``), which are no checkpoint of the model.
    chosen, view, skipped, first_error = None, None, {}, None
    for s in sets[:MAX_TRIED]:
        try:
            view = read_torch_file(s.files[min(s.files)], trust_pickle)
        except LoadError as e:
            first_error = first_error or e
            skipped[s.label] = _first_line(e)
            continue
        chosen = s
        break
    if chosen is None or view is None:
        raise first_error or LoadError(f"{path}: no per-rank save holding a model state")
    ranks = sorted(chosen.files)
    view.meta["per_rank_files"] = {r: str(p) for r, p in chosen.files.items()}
    view.notes.append(f"per-rank saves {chosen.label} of ranks {ranks}: rank {ranks[0]}'s file is the checkpoint")
    if skipped:
        view.notes.append(f"per-rank saves in {path} without a model state, not read: {list(skipped.items())[:4]}")
    others = [s.label for s in sets if s is not chosen and s.label not in skipped]
    if others:
        view.notes.append(f"other per-rank saves in {path} (pass one with --against as the reference): {others[:4]}")
    if ranks != list(range(len(ranks))):
        # top-k or sweep files (best_rank1.pt, merged_rank8.pt), or a subset of some run's ranks: not one run's
        # replicas, and different models that start from one init are close enough to pass for drifted copies
        view.notes.append(f"ranks {ranks} are not 0..{len(ranks) - 1}: not one run's ranks, copies not compared")
        return view
    if _NO_COPIES.search(chosen.label):
        view.notes.append(f"{chosen.label}: pipeline stages or FSDP local shards hold no copies, none compared")
        return view
    shapes = {n: t.shape for n, t in view.tensors.items()}
    copies: dict[str, dict[int, TensorInfo]] = {n: {0: t} for n, t in view.tensors.items()}
    for rank in ranks[1:]:
        try:
            other = read_torch_file(chosen.files[rank], trust_pickle)
        except LoadError as e:  # a rank that crashed mid-save: the others are still compared
            view.notes.append(f"rank {rank}'s file cannot be read, left out of the comparison: {_first_line(e)}")
            continue
        step, own = view.meta.get("step"), other.meta.get("step")
        if str(step) != str(own):
            view.notes.append(
                f"rank {rank} saved step {own}, rank 0 step {step}: a stale file (of an earlier run?), left out"
            )
            continue
        theirs = {n: t.shape for n, t in other.tensors.items()}
        if theirs != shapes:
            differ = sorted(n for n in set(theirs) | set(shapes) if theirs.get(n) != shapes.get(n))
            view.notes.append(
                f"rank {rank} saved other tensors than rank 0 (names or shapes: {differ[:4]}): shards of a model, "
                "not copies of one, none compared"
            )
            return view
        for name, t in other.tensors.items():
            copies[name][rank] = t
    compared = sorted({r for c in copies.values() for r in c})
    if len(compared) < 2:
        view.notes.append("fewer than two ranks left to compare")
        return view
    view.notes.append(f"ranks {compared}: every rank's copy of each tensor is compared")
    view.replicas = copies
    # Whole-model copies, one per rank: data parallelism replicates every tensor (the doctor falls back to the norms
    # when the copies turn out to be shards). Model-parallel names: only the norms are replicas.
    view.meta["replicated"] = "model_parallel_ranks" if _MODEL_PARALLEL.search(chosen.label) else "per_rank_saves"
    return view
