"""Render the report's sections as Markdown (``report.md``, figures beside it) and as one
self-contained HTML page (``report.html``, figures embedded as base64 PNG)."""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

from bonbench.tables import to_markdown


@dataclass
class Section:
    """A heading, paragraphs, then any tables (title, DataFrame) and figures (caption, PNG path)."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[tuple[str, object]] = field(default_factory=list)
    figures: list[tuple[str, Path]] = field(default_factory=list)


def _cell(value, digits: int) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def html_table(frame, digits: int = 3) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v, digits))}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def render_markdown(title: str, sections: list[Section], folder: Path) -> str:
    parts = [f"# {title}", ""]
    for section in sections:
        parts += [f"## {section.title}", ""]
        for paragraph in section.paragraphs:
            parts += [paragraph, ""]
        for caption, frame in section.tables:
            if caption:
                parts += [f"**{caption}**", ""]
            parts += [to_markdown(frame, digits=3), ""]
        for caption, path in section.figures:
            parts += [f"![{caption}]({Path(path).relative_to(folder)})", "", f"*{caption}*", ""]
    return "\n".join(parts)


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 68rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1rem 0; } img { max-width: 100%; } figcaption { color: #555; font-size: 0.9rem; }
code { background: #f3f3f3; padding: 0 0.2rem; }
"""


def _inline(text: str) -> str:
    """Escape text; `code` and **bold** as in the Markdown."""
    out, parts = [], html.escape(text).split("`")
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<code>{part}</code>")
        else:
            bits = part.split("**")
            out.append("".join(f"<strong>{b}</strong>" if j % 2 else b for j, b in enumerate(bits)))
    return "".join(out)


def render_html(title: str, sections: list[Section]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        body += [f"<p>{_inline(p)}</p>" for p in section.paragraphs]
        for caption, frame in section.tables:
            if caption:
                body.append(f"<p><strong>{html.escape(caption)}</strong></p>")
            body.append(html_table(frame))
        for caption, path in section.figures:
            data = base64.b64encode(Path(path).read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>")


def write_report(folder: Path, title: str, sections: list[Section]) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``folder``; return both paths."""
    md, page = folder / "report.md", folder / "report.html"
    md.write_text(render_markdown(title, sections, folder))
    page.write_text(render_html(title, sections))
    return md, page
