"""The diagnosis as ``report.md``, ``report.html`` (with plots) and a stable JSON document.

JSON schema ``moe_arch.diagnosis/1``::

    {
      "schema": "moe_arch.diagnosis/1",
      "status": "critical" | "warning" | "inconclusive" | "untrained" | "healthy",
      "inconclusive": [what is missing for a verdict, and which flag or file would give one],
      "checkpoint": {"path", "format", "step", "epoch", "tokens_seen", "reference", "n_tensors",
                     "n_parameters", "params_total", "params_active", "dtypes": {dtype: n_tensors},
                     "precision", "config", "stack": [the stack keys that wrote it, most specific first: the
                     optimizer library (torchao, optimi), the trainer (moe_arch, hf-trainer, lightning, deepspeed,
                     ...), torch; each finding's recommendation is worded for the first one its cause has a fix for]},
      "findings": [{"cause", "severity", "summary", "tensors": [names], "experts": {module: [ids]} (dead_experts
                    only), "evidence": {...}, "recommendation"}],
      "optimizers": [{"name", "kind", "mapping", "n_params", "n_mapped", "n_with_state", "groups": [...],
                      "ambiguous": [...]}],
      "probe": {...} | null,
      "notes": [str]
    }

``cause`` is the name of a registered cause (:mod:`moe_arch.doctor.causes`: the checkpoint causes, and with a
run's history the curve causes); ``severity`` is critical (tensors cannot learn at all) or warning.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from moe_arch.doctor.analyze import TensorEvidence
from moe_arch.doctor.causes import REGISTRY, Finding, describe, fmt, is_curve, pattern_groups
from moe_arch.utils import OutputError, os_reason, write_output

SCHEMA = "moe_arch.diagnosis/1"


@dataclass
class Diagnosis:
    status: str
    checkpoint: dict
    findings: list[Finding]
    optimizers: list[dict]
    evidence: list[TensorEvidence]
    probe: dict | None
    notes: list[str]
    inconclusive: list[str] = field(default_factory=list)  # what is missing for a verdict (status inconclusive)
    history: Any = None  # the run's History (moe_arch.doctor.history) when one was read

    def history_json(self) -> dict | None:
        h = self.history
        if h is None:
            return None
        return {
            "path": str(h.path),
            "format": h.format,
            "series": h.found(),
            "unmapped": h.unmapped,
            "points": {n: len(s.values) for n, s in h.series.items() if s.values},
        }

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA,
            "status": self.status,
            "inconclusive": self.inconclusive,
            "checkpoint": self.checkpoint,
            "findings": [f.to_dict() for f in self.findings],
            "optimizers": self.optimizers,
            "probe": self.probe,
            "notes": self.notes,
            "history": self.history_json(),
        }


# ---------------------------------------------------------------------------------------------- blocks
# A tiny document model rendered to both Markdown and HTML, so the two reports say the same thing.
def H(level, text):
    return ("h", level, text)


def P(text):
    return ("p", text)


def UL(items):
    return ("ul", items)


def OL(items):
    return ("ol", items)


def TABLE(header, rows):
    return ("table", header, rows)


def IMG(png_b64, alt):
    return ("img", png_b64, alt)


def to_markdown(blocks) -> str:
    out = []
    for b in blocks:
        if b[0] == "h":
            out.append("#" * b[1] + " " + b[2])
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "ul":
            out.append("\n".join(f"- {x}" for x in b[1]))
        elif b[0] == "ol":
            out.append("\n".join(f"{i}. {x}" for i, x in enumerate(b[1], 1)))
        elif b[0] == "table":
            header, rows = b[1], b[2]
            out.append(
                "| "
                + " | ".join(header)
                + " |\n| "
                + " | ".join("---" for _ in header)
                + " |\n"
                + "\n".join("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows)
            )
        elif b[0] == "img":
            out.append(f"*(plot in report.html: {b[2]})*")
    return "\n\n".join(out) + "\n"


def _inline_html(s: str) -> str:
    s = html.escape(s)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


def to_html(blocks, title: str) -> str:
    body = []
    for b in blocks:
        if b[0] == "h":
            body.append(f"<h{b[1]}>{_inline_html(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            body.append(f"<p>{_inline_html(b[1])}</p>")
        elif b[0] in ("ul", "ol"):
            body.append(f"<{b[0]}>" + "".join(f"<li>{_inline_html(x)}</li>" for x in b[1]) + f"</{b[0]}>")
        elif b[0] == "table":
            body.append(
                "<table><thead><tr>"
                + "".join(f"<th>{_inline_html(h)}</th>" for h in b[1])
                + "</tr></thead><tbody>"
                + "".join("<tr>" + "".join(f"<td>{_inline_html(str(c))}</td>" for c in r) + "</tr>" for r in b[2])
                + "</tbody></table>"
            )
        elif b[0] == "img":
            body.append(
                f'<figure><img alt="{html.escape(b[2])}" src="data:image/png;base64,{b[1]}"/>'
                f"<figcaption>{html.escape(b[2])}</figcaption></figure>"
            )
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;"
        "font-size:90%}code{background:#f3f3f3;padding:0 3px}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


# ---------------------------------------------------------------------------------------------- plots
def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib  # lazy: a second or so to import, paid only by reports that draw a plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above, and only after the backend is chosen

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def change_heatmap(evidence: list[TensorEvidence]) -> str | None:
    matched = [
        (m, e) for e in evidence if e.rel_change is not None and (m := re.match(r"^(.*?)\.(\d+)\.(.+)$", e.name))
    ]  # the first numeric segment is the layer
    if not matched:
        return None
    # Rows are the layers of the stack (the most common prefix, e.g. "layers"); other numbered modules such as
    # prediction heads are not layers and stay out of the grid.
    prefixes = [m.group(1) for m, _ in matched]
    stack = max(set(prefixes), key=prefixes.count)
    cells: dict[tuple[int, str], float] = {
        (int(m.group(2)), m.group(3)): e.rel_change for m, e in matched if m.group(1) == stack
    }
    if not cells:
        return None
    plt = _pyplot()
    layers = sorted({k[0] for k in cells})
    kinds = sorted({k[1] for k in cells})
    grid = np.full((len(layers), len(kinds)), np.nan)
    for (l, k), v in cells.items():
        grid[layers.index(l), kinds.index(k)] = math.log10(max(v, 1e-12))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(kinds) + 2), max(3, 0.3 * len(layers) + 1.5)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(kinds)), kinds, rotation=75, fontsize=7)
    ax.set_yticks(range(len(layers)), [str(l) for l in layers], fontsize=7)
    fig.colorbar(im, ax=ax, label="log10 relative change ||w - w0|| / ||w0||")
    ax.set_ylabel(f"{stack} index")
    ax.set_title("Relative change since the reference (darkest: bitwise unchanged; white: no such tensor)")
    return _png(fig)


def expert_heatmap(router: dict) -> str | None:
    if not router:
        return None
    plt = _pyplot()
    layers = sorted(router, key=int)
    grid = np.array([router[l]["share"] for l in layers])
    fig, ax = plt.subplots(figsize=(max(5, 0.4 * grid.shape[1] + 2), max(2.5, 0.35 * len(layers) + 1.5)))
    im = ax.imshow(grid, aspect="auto", cmap="magma")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(len(layers)), [str(l) for l in layers])
    fig.colorbar(im, ax=ax, label="share of routed tokens")
    ax.set_title("Expert load on a real batch")
    return _png(fig)


# ---------------------------------------------------------------------------------------------- report
HISTORY_PANELS = (
    ("loss", ("loss", "lm_loss", "eval_loss")),
    ("learning rate", ("lr", "lr/")),
    ("gradient norm", ("grad_norm",)),
)


def history_plot(h, findings: list[Finding]) -> str | None:
    """Loss, learning rate and gradient norm against the step, each curve finding marked at its first step."""
    panels = []
    for title, names in HISTORY_PANELS:
        series = [
            s
            for n, s in sorted(h.series.items())
            if s.values and any(n == x or (x.endswith("/") and n.startswith(x)) for x in names)
        ]
        if series:
            panels.append((title, series))
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.4 * len(panels)), sharex=True, squeeze=False)
    marks = [(f.evidence["first_step"], f.cause) for f in findings if isinstance(f.evidence.get("first_step"), int)]
    for ax, (title, series) in zip(axes[:, 0], panels):
        for s in series[:8]:
            finite = [(a, b) for a, b in zip(s.steps, s.values) if math.isfinite(b)]
            if finite:
                ax.plot(*zip(*finite), label=s.name, lw=1)
        if title == "gradient norm" or title == "learning rate" and all(v > 0 for s in series for v in s.values):
            ax.set_yscale("log")
        for step, cause in marks:
            ax.axvline(step, color="red", lw=0.8, ls="--")
        ax.set_ylabel(title)
        ax.legend(fontsize=7, loc="best")
    for step, cause in marks:
        axes[0, 0].annotate(
            cause,
            (step, 1),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            color="red",
            rotation=90,
            va="top",
            ha="right",
        )
    axes[-1, 0].set_xlabel("step")
    return _png(fig)


def build_blocks(d: Diagnosis, plots: bool = True):
    ck = d.checkpoint
    crit = [f for f in d.findings if f.severity == "critical"]
    warn = [f for f in d.findings if f.severity == "warning"]
    status_word = d.status.upper()
    blocks = [H(1, "Training Diagnostic Report"), H(2, "Executive summary")]
    if crit or warn:
        head = (
            f"**Status: {status_word}.** {len(crit + warn)} root cause(s), ranked by severity, then by the number "
            "of tensors:"
            if crit
            else f"**Status: {status_word}.** {len(warn)} warning(s); no tensor is prevented from learning:"
        )
        blocks.append(P(head))
        blocks.append(
            UL(
                [
                    f"`{f.cause}` ({f.severity}, {len(f.tensors)} tensors): {f.summary}. **Fix:** {f.recommendation}."
                    for f in crit + warn
                ]
            )
        )
    elif d.status == "untrained":
        blocks.append(P(f"**Status: {status_word}.** Nothing trained yet: the checkpoint records 0 optimizer steps."))
    elif d.status == "inconclusive":
        blocks.append(
            P(f"**Status: {status_word}.** No problem was found, but the evidence cannot support a verdict of healthy:")
        )
        blocks.append(UL(list(d.inconclusive)))
    else:
        blocks.append(
            P(
                f"**Status: {status_word}.** Every parameter has optimizer state and, where a reference is "
                "available, has changed; no precision, learning-rate, gradient or routing problem was found."
            )
        )
    blocks.append(H(2, "Checkpoint"))
    rows = [["path", ck.get("path")], ["format", ck.get("format")], ["optimizer steps", ck.get("optimizer_steps")]]
    if ck.get("stack"):
        rows.insert(2, ["stack (the fixes are worded for it)", ", ".join(ck["stack"])])
    if ck.get("step") is not None and ck.get("step") != ck.get("optimizer_steps"):
        rows.append(["step counter as saved (see notes)", ck.get("step")])
    rows += [
        ["epoch", ck.get("epoch")],
        ["tokens seen", ck.get("tokens_seen")],
        ["tensors", ck.get("n_tensors")],
        ["parameters (elements)", ck.get("n_parameters")],
        ["dtypes", fmt(ck.get("dtypes"))],
        ["precision policy", ck.get("precision")],
        ["reference for change", ck.get("reference") or "none (change-based evidence unavailable)"],
    ]
    if ck.get("params_total"):
        rows.append(["total / active parameters", f"{ck['params_total']:,} / {ck['params_active']:,}"])
    if ck.get("config_summary"):
        rows.append(["model", ck["config_summary"]])
    blocks.append(TABLE(["field", "value"], [[a, "" if b is None else b] for a, b in rows]))

    for title, group in (("Critical findings", crit), ("Warnings", warn)):
        if not group:
            continue
        blocks.append(H(2, title))
        for f in group:
            what = "series" if is_curve(f.cause) else "tensors"
            blocks.append(H(3, f"`{f.cause}` ({f.severity}): {len(f.tensors)} {what}"))
            blocks.append(P(f.summary + "."))
            blocks.append(UL([f"`{p}` \u00d7{c}" if c > 1 else f"`{p}`" for p, c in pattern_groups(f.tensors)[:30]]))
            blocks.append(
                TABLE(["evidence", "value"], [[k, fmt(v)] for k, v in f.evidence.items() if k not in ("modules",)])
            )
            blocks.append(P(f"**Fix:** {f.recommendation}."))

    blocks.append(H(2, "Root cause: the evidence that decided it"))
    if not d.findings:
        blocks.append(
            P(
                "No rule fired. The checks that ran: optimizer coverage of every tensor, learning rates, "
                "optimizer state, the bf16/fp16 rounding rule, per-expert change, and relative-change "
                "outliers."
            )
        )
    for f in d.findings:
        blocks.append(P(f"`{f.cause}`: " + _chain(f)))

    blocks.append(H(2, "What is working"))
    blocks.append(UL(_working(d)))

    if d.history is not None:
        h = d.history
        blocks.append(H(2, "Run history"))
        series = ", ".join(f"`{n}`" for n in h.found()[:20]) or "no series"
        blocks.append(
            P(
                f"Read from `{h.path}` ({h.format}): {series}"
                + (f"; not mapped to the schema: {', '.join(h.unmapped[:12])}" if h.unmapped else "")
                + "."
            )
        )
        if plots:
            img = history_plot(h, [f for f in d.findings if is_curve(f.cause)])
            if img:
                blocks.append(
                    IMG(img, "loss, learning rate and gradient norm; dashed: where each curve finding starts")
                )

    blocks.append(H(2, "Optimizer configuration"))
    if d.optimizers:
        orows = []
        for o in d.optimizers:
            for gi, g in enumerate(o["groups"]):
                orows.append(
                    [
                        o["name"],
                        o["kind"],
                        gi,
                        fmt(g.get("lr")),
                        fmt(g.get("initial_lr", "-")),
                        fmt(g.get("weight_decay", "-")),
                        o["mapping"],
                    ]
                )
        blocks.append(TABLE(["optimizer", "kind", "group", "lr", "initial lr", "weight decay", "name mapping"], orows))
        for o in d.optimizers:
            blocks.append(
                P(
                    f"`{o['name']}`: {o['n_params']} parameters, {o['n_mapped']} mapped to tensor names "
                    f"({o['mapping']}), {o['n_with_state']} with state."
                )
            )
            if o["ambiguous"]:
                blocks.append(
                    P(
                        f"**Ambiguous mapping:** {len(o['ambiguous'])} parameters of `{o['name']}` match "
                        "several tensors by shape and order; they are not attributed to a name. First: "
                        + "; ".join(
                            f"#{a['index']} could be {', '.join(a['candidates'][:3])}" for a in o["ambiguous"][:3]
                        )
                    )
                )
    else:
        blocks.append(
            P(
                "The checkpoint holds no optimizer state: optimizer coverage, learning rates and the expected "
                "update size could not be checked."
            )
        )

    if d.probe:
        pr = d.probe
        blocks.append(H(2, "Model-aware probe (one real batch)"))
        blocks.append(
            P(
                f"{pr['batch_tokens']} tokens from {pr['text_source']}: loss {pr['loss']:.4f} "
                f"(next-token {pr['lm_loss']:.4f})."
            )
        )
        blocks.append(
            UL(
                [
                    f"tensors with a gradient: {len(pr['grad_norms'])}",
                    f"no gradient (unused in the forward): {describe(pr['no_grad']) or 'none'}",
                    f"all-zero gradient: {describe(pr['zero_grad']) or 'none'}",
                    f"non-finite gradient: {describe(pr['nonfinite_grad']) or 'none'}",
                ]
                + [f"expert slices with zero gradient in `{k}`: {v}" for k, v in pr["expert_zero_grad"].items()]
            )
        )
        if pr["router"]:
            blocks.append(
                TABLE(
                    ["MoE layer", "tokens per expert", "entropy (norm.)", "Gini", "max/mean", "dead"],
                    [
                        [
                            l,
                            fmt(r["tokens_per_expert"]),
                            f"{r['entropy_normalised']:.3f}",
                            f"{r['gini']:.3f}",
                            f"{r['max_over_mean']:.2f}",
                            r["dead_experts"] or "none",
                        ]
                        for l, r in sorted(pr["router"].items(), key=lambda kv: int(kv[0]))
                    ],
                )
            )
        if pr["mod"]:
            blocks.append(
                TABLE(
                    ["MoD block", "selected fraction", "capacity", "router weight mean", "std"],
                    [
                        [
                            l,
                            f"{m['selected_fraction']:.3f}",
                            m["capacity"],
                            f"{m['router_weight_mean']:.3f}",
                            f"{m['router_weight_std']:.3f}",
                        ]
                        for l, m in sorted(pr["mod"].items(), key=lambda kv: int(kv[0]))
                    ],
                )
            )
        if plots:
            img = expert_heatmap(pr["router"])
            if img:
                blocks.append(IMG(img, "expert load heatmap (MoE layer x expert)"))
    if plots:
        img = change_heatmap(d.evidence)
        if img:
            blocks.append(IMG(img, "relative change heatmap (layer x tensor kind)"))

    blocks.append(H(2, "Recommended actions"))
    recs = []
    for f in d.findings:
        if f.recommendation not in recs:
            recs.append(f.recommendation)
    blocks.append(OL(recs or ["nothing to fix; keep the step-0 checkpoint so later diagnoses can measure change"]))
    if d.notes:
        blocks.append(H(2, "Notes"))
        blocks.append(UL(d.notes))
    return blocks


def _chain(f: Finding) -> str:
    c = REGISTRY.get(f.cause)
    return c.explain(f) if c is not None else f.summary


def _working(d: Diagnosis) -> list[str]:
    bad = {t for f in d.findings for t in f.tensors}
    good = [e for e in d.evidence if e.name not in bad and not e.buffer_like]
    out = []
    by_role: dict[str, list[TensorEvidence]] = defaultdict(list)
    for e in good:
        by_role[e.role].append(e)
    for role, es in sorted(by_role.items(), key=lambda kv: -len(kv[1])):
        moved = [e for e in es if e.has_reference and e.unchanged is False]
        rc = sorted(e.rel_change for e in moved if e.rel_change is not None)
        med = f", median relative change {rc[len(rc) // 2]:.3g}" if rc else ""
        state = sum(1 for e in es if e.has_state)
        out.append(
            f"{role}: {len(es)} tensors"
            + (f", {len(moved)} changed since the reference{med}" if any(e.has_reference for e in es) else "")
            + (f", {state} with optimizer state" if d.optimizers else "")
        )
    return out or ["no tensor is free of findings"]


def write_reports(d: Diagnosis, out_dir: Path, plots: bool = True) -> tuple[Path, Path]:
    """report.md and report.html, each written atomically: a failed write (a full disk) is one line
    (:class:`moe_arch.utils.OutputError`) and leaves each file either whole or as it was."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(
            f"--out {out_dir}: cannot create the report folder ({os_reason(e)}); choose another --out"
        ) from None
    blocks = build_blocks(d, plots)
    md = out_dir / "report.md"
    htm = out_dir / "report.html"
    write_output(md, to_markdown(blocks), "diagnosis report", "--out")
    write_output(htm, to_html(blocks, f"Diagnosis of {d.checkpoint.get('path')}"), "diagnosis report", "--out")
    return md, htm


