"""Rebuild moe_arch/data/corpus/corpus.jsonl.gz from Debian packages (run once by a developer; the result is
committed, so training never downloads anything).

    mkdir -p /tmp/deb && cd /tmp/deb && apt-get download jargon-text python3.11-doc
    for f in *.deb; do dpkg -x "$f" x; done
    python tools/build_corpus.py /tmp/deb/x

Sources and licences (see moe_arch/data/corpus/SOURCES.md):
- The Jargon File 4.4.7 (Eric S. Raymond et al.), public domain: one document per lexicon entry, plus the
  introduction and appendices.
- Python 3.11 documentation sources (tutorial, HOWTOs, FAQ, glossary, language reference), PSF License v2:
  one document per section.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path


def reflow(block: list[str]) -> str:
    """Join the wrapped lines of each paragraph; keep paragraph breaks."""
    paras, cur = [], []
    for line in block:
        s = line.strip()
        if not s:
            if cur:
                paras.append(" ".join(cur))
                cur = []
        else:
            cur.append(s)
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


def jargon_docs(text: str) -> list[str]:
    lines = text.replace("\u00a0", " ").splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("   :0:"))
    end = next(i for i, l in enumerate(lines) if l.startswith("Appendix A. Hacker Folklore"))
    intro_start = next(i for i, l in enumerate(lines) if l.startswith("Chapter 1."))
    docs = []
    entry_re = re.compile(r"^   :(.+?):\s*(.*)$")
    cur: list[str] = []
    head = None
    for line in lines[start:end]:
        m = entry_re.match(line)
        if m:
            if head is not None:
                docs.append(f"{head}\n\n{reflow(cur)}")
            head = f"{m.group(1)}: {m.group(2)}".strip()
            cur = []
        elif head is not None:
            cur.append(line)
    if head is not None:
        docs.append(f"{head}\n\n{reflow(cur)}")
    # Introduction chapters and appendices: split on chapter/appendix headings.
    for lo, hi in ((intro_start, start), (end, len(lines))):
        section: list[str] = []
        for line in lines[lo:hi]:
            if re.match(r"^(Chapter \d+\.|Appendix [A-Z]\.|Bibliography)", line) and section:
                body = reflow(section)
                if len(body) > 200 and "│" not in body:
                    docs.append(body)
                section = []
            section.append(line)
        body = reflow(section)
        if len(body) > 200 and "│" not in body:
            docs.append(body)
    return [d for d in docs if len(d) > 40]


def rst_docs(root: Path) -> list[str]:
    docs = []
    for sub in ("tutorial", "howto", "faq", "reference"):
        for path in sorted((root / sub).glob("*.rst.txt")):
            docs.extend(split_rst(path.read_text(encoding="utf-8")))
    glossary = root / "glossary.rst.txt"
    if glossary.exists():
        docs.extend(split_rst(glossary.read_text(encoding="utf-8")))
    return docs


def split_rst(text: str) -> list[str]:
    # Drop index directives, labels and comments; keep prose and examples.
    out, skip = [], False
    for line in text.splitlines():
        if re.match(r"^\.\. (index|_[^:]+:|sectionauthor|moduleauthor|highlight)", line) or line.startswith(".. |"):
            skip = line.startswith(".. index")
            continue
        if skip and (line.startswith("   ") or not line.strip()):
            continue
        skip = False
        out.append(line.rstrip())
    text = "\n".join(out)
    # One document per top-level section (a title underlined with === or ---).
    parts = re.split(r"\n(?=[^\n]+\n[=\-]{3,}\n)", text)
    return [re.sub(r"\n{3,}", "\n\n", p).strip() for p in parts if len(p.strip()) > 200]


def main(root: str) -> None:
    root_p = Path(root)
    jargon = gzip.decompress((root_p / "usr/share/doc/jargon-text/jargon.txt.gz").read_bytes()).decode("utf-8")
    docs = [("jargon-file-4.4.7", d) for d in jargon_docs(jargon)]
    docs += [("python-3.11-docs", d) for d in rst_docs(root_p / "usr/share/doc/python3.11/html/_sources")]
    out = Path(__file__).resolve().parents[1] / "moe_arch/data/corpus/corpus.jsonl.gz"
    payload = "".join(json.dumps({"source": s, "text": t}, ensure_ascii=False) + "\n" for s, t in docs)
    # mtime=0 keeps the gzip bytes reproducible.
    out.write_bytes(gzip.compress(payload.encode("utf-8"), compresslevel=9, mtime=0))
    n_chars = sum(len(t) for _, t in docs)
    print(f"{len(docs)} documents, {n_chars / 1e6:.2f}M characters -> {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main(sys.argv[1])
