"""``moe-arch``: train, inspect, sample from and diagnose hybrid MoE language models.

    moe-arch train [CONFIG|PRESET] [--resume PATH|latest] [--section.field VALUE ...]
    moe-arch info CONFIG|PRESET [--json] [--optimizer] [--memory [--gpus N --gpu-memory GB ...]]
                  [--section.field VALUE ...]
    moe-arch generate CHECKPOINT --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
    moe-arch diagnose CHECKPOINT|RUN_DIR [--against REF] [--logs PATH] [--out DIR] [--json PATH] [--fail-on ...]
    moe-arch config [CONFIG|PRESET] [--section.field VALUE ...]     (print the resolved, validated config)

Errors in the input (a bad config value, missing data, an unreadable checkpoint) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
import yaml

from moe_arch import __version__
from moe_arch.checkpoint import CheckpointError
from moe_arch.config import ConfigError, describe_fields, load_config, parse_overrides
from moe_arch.data.corpus import DataError
from moe_arch.model.cpu_kernels import KernelISAError
from moe_arch.utils import (
    DeviceError,
    OutputError,
    parse_number,
    refuse_overwriting_inputs,
    resolve_device,
    writable_file,
    write_output,
)


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (argparse prints the usage block, then the error)."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message}; see `{self.prog} --help`", file=sys.stderr)
        raise SystemExit(2)


def number(integer: bool = False):
    """An argparse type: every numeric flag is read by utils.parse_number, which refuses nan and inf."""

    def parse(text: str):
        try:
            return parse_number(text, "value", integer)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e.reason}") from None

    parse.__name__ = "integer" if integer else "number"
    return parse


INT, FLOAT = number(integer=True), number()


def extract_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split ``--section.field VALUE`` overrides out of argv before argparse sees it (argparse would take an
    override's value for a positional argument)."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "." in a.split("=")[0]:
            overrides.append(a)
            if "=" not in a and i + 1 < len(argv):
                if re.match(r"--[A-Za-z]", argv[i + 1]):
                    # `--model.d_model --train.steps 5` forgot a value: taking the next option as it would leave
                    # its value (5) to be read as the config file.
                    raise UsageError(
                        f"override {a}: missing value (the next argument is the option {argv[i + 1]}); write {a} VALUE"
                    )
                overrides.append(argv[i + 1])
                i += 1
        else:
            rest.append(a)
        i += 1
    return rest, overrides


def _split_overrides(rest: list[str]) -> list[str]:
    for a in rest:
        if a.startswith("--") and "." not in a.split("=")[0]:
            raise UsageError(
                f"unknown option {a!r}; config overrides look like --section.field VALUE "
                "(sections: model, optim, train, data, monitor)"
            )
    return rest


def cmd_train(args, rest) -> int:
    # lazy: each command imports its own subsystem (the trainer's data, doctor, tensorboard), keeping --help fast
    from moe_arch.training.trainer import NonFiniteLossError, Trainer, TrainingStopped

    cfg = load_config(args.config, _split_overrides(rest))
    init_state = None
    if args.init_from:
        from moe_arch.hf.export import ExportError, init_from_config  # lazy: only for --init-from

        try:
            cfg, init_state = init_from_config(cfg, args.init_from)
        except ExportError as e:
            raise UsageError(str(e)) from None
    trainer = None
    try:
        trainer = Trainer(cfg, resume=args.resume, init_state=init_state)
        result = trainer.run()
    except (NonFiniteLossError, TrainingStopped) as e:  # raised on every rank together
        trainer.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # SIGINT before the training loop, after it, or a second one during it
        phase = trainer.phase if trainer is not None else "start-up"
        last = trainer.last_checkpoint if trainer is not None else None
        kept = f"the last checkpoint is {last}" if last else "no checkpoint was written"
        print(f"interrupted during {phase}; {kept}", file=sys.stderr)
        return 130
    # Any other exception propagates without a barrier (torchrun stops the other ranks).
    trainer.close()
    if trainer.stop_reason:
        print(f"error: {trainer.stop_reason}", file=sys.stderr)
        return 1
    if result.interrupted:
        return 128 + result.interrupted
    return 0


def cmd_info(args, rest) -> int:
    # lazy: the model and optimizer modules load only for the commands that build a model
    from moe_arch.model.params import count_parameters, flops_per_token
    from moe_arch.model.transformer import HybridLM
    from moe_arch.training.optim import format_plan, plan_parameters

    cfg = load_config(args.config, _split_overrides(rest))
    if args.memory:
        return _info_memory(args, cfg)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = HybridLM(cfg.model)
    counts = count_parameters(model)
    counts["train_flops_per_token"] = flops_per_token(cfg.model, cfg.train.seq_len, model)["train_flops_per_token"]
    counts["active_counting"] = (
        "active = all parameters except the experts a token is not routed to (top_k / "
        "n_experts of each expert tensor); MoD does not reduce it (a token may be selected "
        "by any block), it reduces FLOPs, counted in train_flops_per_token"
    )
    plan = format_plan(plan_parameters(model, cfg.optim)) if args.optimizer else None
    if args.json:
        out = {"config": args.config, **counts}
        if plan is not None:
            out["optimizer"] = plan
        print(json.dumps(out, indent=2))
        return 0
    from rich.console import Console  # lazy: rich only for the tables, not for --json
    from rich.table import Table

    con = Console(highlight=False)
    m = cfg.model
    con.print(
        f"[bold]{args.config}[/]: {m.n_layers} layers, d_model {m.d_model}, {m.n_heads}/{m.n_kv_heads} heads, "
        f"{m.n_experts} experts top-{m.top_k} on {len(m.moe_layers)} layers, Mamba on {len(m.mamba_layers)} "
        f"layers, MoD {m.mod_capacity if m.mod_enabled else 'off'}, {m.n_predict} prediction heads"
    )
    t = Table(show_header=False, box=None)
    t.add_row("total parameters", f"{counts['total']:,} ({counts['total'] / 1e9:.3f}B)")
    t.add_row("active parameters", f"{counts['active']:,} ({counts['active'] / 1e9:.3f}B)")
    t.add_row("sparsity", f"{counts['sparsity']:.1%}")
    t.add_row("tensors", str(counts["n_tensors"]))
    t.add_row("RMSNorm weights", str(counts["n_norms"]))
    t.add_row("train FLOPs / token", f"{counts['train_flops_per_token'] / 1e9:.3f} GFLOP")
    con.print(t)
    k = Table(title="by kind")
    k.add_column("kind")
    k.add_column("parameters", justify="right")
    k.add_column("share", justify="right")
    for name, n in counts["by_kind"].items():
        k.add_row(name, f"{n:,}", f"{n / counts['total']:.1%}")
    con.print(k)
    con.print(f"[dim]{counts['active_counting']}[/]")
    if plan is not None:
        o = Table(title="optimizer routing (role -> optimizer)")
        for col in ("tensor", "shape", "role", "optimizer", "lr", "effective lr", "weight decay"):
            o.add_column(col)
        for p in plan:
            o.add_row(
                p["name"],
                "x".join(map(str, p["shape"])),
                p["role"],
                p["optimizer"],
                f"{p['lr']:.2e}",
                f"{p['effective_lr']:.2e}",
                f"{p['weight_decay']:g}",
            )
        con.print(o)
    return 0


# plan_memory's inputs -> the `info --memory` flags (and config overrides) that set them: its errors name these
MEMORY_FLAGS = {
    "gpus": "--gpus",
    "batch_size": "--batch-size",
    "seq_len": "--seq-len",
    "gpu_memory_gb": "--gpu-memory",
    "parallel": "--parallel",
    "checkpointing": "--activation-checkpointing",
    "max_seq_len": "--model.max_seq_len",
    "expert_parallel": "--expert-parallel",
    "n_experts": "--model.n_experts",
}


def _info_memory(args, cfg) -> int:
    from moe_arch.training.memory import USABLE, PlanError, plan_memory  # lazy: the model and optimizer stacks

    try:
        plan = plan_memory(
            cfg,
            name=args.config,
            gpus=args.gpus,
            gpu_memory_gb=args.gpu_memory,
            parallel=args.parallel,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            checkpointing=args.activation_checkpointing,
            precision=args.precision,
            device=args.device,
            expert_parallel=args.expert_parallel,
        )
    except PlanError as e:
        print(f"error: {e.worded(MEMORY_FLAGS)}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.as_dict(), indent=2))
        return 0
    from rich.console import Console  # lazy: rich only for the tables, not for --json
    from rich.table import Table

    con = Console(highlight=False)
    con.print(
        f"[bold]{args.config}[/]: {plan.parameters / 1e9:.3f}B parameters, {plan.precision}, micro-batch "
        f"{plan.batch_size} x {plan.seq_len} tokens, activation checkpointing {plan.activation_checkpointing}, "
        f"{plan.gpus} x {args.gpu_memory:g} GiB {plan.device} ({plan.parallel}"
        + (f", expert parallel {plan.expert_parallel})" if plan.expert_parallel > 1 else ")")
    )
    t = Table(title="per device")
    t.add_column("component")
    t.add_column("GiB", justify="right")
    for k, v in plan.gb.items():
        t.add_row(k, f"{v:.2f}")
    t.add_row("[bold]peak[/]", f"[bold]{plan.peak_gb:.2f}[/]")
    con.print(t)
    verdict = "[green]fits[/]" if plan.fits else "[red]does not fit[/]"
    con.print(
        f"peak during the {plan.phase}: {plan.peak_gb:.1f} GiB of {args.gpu_memory:g} GiB ({USABLE:.0%} usable "
        f"after the CUDA context and allocator reserve): {verdict}; largest micro-batch that fits: "
        f"{plan.max_batch_size}"
    )
    for note in plan.notes:
        con.print(f"[dim]{note}[/]")
    return 0


def cmd_config(args, rest) -> int:
    if args.help_fields is not None:
        print(describe_fields(args.help_fields or None))
        return 0

    cfg = load_config(args.config, _split_overrides(rest))
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


MAX_SAMPLES = 10_000


def _device(args) -> torch.device:
    """``--device`` (generate, eval, lm-eval) as the device this machine has: resolved here once, the library
    gets the torch.device."""
    return resolve_device(args.device, "--device")


def cmd_generate(args, rest) -> int:
    from moe_arch.evaluation.loss import load_for_eval  # lazy: a model load pulls in the data and model stacks
    from moe_arch.model.generation import generate

    if rest:
        raise UsageError(f"unexpected arguments {rest}")
    for name, value, ok, allowed in [
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 0, ">= 0"),
        ("--seed", args.seed, 0 <= args.seed < 2**63, "in [0, 2**63 - 1]"),
        ("--temperature", args.temperature, args.temperature >= 0, ">= 0 (0: greedy)"),
        ("--top-k", args.top_k, args.top_k >= 0, ">= 0 (0: no limit)"),
        ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"),
        # each sample is printed as it is made: a cap, so that a typo such as
        # 1000000000 is refused rather than run until killed
        ("--num-samples", args.num_samples, 1 <= args.num_samples <= MAX_SAMPLES, f"in [1, {MAX_SAMPLES}]"),
    ]:
        if not ok:
            raise UsageError(f"generate {name} {value}: must be {allowed}")
    device = _device(args)
    ck = load_for_eval(args.checkpoint, device)
    model, cfg, tok = ck.model, ck.cfg, ck.tokenizer
    limit = cfg.model.max_seq_len
    if args.max_new_tokens >= limit:
        raise UsageError(
            f"generate --max-new-tokens {args.max_new_tokens}: must be < model.max_seq_len={limit} of "
            f"{args.checkpoint} (the prompt and the new tokens share that many positions)"
        )
    head = [tok.bos_id] if tok.add_bos else []
    body = tok.encode(args.prompt)
    keep = limit - args.max_new_tokens - len(head)
    if len(body) > keep:
        # The model cannot attend further back than max_seq_len: the end of the prompt is what it continues.
        print(
            f"note: the prompt is {len(body)} tokens; its first {len(body) - keep} are dropped so that it and "
            f"--max-new-tokens {args.max_new_tokens} fit model.max_seq_len={limit}",
            file=sys.stderr,
        )
        body = body[len(body) - keep :] if keep > 0 else []
    prompt = head + body
    ids = torch.tensor([prompt or [tok.eos_id]], device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    room = args.max_new_tokens
    drafts = len(model.mtp_heads) if args.speculative == "auto" else 0
    for _ in range(args.num_samples):
        t0 = time.perf_counter()
        out = generate(
            model,
            ids,
            room,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_id=tok.eos_id if args.stop_at_eos else None,
            generator=gen,
            draft_tokens=drafts,
        )
        seconds = time.perf_counter() - t0
        print(tok.decode(ids[0].tolist() + out.tokens[0].tolist()))
        n = out.tokens.shape[1]
        how = (
            f"speculative ({drafts} MTP draft{'s' if drafts != 1 else ''} per forward): "
            f"acceptance {out.acceptance_rate:.1%}, "
            f"{out.tokens_per_forward:.2f} tokens per forward"
            if drafts
            else "plain decoding" + (" (the model has no MTP heads)" if args.speculative == "auto" else "")
        )
        print(f"[{how}; {n} new tokens in {seconds:.2f} s, {n / max(seconds, 1e-9):.0f} tokens/s]", file=sys.stderr)
        if args.num_samples > 1:
            print("-" * 40)
    return 0


def cmd_eval(args, rest) -> int:
    from moe_arch.evaluation.loss import run_eval  # lazy: the data and model stacks load only to evaluate

    ov = parse_overrides(_split_overrides(rest)) if rest else {}
    if set(ov) - {"data"}:
        raise UsageError(f"eval: only --data.FIELD overrides apply (got --{sorted(set(ov) - {'data'})[0]}.*)")
    data = dict(ov.get("data", {}))
    if args.data is not None:
        data["source"] = args.data
    for name, value in [
        ("--max-tokens", args.max_tokens),
        ("--seq-len", args.seq_len),
        ("--batch-size", args.batch_size),
    ]:
        if value < 0:
            raise UsageError(
                f"eval {name} {value}: must be >= 0 (0: {'all' if name == '--max-tokens' else 'the checkpoint config'})"
            )
    device = _device(args)
    if args.json:
        refuse_overwriting_inputs(
            args.json, {"checkpoint": args.checkpoint, "data source": data.get("source")}, "--json", "evaluation result"
        )
        writable_file(args.json, "evaluation result", "--json", "eval.json")  # before the (long) evaluation
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if not args.quiet else (lambda *a, **k: None)
    try:
        res = run_eval(
            args.checkpoint, data, args.split, args.max_tokens, device, args.seq_len, args.batch_size, log=log
        )
    except ValueError as e:
        raise ConfigError(f"eval {args.checkpoint}: {e}") from None
    text = json.dumps(res, indent=2)
    if args.json:
        write_output(args.json, text + "\n", "evaluation result", "--json")
    print(text)
    return 0


def cmd_lm_eval(args, rest) -> int:
    """lm-evaluation-harness tasks on a checkpoint, through the registered ``moe_arch`` model."""
    if rest:
        raise UsageError(f"unexpected arguments {rest}")
    if args.limit is not None and args.limit <= 0:
        raise UsageError(f"lm-eval --limit {args.limit:g}: must be > 0 (documents per task, or a fraction below 1)")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UsageError(f"lm-eval --num-fewshot {args.num_fewshot}: must be >= 0")
    if args.batch_size != "auto":  # lm_eval's "auto" runs one request at a time here
        try:
            if parse_number(args.batch_size, "--batch-size", integer=True) < 1:
                raise UsageError(f"lm-eval --batch-size {args.batch_size}: must be >= 1 (or auto)")
        except ValueError as e:
            raise UsageError(f"lm-eval {e}; give a positive integer or auto") from None
    if not [t for t in args.tasks.split(",") if t.strip()]:
        raise UsageError(
            f"lm-eval --tasks {args.tasks!r}: no task names; give comma-separated lm_eval task names, "
            "e.g. --tasks hellaswag,arc_easy"
        )
    device = _device(args)
    if args.output:
        refuse_overwriting_inputs(args.output, {"checkpoint": args.checkpoint}, "--output", "lm-eval results")
    try:  # lazy: lm_eval is an optional extra (moe-arch[eval])
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError:
        raise UsageError("lm-eval needs lm-evaluation-harness: pip install 'moe-arch[eval]'") from None
    from moe_arch.evaluation.harness import MoeArchLM  # lazy: imports lm_eval

    if args.output:
        writable_file(args.output, "lm-eval results", "--output", "results.json")  # before the (long) tasks
    model = MoeArchLM(args.checkpoint, device=device, batch_size=args.batch_size)
    tasks = [t for t in args.tasks.split(",") if t]
    # Indexing lm_eval's thousands of built-in task YAMLs takes most of a minute: only when a task is not local.
    tm = TaskManager(include_path=args.include_path, include_defaults=False) if args.include_path else None
    if tm is None or any(t not in tm.all_tasks for t in tasks):
        tm = TaskManager(include_path=args.include_path)
    missing = [t for t in tasks if t not in tm.all_tasks]
    if missing:
        raise UsageError(f"lm-eval --tasks: unknown task(s) {missing}; give --include-path for a folder of task YAMLs")
    res = lm_eval.simple_evaluate(
        model=model, tasks=tasks, task_manager=tm, limit=args.limit, num_fewshot=args.num_fewshot, log_samples=False
    )
    print(make_table(res))
    if args.output:
        write_output(
            args.output,
            json.dumps(
                {k: res[k] for k in ("results", "versions", "n-shot", "config") if k in res}, indent=2, default=str
            ),
            "lm-eval results",
            "--output",
        )
    return 0


def cmd_diagnose(args, rest) -> int:
    from moe_arch.doctor.cli import run_diagnose  # lazy: per-command subsystem (keeps --help fast)

    if rest:
        raise UsageError(f"unexpected arguments {rest}")
    return run_diagnose(args)


def cmd_reproduce_seed(args, rest) -> int:
    """Train the tiny preset with the seed's optimizer settings and a precision policy, then diagnose it."""
    # lazy: per-command subsystems (importing every command's modules at the top costs --help 20-30%)
    from moe_arch.doctor.pipeline import diagnose
    from moe_arch.doctor.report import publish
    from moe_arch.training.trainer import Trainer

    overrides = [
        "--train.precision",
        args.precision,
        "--optim.muon_lr",
        "1e-3",
        "--optim.adamw_lr",
        "3e-4",
        "--train.run_name",
        f"seed-{args.precision}",
        "--train.out_dir",
        args.out,
        "--train.steps",
        str(args.steps),
        "--train.warmup_steps",
        "0",
        "--train.batch_size",
        "8",
        "--train.seq_len",
        "64",
        "--train.log_every",
        "10",
        "--train.eval_every",
        "0",
        "--train.sample_tokens",
        "0",
        "--monitor.interval",
        "10",
        "--monitor.window",
        "20",
    ]
    cfg = load_config("tiny", overrides + _split_overrides(rest))
    print(
        f"== training the tiny preset with --train.precision {args.precision}, Muon lr 1e-3 (hidden matrices), "
        f"AdamW lr 3e-4 (the rest): the seed report's settings"
    )
    trainer = Trainer(cfg)
    result = trainer.run()
    ckpt = result.last_checkpoint
    print(f"\n== moe-arch diagnose {ckpt}")
    d = diagnose(ckpt)
    out_dir = Path(cfg.train.out_dir) / cfg.train.run_name / "diagnosis"
    publish(d, out_dir, str(out_dir / "diagnosis.json"))
    norms = [e for e in d.evidence if e.role == "norm"]
    moved = [e for e in norms if e.unchanged is False]
    rel = sorted(e.rel_change for e in moved if e.rel_change is not None)
    print(
        f"\n== RMSNorm weights: {len(moved)} of {len(norms)} moved since step 0"
        + (f" (median relative change {rel[len(rel) // 2]:.2e})" if rel else "")
        + f"; monitor alerts: {len(trainer.monitor.alerts) if trainer.monitor else 0}"
    )
    return 0