def write_json(d: Diagnosis, path: str) -> None:
    text = json.dumps(d.to_json(), indent=2, default=str)
    if path == "-":
        print(text)
    else:
        write_output(path, text + "\n", "JSON report", "--json")


# ---------------------------------------------------------------------------------------------- publishing
def report_dir(checkpoint: str | Path, out: str | Path | None) -> Path:
    """Where the reports go: ``out``, or next to the checkpoint (never inside a checkpoint folder)."""
    src = Path(checkpoint)
    return Path(out) if out else src.parent / f"diagnosis-{src.stem if src.is_file() else src.name}"


def publish(d: Diagnosis, out_dir: Path, json_path: str | None = None, quiet: bool = False) -> Path:
    """Write report.md / report.html in ``out_dir`` (see :func:`report_dir`), the JSON document when asked, and the
    console summary; returns the report folder."""
    md, htm = write_reports(d, out_dir)
    if json_path:
        write_json(d, json_path)
    if not quiet:
        print_summary(d, md, htm)
    return out_dir


def print_summary(d: Diagnosis, md: Path, htm: Path) -> None:
    con = Console(highlight=False)
    color = {
        "critical": "red",
        "warning": "yellow",
        "inconclusive": "magenta",
        "untrained": "cyan",
        "healthy": "green",
    }[d.status]
    ck = d.checkpoint
    con.print(
        f"[bold]{ck['path']}[/] ({', '.join(ck.get('stack') or [ck['format']])}, optimizer step "
        f"{ck.get('optimizer_steps')}, "
        f"{ck['n_tensors']} tensors; reference: {ck['reference'] or 'none'})"
    )
    con.print(f"status: [bold {color}]{d.status.upper()}[/]")
    for f in d.findings:
        c = "red" if f.severity == "critical" else "yellow"
        con.print(f"  [{c}]{f.severity}[/] {f.cause}: {f.summary}")
        con.print(f"    fix: {f.recommendation}")
    for r in d.inconclusive:
        con.print(f"  [magenta]missing evidence[/]: {r}")
    for n in d.notes:
        con.print(f"  [dim]note: {n}[/]")
    con.print(f"report: {md} and {htm}")
