"""A static, self-contained report.html: inline CSS, tables, and the PNGs by relative path."""

from __future__ import annotations

import html
from pathlib import Path

from loralab.io import atomic_write_text

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
tr.reference td { color: #666; font-style: italic; }
tr.base td { background: #fafafa; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.gallery { display: flex; flex-wrap: wrap; gap: 0.5em; }
.gallery img { max-width: 32%; }
.note { color: #555; font-size: 0.9em; }
"""


def html_table(header: list[str], body: list[list[str]], row_classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    lines = [f"<table><thead><tr>{head}</tr></thead><tbody>"]
    for i, cells in enumerate(body):
        cls = f' class="{html.escape(row_classes[i])}"' if row_classes else ""
        tds = "".join(f"<td>{html.escape(c)}</td>" for c in cells)
        lines.append(f"<tr{cls}>{tds}</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _image(path: Path, base: Path, alt: str) -> str:
    rel = path.relative_to(base).as_posix() if path.is_relative_to(base) else path.as_posix()
    return f'<img src="{html.escape(rel)}" alt="{html.escape(alt)}">'


def write_html(
    path: Path,
    title: str,
    summary: tuple[list[str], list[list[str]], list[str]],
    differences: tuple[list[str], list[list[str]]],
    plots: list[Path],
    tag_labels: dict[str, str],
    notes: list[str],
    verdict: list[str] | None = None,
    curve: tuple[list[str], list[list[str]]] | None = None,
) -> Path:
    """Write the report; `summary` is (header, cells, row kinds); `verdict`: the best adapter
    in sentences; `curve`: metrics by checkpoint step (header, cells)."""
    base = path.parent
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             f"</title><style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             "<h2>Results</h2>", html_table(*summary),
             "<p class='note'>Values with 95% bootstrap intervals over eval records; "
             "references are predictors built from the training answers alone.</p>"]
    if verdict:
        parts += ["<h2>Best adapter</h2><ul>"]
        parts += [f"<li>{html.escape(line)}</li>" for line in verdict] + ["</ul>"]
    if curve and curve[1]:
        parts += ["<h2>By checkpoint step</h2>", html_table(*curve)]
    if differences[1]:
        parts += ["<h2>Differences</h2>", html_table(*differences),
                  "<p class='note'>lift: vs the best reference predictor, &gt; 0 is better "
                  "(weighted_error: lower is better). vs base: paired bootstrap over the same "
                  "records, target − base; * = distinguishable (p &lt; 0.05).</p>"]
    main = [p for p in plots if not p.name.startswith("scatter_")]
    scatter = [p for p in plots if p.name.startswith("scatter_")]
    if main:
        parts += ["<h2>Plots</h2>"] + [_image(p, base, p.stem) for p in main]
    if scatter:
        parts += ["<h2>Predicted vs reference scores</h2>", "<div class='gallery'>"]
        parts += [_image(p, base, p.stem) for p in scatter] + ["</div>"]
    renamed = {tag: label for tag, label in tag_labels.items() if tag != label}
    if renamed:
        parts += ["<h2>Tag labels on plots</h2>",
                  html_table(["label", "tag"], [[v, k] for k, v in renamed.items()])]
    if notes:
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{html.escape(n)}</li>" for n in notes] + ["</ul>"]
    parts.append("</body></html>\n")
    atomic_write_text(path, "\n".join(parts))
    return path
