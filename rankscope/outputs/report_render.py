"""Render report sections as one self-contained HTML file and as Markdown with PNGs beside it.

HTML: inline CSS, figures as base64 ``data:`` PNGs, no script, no external URL: it opens
offline. Markdown: the same text and tables, figures saved to ``report_files/``.
"""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import pandas as pd

from rankscope.store.atomic import atomic_dir, atomic_write_text
from rankscope.store.provenance import now

CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1b1b1b;margin:0;background:#fafafa}
main{max-width:1100px;margin:0 auto;padding:24px 32px;background:#fff}
h1{font-size:1.6em;margin:.2em 0}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
h3{font-size:1.05em}.meta{color:#666}nav ol{columns:2;margin:0}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right}th{background:#f2f2f2}
td.l,td:first-child,th:first-child{text-align:left}caption{caption-side:top;text-align:left;color:#555;padding:.2em 0}
pre{background:#f6f8fa;padding:10px;overflow-x:auto;font-size:.85em}code{font-family:ui-monospace,monospace}
.note{color:#666;font-style:italic}
"""


def _inline(text: str) -> str:
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    t = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", t)
    return re.sub(r"(?<![\w])_([^_]+)_(?![\w])", r"<em>\1</em>", t)


def md_to_html(text: str) -> str:
    """The small Markdown subset rankscope writes: headings (one level down), bullets, pipe
    tables, fenced code, bold, italics, inline code and paragraphs."""
    out, para, lines, i = [], [], text.splitlines(), 0

    def flush():
        if para:
            out.append("<p>" + _inline(" ".join(para)) + "</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            flush()
            j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("```")), len(lines))
            out.append("<pre><code>" + html.escape("\n".join(lines[i + 1:j])) + "</code></pre>")
            i = j + 1
            continue
        if m := re.match(r"(#{1,5})\s+(.*)", line):
            flush()
            level = min(len(m.group(1)) + 1, 6)
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
        elif line.startswith("|"):
            flush()
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            rows = [[c.strip() for c in re.split(r"(?<!\\)\|", r.strip())[1:-1]] for r in lines[i:j]]
            body = [r for r in rows[1:] if not all(set(c) <= set("-: ") for c in r)]
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in rows[0]) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>"
                                 for r in body) + "</table>")
            i = j
            continue
        elif line.startswith("- "):
            flush()
            j = i
            while j < len(lines) and lines[j].startswith("- "):
                j += 1
            out.append("<ul>" + "".join(f"<li>{_inline(x[2:])}</li>" for x in lines[i:j]) + "</ul>")
            i = j
            continue
        elif not line.strip():
            flush()
        else:
            para.append(line)
        i += 1
    flush()
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if pd.isna(v) else f"{v:.4g}"
    return "" if v is None or v is pd.NA else str(v)


def _html_table(caption: str, df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    left = ["" if pd.api.types.is_numeric_dtype(df[c]) else ' class="l"' for c in df.columns]
    body = "".join("<tr>" + "".join(f"<td{a}>{html.escape(_fmt(v))}</td>" for a, v in zip(left, row))
                   + "</tr>" for row in df.itertuples(index=False))
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    table = f"<table>{cap}<tr>{head}</tr>{body}</table>"
    if len(df) > 30:
        return f"<details><summary>{html.escape(caption or 'table')} ({len(df)} rows)</summary>{table}</details>"
    return table


def write_html(path: Path, title: str, sections) -> Path:
    """One self-contained HTML page: inline CSS, base64 figures, no external resource."""
    nav = "".join(f'<li><a href="#{s.anchor}">{html.escape(s.title)}</a></li>' for s in sections)
    parts = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
             f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body><main>",
             f"<h1>{html.escape(title)}</h1><p class=\"meta\">Written by rankscope on {now()}.</p>",
             f"<nav><ol>{nav}</ol></nav>"]
    for n, s in enumerate(sections, 1):
        parts.append(f'<section id="{s.anchor}"><h2>{n}. {html.escape(s.title)}</h2>')
        for b in s.blocks:
            if b[0] == "md":
                parts.append(md_to_html(b[1]))
            elif b[0] == "table":
                parts.append(_html_table(b[1], b[2]))
            elif b[0] == "code":
                parts.append(f'<pre><code class="{b[1]}">{html.escape(b[2])}</code></pre>')
            else:
                data = base64.b64encode(b[2]).decode()
                parts.append(f'<figure><img alt="{html.escape(b[1])}" src="data:image/png;base64,'
                             f'{data}"><figcaption>{html.escape(b[1])}</figcaption></figure>')
        parts.append("</section>")
    parts.append("</main></body></html>\n")
    atomic_write_text(path, "\n".join(parts))
    return path


def write_markdown(path: Path, title: str, sections) -> Path:
    """The report as Markdown; figures as PNG files in ``<path stem>_files/``.

    The figures folder is written whole beside its final name and renamed into place, then
    the Markdown; a failure leaves the previous report and its figures as they were.
    """
    from rankscope.recommend.text import md_table

    files = path.with_name(f"{path.stem}_files")
    lines = [f"# {title}", "", f"Written by rankscope on {now()}.", ""]
    lines += [f"{n}. [{s.title}](#{s.anchor})" for n, s in enumerate(sections, 1)] + [""]
    pngs = {}
    for n, s in enumerate(sections, 1):
        lines += [f'<a id="{s.anchor}"></a>', f"## {n}. {s.title}", ""]
        for b in s.blocks:
            if b[0] == "md":
                lines += [re.sub(r"^(#{1,4}) ", r"#\1 ", b[1], flags=re.M), ""]
            elif b[0] == "table":
                lines += ([f"_{b[1]}_", ""] if b[1] else []) + [md_table(b[2]), ""]
            elif b[0] == "code":
                lines += [f"```{b[1]}", b[2].rstrip(), "```", ""]
            else:
                pngs[f"{b[3]}.png"] = b[2]
                lines += [f"![{b[1]}]({files.name}/{b[3]}.png)", "", f"_{b[1]}_", ""]
    with atomic_dir(files, overwrite=True) as tmp:
        for name, data in pngs.items():
            (tmp / name).write_bytes(data)          # inside the folder that is renamed whole
    atomic_write_text(path, "\n".join(lines))
    return path
