"""Tables the commands print: per-module tables in natural order with names never cut, and plain text tables."""

from __future__ import annotations

import os
import re
import shutil

from rich.markup import escape  # module names hold brackets ("c_attn[q]") that rich would read as markup

from spectra.checkpoints.names import natural_key
from spectra.cli.options import _AsTyped


def _plain_table(title: str, headers, rows: list[list[str]]):
    """A rich table of text cells, each kept whole (numbers are never wrapped)."""
    from rich.table import Table

    table = Table(*(escape(h) for h in headers), title=escape(title))
    for row in rows:
        table.add_row(*map(escape, row))
    return table


def _module_table(title: str, names: list[str], rows: list[tuple[str, ...]], headers: tuple[str, ...], *,
                  fold: tuple[str, ...] = ()):
    """A per-module rich table: natural order (layer 2 before 10), names after their common prefix
    (which heads the column), and in a narrow terminal the name and the `fold` columns wrapped — a
    name is copied into configs, so it is never cut; the other columns keep their width."""
    from rich.table import Table

    shared = os.path.commonprefix(names).rpartition(".")[0] if len(names) > 1 else ""  # whole dotted parts only
    prefix = shared + "." if shared else ""
    table = Table(title=escape(title))
    table.add_column(escape(f"{prefix}…") if prefix else "module", overflow="fold")  # the header carries the prefix
    for header in headers:
        table.add_column(header, **({"overflow": "fold"} if header in fold else {"no_wrap": True}))
    # the width left for names once the other columns have theirs (a fold column wraps down to 12): names wrap at
    # their dots to fit it, not mid-word ("k_p/roj")
    others = sum(3 + (min(12, w) if h in fold else w)
                 for h, w in ((h, max([len(h)] + [len(r[i]) for r in rows])) for i, h in enumerate(headers)))
    width = max(12, shutil.get_terminal_size().columns - others - 4)
    for name, row in sorted(zip(names, rows), key=lambda pair: natural_key(pair[0])):
        table.add_row(escape(_wrap_dotted(name[len(prefix):], width)), *map(escape, row))  # "c_attn[q]": no markup
    return table


def _wrap_dotted(name: str, width: int) -> str:
    """`name` in lines of at most `width`, broken after dots (a part longer than that stays whole: rich folds it)."""
    lines, line = [], ""
    for part in re.findall(r"[^.]*\.|[^.]+$", name):
        if line and len(line) + len(part) > width:
            lines.append(line)
            line = ""
        line += part
    return "\n".join(lines + [line])


def _fmt(value) -> str:
    """A table cell: blank for None, a number as the number it is. A result derived from an option's value may be that
    value (a plan's rank capped at --max-rank +2 is the option's own 2, by min()), whose text is the option's as typed
    (options.TypedInt): a cell is the result, "2", not the echo "+2"."""
    if value is None:
        return ""
    if isinstance(value, _AsTyped):
        return repr(int(value) if isinstance(value, int) else float(value))
    return str(value)
