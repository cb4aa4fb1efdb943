"""``moe-arch diagnose``: the parsed flags -> the pipeline (:mod:`moe_arch.doctor.pipeline`) -> the reports -> an
exit code."""

from __future__ import annotations

import argparse
import sys

from moe_arch.checkpoint.readers import LoadError
from moe_arch.config import ConfigError, load_config
from moe_arch.doctor.pipeline import DiagnoseOptions, diagnose, locate
from moe_arch.doctor.report import publish, report_dir
from moe_arch.utils import OutputError, refuse_overwriting_inputs, writable_file, writable_folder

# Exit codes. With --fail-on, an inconclusive diagnosis exits 3: a CI gate must not pass on missing evidence, and
# it is told apart from a problem found (1). Untrained checkpoints exit 0 (nothing to judge yet).
EXIT_OK, EXIT_FAIL_ON, EXIT_BAD_INPUT, EXIT_INCONCLUSIVE = 0, 1, 2, 3


def run_diagnose(args: argparse.Namespace) -> int:
    options = DiagnoseOptions(
        against=args.against,
        model_config=args.model,
        probe=not args.no_probe,
        trust_pickle=args.trust_pickle,
        progress=not args.quiet,
        logs=args.logs,
    )
    try:
        # Where the reports will go must take files before the analysis runs (it may take minutes).
        target = locate(args.checkpoint, args.logs)
        out_dir = report_dir(target.path, args.out)
        writable_folder(out_dir, "diagnosis report", "--out")
        if args.json and args.json != "-":
            refuse_overwriting_inputs(
                args.json,
                {
                    "checkpoint": target.path,
                    "reference (--against)": args.against,
                    "history (--logs)": args.logs,
                    "model config (--model)": args.model,
                },
                "--json",
                "JSON report",
            )
            writable_file(args.json, "JSON report", "--json", "diagnosis.json")
        if args.model:  # before the analysis: a misspelt --model is one line at once, not after minutes
            try:
                load_config(args.model)
            except ConfigError as e:
                raise ConfigError(f"diagnose --model: {e}") from None
    except (LoadError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        d = diagnose(target, options)
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        publish(d, out_dir, args.json, quiet=args.quiet or args.json == "-")
    except OutputError as e:  # a disk that filled up during the analysis
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.fail_on == "critical" and d.status == "critical":
        return EXIT_FAIL_ON
    if args.fail_on == "warning" and d.status in ("critical", "warning"):
        return EXIT_FAIL_ON
    if args.fail_on and d.status == "inconclusive":
        return EXIT_INCONCLUSIVE
    return EXIT_OK