def cmd_export(args, rest) -> int:
    """A distributed (sharded) checkpoint folder -> one single-file checkpoint, loaded on one process; or any of
    our checkpoints -> a Hugging Face model folder (--hf DIR)."""
    if (args.output is None) == (args.hf is None):
        raise UsageError("export: give either OUTPUT.pt (a sharded checkpoint as one file) or --hf DIR")
    if args.hf is not None:
        from moe_arch.hf.export import ExportError, export_hf  # lazy: only for --hf

        try:
            out = export_hf(args.checkpoint, args.hf, args.max_shard_size)
        except ExportError as e:
            raise UsageError(str(e)) from None
        print(
            f"exported {args.checkpoint} -> {out} (AutoModelForCausalLM.from_pretrained({str(out)!r}, "
            "trust_remote_code=True))"
        )
        return 0

    from moe_arch import checkpoint  # lazy: per-command subsystem (keeps --help fast)

    if rest:
        raise UsageError(f"unexpected arguments {rest}")
    src = Path(args.checkpoint)
    writable_file(args.output, "exported checkpoint", "OUTPUT", "out.pt")  # before the (long) load
    payload = checkpoint.to_single_file(src, "exported")
    out = checkpoint.save_checkpoint(args.output, payload)
    print(f"exported {src} (step {payload.get('step')}) -> {out}")
    return 0


