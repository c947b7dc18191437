"""How ``--help`` shows a switch's two names (``--use-cache``, ``--no-use-cache``): side by side where they fit, one
under the other where side by side they would be cut.

typer lays the options out in a rich table whose columns are the names, the ``--no-`` names, the type and the help.
In a narrow terminal rich narrows the widest columns first, all together, so once the help column is down to the
names' width it cuts the names with the help: ``spectra memory --help`` at 80 columns printed
``--gradient-checkpoi…    --no-gradient-chec…``. A name is what a user types, so where it would be cut the ``--no-``
name goes under the other in the names' column, which frees the ``--no-`` column for the help. At 80 columns and
wider no name is cut; narrower (40 columns) rich narrows the names' column as well and names are still cut
(``--gradien…``, ``--no-doub…``), though fewer and less than in typer's own layout.

The command also reads its number options as typed (options.TypedFloat, TypedInt) and refuses a number option's value
in spectra's words, as every other refusal: ``error: --energy 'abc': expected a number.``
"""

from __future__ import annotations

from rich.measure import Measurement
from rich.table import Table
from rich.text import Text
from typer import BadParameter
from typer.core import TyperCommand

from spectra.cli.options import _number_refusal, _refuse_out_of_range


class SpectraCommand(TyperCommand):
    """A command whose ``--help`` cuts no option's name at 80 columns and wider, and whose number options are refused
    in spectra's words (see the module's docstring)."""

    def parse_args(self, ctx, args):
        try:
            rest = super().parse_args(ctx, args)
        except BadParameter as err:
            refusal = _number_refusal(err)
            if refusal is None:
                raise
            raise refusal from None
        if not ctx.resilient_parsing:
            _refuse_out_of_range(ctx)
        return rest

    def format_help(self, ctx, formatter) -> None:
        from typer import rich_utils  # the options table is made there, as rich_utils.Table

        table = getattr(rich_utils, "Table", None)
        if table is not Table:  # a typer that draws its tables otherwise: its own layout
            return super().format_help(ctx, formatter)
        rich_utils.Table = _OptionsTable
        try:
            super().format_help(ctx, formatter)
        finally:
            rich_utils.Table = table


class _OptionsTable(Table):
    """typer's table; an options table (rows of [required,] names, short names, --no- names, short --no- names, type,
    help) stacks each switch's two names when, at the width it is drawn at, side by side they would be cut."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._rows_held: list[tuple] | None = []  # an options table's rows, added when its width is known

    def add_row(self, *cells, **kwargs) -> None:
        if self._rows_held is None or self.columns or len(cells) not in (6, 7):  # typer's commands table, a title…
            return super().add_row(*cells, **kwargs)
        self._rows_held.append((cells, kwargs))

    def _add_held_rows(self, console, options) -> None:
        rows, self._rows_held = self._rows_held or [], None
        if rows and _names_cut(self, console, options, [cells for cells, _ in rows]):
            rows = [(_stacked(cells), kwargs) for cells, kwargs in rows]
        for cells, kwargs in rows:
            super().add_row(*cells, **kwargs)

    def __rich_measure__(self, console, options):
        self._add_held_rows(console, options)
        return super().__rich_measure__(console, options)

    def __rich_console__(self, console, options):
        self._add_held_rows(console, options)
        yield from super().__rich_console__(console, options)


def _names_cut(table: Table, console, options, rows: list[tuple]) -> bool:
    """Whether rich, drawing `rows` in `options.max_width`, would cut a name. Rich narrows the widest columns to a
    common width until the table fits, so the names stay whole while the columns, each capped at the widest name
    column's width, fit."""
    left, right = table.padding[3], table.padding[1]
    count = len(rows[0])
    widths = []
    for i in range(count):
        content = max(Measurement.get(console, options, row[i]).maximum for row in rows)
        widths.append(content + (left if i or table.pad_edge else 0) + (right if i < count - 1 or table.pad_edge
                                                                           else 0))
    names = count - 6  # the names' column: after the required-mark column where there is one
    widest = max(widths[names], widths[names + 2])
    return sum(min(width, widest) for width in widths) > options.max_width


def _stacked(cells: tuple) -> tuple:
    """A row with its --no- name under its name, in the names' column."""
    names = len(cells) - 6
    name, off = cells[names], cells[names + 2]
    if not str(off):
        return cells
    both = Text("\n").join([name if isinstance(name, Text) else Text(str(name)),
                            off if isinstance(off, Text) else Text(str(off))])
    return (*cells[:names], both, cells[names + 1], "", *cells[names + 3:])
