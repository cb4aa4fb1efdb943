"""A DeepSpeed training run (plain PyTorch model, DeepSpeed's engine and checkpoints), for tests/test_doctor_facts.py.

Run in its own process (DeepSpeed initialises a process group): ``python deepspeed_run.py OUT STAGE [WORLD]``.
The norms' param group has lr 0; checkpoints at step 0 and step 4 (``OUT/global_step0``, ``OUT/global_step4``).
"""

import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from plain_runs import Net, norm_names  # noqa: E402


def main(out: str, stage: int) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = Net()
    norms = norm_names(model)  # a list: every rank must build its param groups in the same order
    named = dict(model.named_parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in named.items() if n not in norms]},
            {"params": [p for n, p in named.items() if n in norms], "lr": 0.0},
        ],
        lr=1e-2,
    )
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=opt,
        config={
            "train_batch_size": 8,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage},
            "steps_per_print": 10_000,
        },
    )
    engine.save_checkpoint(out)  # global_step0
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        tok = torch.randint(0, 64, (8, 8), generator=g)
        loss = nn.functional.cross_entropy(engine(tok[:, :-1]).reshape(-1, 64), tok[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(out)  # global_step4


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