# Arguments that name a file, folder, device or config: an empty one (most often an unset shell variable) would
# otherwise be read as "not given" or as the working directory (Path("") is "."), and the command would go on
# with a default nobody asked for.
NON_EMPTY = {
    "config": "CONFIG",
    "checkpoint": "CHECKPOINT",
    "output": "OUTPUT",
    "resume": "--resume",
    "init_from": "--init-from",
    "json": "--json",
    "logs": "--logs",
    "model": "--model",
    "against": "--against",
    "out": "--out",
    "hf": "--hf",
    "include_path": "--include-path",
    "data": "--data",
    "device": "--device",
    "tasks": "--tasks",
}


def _refuse_empty(args) -> None:
    for dest, flag in NON_EMPTY.items():
        value = getattr(args, dest, None)
        if isinstance(value, str) and not value.strip():
            if dest == "output" and args.command == "lm-eval":
                flag = "--output"
            raise UsageError(
                f"{args.command} {flag} {value!r}: empty (an unset shell variable?); give a value or "
                "leave the argument out"
            )


OVERRIDES_HELP = """config overrides:
  --section.field VALUE   set any config field (YAML syntax), e.g. --train.steps 100 --model.moe_layers 1,3
                          sections: model, optim, train, data, monitor
                          `moe-arch config --help-fields [SECTION]` lists every field with its type and default"""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="moe-arch", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"moe-arch {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train a model (default: the tiny preset on the embedded corpus)",
        epilog=OVERRIDES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("config", nargs="?", default=None, help="YAML config file or preset name (default: tiny)")
    t.add_argument("--resume", default=None, help="checkpoint file, run folder, or 'latest' (this run's newest)")
    t.add_argument(
        "--init-from",
        default=None,
        metavar="HF_DIR",
        help="start from the weights, model config and tokenizer of a folder `moe-arch export --hf` wrote",
    )
    t.set_defaults(func=cmd_train)

    i = sub.add_parser(
        "info",
        help="parameter counts and optimizer routing of a config (built on the meta device)",
        epilog=OVERRIDES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    i.add_argument("config", help="YAML config file or preset name")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--optimizer", action="store_true", help="per-tensor optimizer, lr and weight decay")
    i.add_argument(
        "--memory",
        action="store_true",
        help="per-device memory of a training step (parameters, gradients, optimizer states, activations, "
        "temporaries), whether it fits and the largest micro-batch that does",
    )
    i.add_argument("--gpus", type=INT, default=1, help="--memory: devices (default 1)")
    i.add_argument("--gpu-memory", type=FLOAT, default=80.0, metavar="GB", help="--memory: GiB per device (default 80)")
    i.add_argument("--parallel", choices=("fsdp", "ddp"), default="fsdp", help="--memory: data parallelism")
    i.add_argument(
        "--expert-parallel",
        type=INT,
        default=None,
        metavar="N",
        help="--memory: ranks each MoE layer's experts are split over; divides --gpus and model.n_experts, fsdp "
        "only (default train.expert_parallel)",
    )
    i.add_argument("--batch-size", type=INT, default=None, help="--memory: micro-batch (default train.batch_size)")
    i.add_argument("--seq-len", type=INT, default=None, help="--memory: tokens per sequence (default train.seq_len)")
    i.add_argument(
        "--activation-checkpointing",
        choices=("none", "full", "selective", "sequence"),
        default=None,
        help="--memory: default train.activation_checkpointing",
    )
    i.add_argument(
        "--precision",
        choices=("fp32", "bf16-mixed", "bf16-compensated", "bf16-pure"),
        default=None,
        help="--memory: default train.precision (auto: bf16-mixed on a GPU)",
    )
    i.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="--memory: what runs the step (cpu: the CPU kernels' activations; default cuda)",
    )
    i.set_defaults(func=cmd_info)

    c = sub.add_parser(
        "config",
        help="print the resolved, validated config",
        epilog=OVERRIDES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("config", nargs="?", default=None)
    c.add_argument(
        "--help-fields",
        nargs="?",
        const="",
        default=None,
        metavar="SECTION",
        help="list every config field (or one section's) with its type and default",
    )
    c.set_defaults(func=cmd_config)

    g = sub.add_parser("generate", help="sample text from a checkpoint with the KV/SSM cache")
    g.add_argument("checkpoint")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=INT, default=100)
    g.add_argument("--temperature", type=FLOAT, default=0.8)
    g.add_argument("--top-k", type=INT, default=50)
    g.add_argument("--top-p", type=FLOAT, default=1.0)
    g.add_argument("--seed", type=INT, default=0)
    g.add_argument("--num-samples", type=INT, default=1)
    g.add_argument("--stop-at-eos", action="store_true")
    g.add_argument("--device", default="auto")
    g.add_argument(
        "--speculative",
        choices=("auto", "off"),
        default="auto",
        help="auto: the model's multi-token-prediction heads draft tokens that one forward verifies (same "
        "tokens when greedy, same distribution when sampling); off: one forward per token",
    )
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser(
        "eval",
        help="next-token loss, perplexity and bits-per-byte of a checkpoint on any data source",
        epilog="--data.FIELD VALUE sets any other data field (e.g. --data.text_field body, "
        "--data.hf_config wikitext-103-raw-v1, --data.streaming true, --data.max_tokens N)",
    )
    v.add_argument("checkpoint", help="a .pt checkpoint (ours or exported) or a distributed-checkpoint folder")
    v.add_argument(
        "--data",
        default=None,
        help="data source (as data.source): a file, folder or glob, hf:NAME[:SPLIT] "
        "or hf:NAME:CONFIG:SPLIT; default: the checkpoint's training source",
    )
    v.add_argument(
        "--split",
        choices=["val", "train", "all"],
        default=None,
        help="which part of the tokenized source: its held-out validation documents (the default for the "
        "training source), the training part, or all of it (the default with --data)",
    )
    v.add_argument("--max-tokens", type=INT, default=0, help="stop after this many predicted tokens (0: every token)")
    v.add_argument("--seq-len", type=INT, default=0, help="window length (default: the checkpoint's train.seq_len)")
    v.add_argument("--batch-size", type=INT, default=0, help="windows per forward (default: train.batch_size)")
    v.add_argument("--device", default="auto")
    v.add_argument("--json", default=None, help="also write the result to this file")
    v.add_argument("--quiet", action="store_true", help="no data-preparation messages on stderr")
    v.set_defaults(func=cmd_eval)

    h = sub.add_parser("lm-eval", help="run lm-evaluation-harness tasks on a checkpoint (optional extra: eval)")
    h.add_argument("checkpoint")
    h.add_argument("--tasks", required=True, help="comma-separated lm_eval task names")
    h.add_argument("--include-path", default=None, help="a folder of your own task YAMLs")
    h.add_argument("--limit", type=FLOAT, default=None, help="documents per task (or a fraction)")
    h.add_argument("--num-fewshot", type=INT, default=None)
    h.add_argument("--batch-size", default="1")
    h.add_argument("--device", default="auto")
    h.add_argument("--output", default=None, help="write the results as JSON to this file")
    h.set_defaults(func=cmd_lm_eval)

    d = sub.add_parser("diagnose", help="find out why a run is not learning, from its checkpoint(s)")
    d.add_argument(
        "checkpoint",
        help="checkpoint file or folder (ours, torch.save, safetensors, HF Trainer checkpoint-N/, "
        "DeepSpeed, or a distributed-checkpoint folder), or a run folder (ours, an HF "
        "output_dir, a Lightning log dir): its newest checkpoint and its history",
    )
    d.add_argument("--against", default=None, help="reference checkpoint (default: this run's step-0 checkpoint)")
    d.add_argument("--out", default=None, help="folder for report.md / report.html (default: next to the checkpoint)")
    d.add_argument("--json", default=None, help="write the findings as JSON to this path ('-' for stdout)")
    d.add_argument(
        "--fail-on",
        choices=["warning", "critical"],
        default=None,
        help="exit 1 when a finding of this severity (or worse) is found",
    )
    d.add_argument(
        "--logs",
        default=None,
        help="the run's history to read with the checkpoint: metrics.jsonl, "
        "trainer_state.json, a Lightning metrics.csv, a CSV/JSONL with a step "
        "column, or a TensorBoard event file/folder",
    )
    d.add_argument("--model", default=None, help="config/preset to rebuild the model for the model-aware probes")
    d.add_argument("--no-probe", action="store_true", help="skip the model-aware probes (checkpoint analysis only)")
    d.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow checkpoints that need arbitrary unpickling (only for files you trust)",
    )
    d.add_argument("--quiet", action="store_true", help="no console report, no progress bar")
    d.set_defaults(func=cmd_diagnose)

    e = sub.add_parser(
        "export",
        help="a distributed (sharded) checkpoint folder -> one .pt file; or a checkpoint -> "
        "a Hugging Face model folder (--hf DIR)",
    )
    e.add_argument("checkpoint")
    e.add_argument("output", nargs="?", default=None)
    e.add_argument(
        "--hf",
        default=None,
        metavar="DIR",
        help="write a Hugging Face folder (config, safetensors, tokenizer, modeling code) for trust_remote_code",
    )
    e.add_argument("--max-shard-size", default="5GB", help="safetensors shard size for --hf (e.g. 500MB)")
    e.set_defaults(func=cmd_export)

    r = sub.add_parser("reproduce-seed", help="reproduce the seed report's frozen-norm bug (or its fix), then diagnose")
    r.add_argument("--precision", default="bf16-pure", choices=["bf16-pure", "bf16-mixed", "bf16-compensated", "fp32"])
    r.add_argument("--steps", type=INT, default=60)
    r.add_argument("--out", default="runs")
    r.set_defaults(func=cmd_reproduce_seed)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        argv, overrides = extract_overrides(list(sys.argv[1:] if argv is None else argv))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args, rest = parser.parse_known_args(argv)
    try:
        _refuse_empty(args)
        return args.func(args, rest + overrides)
    except (ConfigError, DataError, CheckpointError, UsageError, KernelISAError, OutputError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
