"""Per-rank ``torch.save`` files: a folder where every rank saved its own copy of the model, the rank index in the
file name (``ckpt_rank0.pt``, ``model-rank_1.pth``) or in a folder name (``rank_0/model.pt``, ``rank1/ckpt.pt``).

A plain DDP loop that saves on every rank writes such a folder, and so does a user who saves per rank to compare
them (pytorch#104336: DDP that stopped synchronising after ``model.cpu(); model.cuda()``). Data parallelism
replicates every tensor, so the copies must be bitwise equal; the doctor's ``replicas_diverged`` compares them.
The lowest rank's file is the checkpoint every other cause reads (an ordinary torch file); each other rank's copy
of the tensors it saved too, with the same name and shape, goes to ``view.replicas``. Several saves in one folder
(``step0_rank0.pt`` ... ``step5_rank1.pt``): the newest set is read, the others are named in the notes (pass one as
``--against``: the reference is read the same way).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from moe_arch.checkpoint.readers.base import CheckpointView, TensorInfo
from moe_arch.checkpoint.readers.torch_file import read_torch_file

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# "rank" not preceded by a letter (so "prank3" / "frank1" are not ranks), an optional separator, the index
_RANK = re.compile(r"(?<![A-Za-z])rank[_-]?(\d+)", re.IGNORECASE)


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
            for q in sorted(p.iterdir()):
                if _torch_file(q):
                    sets.setdefault(f"{label}/{q.name}", {})[rank] = q
    return [RankSet(label, files) for label, files in sets.items() if len(files) > 1]


def is_per_rank_dir(p: Path) -> bool:
    return p.is_dir() and bool(rank_sets(p))


def read_per_rank(path: Path, trust_pickle: bool = False) -> CheckpointView:
    sets = rank_sets(path)
    chosen = max(sets, key=lambda s: (s.mtime, s.label))
    ranks = sorted(chosen.files)
    view = read_torch_file(chosen.files[ranks[0]], trust_pickle)
    view.notes.append(
        f"per-rank saves {chosen.label} of ranks {ranks}: rank {ranks[0]}'s file is read as the checkpoint, every "
        "rank's copy of its tensors is compared"
    )
    others = [s.label for s in sets if s is not chosen]
    if others:
        view.notes.append(f"other per-rank saves in {path} (pass one with --against as the reference): {others[:4]}")
    copies: dict[str, dict[int, TensorInfo]] = {n: {ranks[0]: t} for n, t in view.tensors.items()}
    mismatched: set[str] = set()
    for rank in ranks[1:]:
        other = read_torch_file(chosen.files[rank], trust_pickle)
        mismatched |= set(other.tensors) ^ set(view.tensors)
        for name, t in other.tensors.items():
            if name in copies and t.shape == view.tensors[name].shape:
                copies[name][rank] = t
            elif name in copies:
                mismatched.add(name)
        if other.meta.get("step") != view.meta.get("step"):
            view.notes.append(
                f"rank {rank} saved step {other.meta.get('step')}, rank {ranks[0]} step {view.meta.get('step')}"
            )
    if mismatched:
        view.notes.append(
            f"{len(mismatched)} tensors not saved by every rank with one shape (shards, not compared): "
            f"{sorted(mismatched)[:4]}"
        )
    view.replicas = {n: c for n, c in copies.items() if len(c) == len(ranks)}
    # Whole-model copies, one per rank: data parallelism replicates every tensor (the doctor leaves out copies
    # that are different tensors, a hand-written tensor-parallel shard per rank).
    view.meta["replicated"] = "per_rank_saves"
    view.meta["per_rank_files"] = {r: str(p) for r, p in chosen.files.items()}
    return view
