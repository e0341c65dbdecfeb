"""Rendering tables: CSV keeps every number for machines; Markdown, LaTeX and HTML show the formatted
table for people; a reStructuredText caption describes the table in `snakemake --report`.

A table (gmr/report/tables.py) is computed once as numbers and formatted once as strings; every
format below renders those two, so the formats cannot disagree with each other.
"""
from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..io import write_text

FORMATS = ("csv", "md", "tex", "html", "rst")


@dataclass
class Formatted:
    """The table as people read it: display columns (strings), a title and notes on how to read it."""
    title: str
    frame: pd.DataFrame
    notes: list[str]


@dataclass
class Table:
    """One built table: its numbers (the CSV), its formatted form and its registered caption."""
    numbers: pd.DataFrame
    formatted: Formatted
    caption: str


# --------------------------------------------------------------------------------------------------
# Cells

def missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def pct_interval(value, low, high, signed: bool = False) -> str:
    """A fraction and its interval as percent with one decimal, '38.0 [29.1, 47.8]' (the form of
    gmr.stats.Estimate.text); '+12.0 [5.1, 18.7]' with `signed` (a difference). '–' when missing."""
    if missing(value):
        return "–"
    head = f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"
    if missing(low) or missing(high):
        return head
    return f"{head} [{100 * low:.1f}, {100 * high:.1f}]"


def num(v, fmt="{:.3g}") -> str:
    return "–" if missing(v) else fmt.format(v)


def drop_constant(df: pd.DataFrame, cols: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """Drop setting columns with one value (they would repeat on every row); return the frame and
    "column value" notes that say the value once."""
    notes = []
    for c in cols:
        if c in df and df[c].nunique() <= 1 and len(df):
            notes.append(f"{c} {df[c].iloc[0]}")
            df = df.drop(columns=c)
    return df, notes


def setting_notes(setting: Sequence[str]) -> list[str]:
    """The note that states the dropped setting columns once ("Setting: dataset MNIST; eps 0.3.")."""
    return ["Setting: " + "; ".join(setting) + "."] if setting else []


# --------------------------------------------------------------------------------------------------
# Formats

def to_csv(numbers: pd.DataFrame) -> str:
    return numbers.to_csv(index=False, float_format="%.6g")


def to_markdown(f: Formatted) -> str:
    return (f.frame.to_markdown(index=False, disable_numparse=True) + "\n\n"
            + "\n".join(f"*{n}*" for n in f.notes) + "\n")


_LATEX_ESCAPES = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}",
                  "±": r"$\pm$", "−": r"$-$", "–": "--", "Δ": r"$\Delta$", "×": r"$\times$", "<": r"$<$",
                  ">": r"$>$"}


def _tex(text) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def to_latex(f: Formatted) -> str:
    cols = list(f.frame.columns)
    lines = [r"% " + _tex(f.title) + " (written by `gmr tables`; needs \\usepackage{booktabs})",
             r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{" + "l" * min(len(cols), 1) + "r" * (len(cols) - 1) + "}", r"\toprule",
             " & ".join(_tex(c) for c in cols) + r" \\", r"\midrule"]
    for row in f.frame.itertuples(index=False):
        lines.append(" & ".join(_tex(v) for v in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\caption{" + _tex(f.title + ". " + " ".join(f.notes)) + "}",
              r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_html(f: Formatted) -> str:
    table = f.frame.to_html(index=False, border=0, classes="gmr", escape=True)
    notes = "".join(f"<p>{html.escape(n)}</p>" for n in f.notes)
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + html.escape(f.title) +
            "</title><style>body{font-family:sans-serif;margin:1em}table.gmr{border-collapse:collapse}"
            "table.gmr th,table.gmr td{padding:3px 8px;border-bottom:1px solid #ccc;text-align:right}"
            "table.gmr td:first-child,table.gmr th:first-child{text-align:left}p{color:#444;max-width:60em}"
            "</style></head><body><h3>" + html.escape(f.title) + "</h3>" + table + notes + "</body></html>\n")


def _rst(text: str) -> str:
    """Plain text as reStructuredText: markup characters escaped, so a caption cannot break the report."""
    return re.sub(r"([\\*`_|\[\]<>])", r"\\\1", text)


def to_caption(t: Table) -> str:
    """The report caption: the title in bold, then the registered caption (plain text). Snakemake
    renders a caption as a Jinja template first, so text that would read as Jinja is kept raw."""
    text = f"**{_rst(t.formatted.title)}**\n\n{_rst(t.caption)}\n"
    if any(tag in text for tag in ("{{", "{%", "{#")):
        text = "{% raw %}" + text.replace("{% endraw %}", "{ % endraw % }") + "{% endraw %}\n"
    return text


def render(t: Table, fmt: str) -> str:
    """The table in one of FORMATS."""
    writers = {"csv": lambda: to_csv(t.numbers), "md": lambda: to_markdown(t.formatted),
               "tex": lambda: to_latex(t.formatted), "html": lambda: to_html(t.formatted),
               "rst": lambda: to_caption(t)}
    if fmt not in writers:
        raise ValueError(f"unknown table format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    return writers[fmt]()


def write_tables(tables: dict[str, Table], out: str | Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write NAME.<format> for every table and format (atomically); returns the files written."""
    out = Path(out)
    written = []
    for name, table in tables.items():
        for fmt in formats:
            path = out / f"{name}.{fmt}"
            write_text(path, render(table, fmt))
            written.append(path)
    return written
