"""Markdown + HTML reports: tables of rows and figures, written side by side."""

from __future__ import annotations

import csv
import html
import math
from dataclasses import dataclass, field
from pathlib import Path


def _fmt(v: object) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def _columns(rows: list[dict]) -> list[str]:
    """Every key of every row, in first-seen order (rows may differ in their optional columns)."""
    return list(dict.fromkeys(k for r in rows for k in r))


def write_csv(rows: list[dict], path: Path, columns: list[str] | None = None) -> Path:
    """Rows as CSV (full precision; None as empty), beside the Markdown report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns or _columns(rows), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


@dataclass
class Report:
    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)

    def text(self, paragraph: str) -> None:
        self.blocks.append(("text", paragraph))

    def heading(self, title: str) -> None:
        self.blocks.append(("heading", title))

    def table(self, rows: list[dict], columns: list[str] | None = None) -> None:
        self.blocks.append(("table", (rows, columns or _columns(rows))))

    def figure(self, path: Path, caption: str) -> None:
        self.blocks.append(("figure", (path, caption)))

    def markdown(self, root: Path) -> str:
        out = [f"# {self.title}", ""]
        for kind, body in self.blocks:
            if kind == "heading":
                out += [f"## {body}", ""]
            elif kind == "text":
                out += [str(body), ""]
            elif kind == "table":
                rows, cols = body  # type: ignore[misc]
                out.append("| " + " | ".join(cols) + " |")
                out.append("|" + "---|" * len(cols))
                out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
                out.append("")
            elif kind == "figure":
                path, caption = body  # type: ignore[misc]
                out += [f"![{caption}]({Path(path).relative_to(root)})", f"*{caption}*", ""]
        return "\n".join(out)

    def html(self, root: Path) -> str:
        out = [
            f"<!doctype html><meta charset='utf-8'><title>{html.escape(self.title)}</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
            "table{border-collapse:collapse}td,th{border:1px solid #aaa;padding:3px 8px}</style>",
            f"<h1>{html.escape(self.title)}</h1>",
        ]
        for kind, body in self.blocks:
            if kind == "heading":
                out.append(f"<h2>{html.escape(str(body))}</h2>")
            elif kind == "text":
                out.append(f"<p>{html.escape(str(body))}</p>")
            elif kind == "table":
                rows, cols = body  # type: ignore[misc]
                out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>")
                out += [
                    "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>"
                    for r in rows
                ]
                out.append("</table>")
            elif kind == "figure":
                path, caption = body  # type: ignore[misc]
                rel = html.escape(str(Path(path).relative_to(root)))
                out.append(
                    f"<figure><img src='{rel}' width='700'><figcaption>{html.escape(caption)}"
                    "</figcaption></figure>"
                )
        return "\n".join(out)

    def write(self, folder: Path, stem: str = "report") -> tuple[Path, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        md, ht = folder / f"{stem}.md", folder / f"{stem}.html"
        md.write_text(self.markdown(folder))
        ht.write_text(self.html(folder))
        return md, ht
