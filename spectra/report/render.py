"""Write an analysis as a report directory: JSON, Markdown, self-contained HTML and figures.

The report is first described once as a list of blocks (heading, paragraph, list,
table, figure, code), then rendered to Markdown and to HTML from that one list, so
the two never drift apart. The directory is built beside its destination and moved
into place with one rename, so a failure never leaves a partial report behind.
"""

from __future__ import annotations

import base64
import functools
import html
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from spectra.files import staged_directory
from spectra.groups import group_label
from spectra.report.plots import all_figures, energy_marks, energy_marks_text
from spectra.report.tables import (
    groups_in,
    has_activation,
    headline_level,
    matrix_rows,
    module_table,
    percent,
    rank_picture,
    role_table,
    role_table_note,
    stack_label,
    stacks_of,
    vector_rows,
    vector_table,
)

# The captions that do not depend on the analysis; report_blocks adds the cumulative-energy and rank-heatmap ones,
# which name its energy levels.
_FIGURE_CAPTIONS = {
    "decay": "Singular-value decay σᵢ/σ₁ per role, one line per layer; the dashed line is the dtype "
             "noise floor (Marchenko–Pastur edge / σ₁), the shaded band its range over layers.",
    "relative_size_heatmap": "Relative update size ‖ΔW‖_F / ‖W_base‖_F by layer and role.",
    "effective_rank_hist": "Entropy effective rank (Roy & Vetterli 2007) over the weight matrices whose whole "
                           "spectrum was computed (all of them with --method full; the default sketches the big "
                           "ones to their top only).",
}
_PNG_DPI = 130


def write_report(analysis: Mapping, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the report of an analysis into ``out_dir``, atomically.

    Writes ``analysis.json``, ``report.md``, a self-contained ``report.html`` (figures
    embedded as base64 PNG, inline CSS) and ``figures/*.png`` + ``figures/*.svg``.
    Everything is built in a hidden sibling directory and renamed into place at the
    end; on any failure that directory is removed and ``out_dir`` is left as it was.

    Parameters
    ----------
    analysis : mapping
        The analysis as ``analysis.json`` holds it (``schema_version``, ``config``,
        ``base``, ``tuned``, ``versions``, ``timings``, ``modules``).
    out_dir : str or path-like
        The report directory to create. Its parent is created if missing.
    overwrite : bool, default False
        Replace an existing ``out_dir``. Without it an existing directory is refused.

    Returns
    -------
    pathlib.Path
        ``out_dir``.

    Raises
    ------
    ConfigError
        If ``out_dir`` exists (and ``overwrite`` is False, or it holds a file that
        ``analyze`` does not write, or no ``analysis.json``) or is not a directory, or
        the analysis holds no weight-matrix rows.
    """
    stacks = stacks_of(analysis)  # validates (matrix_rows) before touching the disk; every label of the report uses it
    return write_bundle(out_dir, "analysis.json", analysis, all_figures(analysis, stacks=stacks),
                        functools.partial(report_blocks, stacks=stacks), command="analyze", overwrite=overwrite)


def write_bundle(out_dir, json_name: str, data: Mapping, figures: dict[str, Figure], blocks_of: Callable,
                 *, command: str, overwrite: bool, extra: Mapping[str, Callable[[Path], object]] | None = None,
                 writer: str | None = None) -> Path:
    """Write ``json_name``, ``report.md``, ``report.html`` and ``figures/`` atomically (staging dir, then rename).

    ``command`` names the writer in :data:`spectra.files.OUTPUTS`: an existing ``out_dir`` is
    replaced (with ``overwrite``) only if it is empty or holds only what that command writes.
    ``writer``, the command line of :data:`spectra.files.RECORD_WRITERS` (``"verify --sweep"``,
    one of ``command``'s), is stored in the record as ``"command"``: `spectra sweep` and
    `spectra verify --sweep` both write a ``sweep.json``, and the overwrite rule and the readers
    tell them apart by it. Records of one writer's name (analysis.json, demo.json) carry none.
    ``blocks_of(data, figures=names)`` gives the report's blocks (see ``render.to_markdown``).
    ``extra`` maps more file names to writers, each called with its path inside the staging
    directory, so those files appear together with the report or, if one fails, not at all.
    """
    out = Path(out_dir)
    if writer is not None:
        data = stamped(data, writer, command=command)
    with staged_directory(out, command=command, overwrite=overwrite) as staging:
        (staging / json_name).write_text(analysis_json(data), encoding="utf-8")
        (staging / "figures").mkdir()
        images = {}
        for name, fig in figures.items():
            images[name] = save_figure(fig, staging / "figures", name)
        blocks = blocks_of(data, figures=list(images))
        (staging / "report.md").write_text(to_markdown(blocks), encoding="utf-8")
        (staging / "report.html").write_text(to_html(blocks, images=images), encoding="utf-8")
        for name, write in (extra or {}).items():
            write(staging / name)
    return out


def stamped(data: Mapping, writer: str, *, command: str) -> dict:
    """`data` with ``"command": writer`` after its ``schema_version`` and ``kind`` (the head of the JSON), after
    checking that `writer` is a command line of :data:`spectra.files.RECORD_WRITERS` that belongs to `command`."""
    from spectra.files import RECORD_WRITERS, command_of

    if writer not in RECORD_WRITERS or command_of(writer) != command:
        raise ValueError(f"writer {writer!r} is not one of `spectra {command}`'s in spectra.files.RECORD_WRITERS "
                         f"({', '.join(RECORD_WRITERS)}).")
    head = {k: data[k] for k in ("schema_version", "kind") if k in data}
    return head | {"command": writer} | {k: v for k, v in data.items() if k not in head and k != "command"}


def save_figure(fig, folder: Path, name: str) -> bytes:
    """Write ``NAME.png`` and ``NAME.svg`` reproducibly (no dates, fixed SVG ids); return the PNG bytes.

    The SVG reuses the layout the PNG's save computed (its constrained layout ran once, not once per
    format): on a 22-layer model's report the five figures took 13.6–14.7 s against 16.3–17.4 s with a
    layout per format (alternating runs). `fig` gets its layout engine back afterwards.
    """
    import matplotlib

    with matplotlib.rc_context({"svg.hashsalt": "spectra"}):  # SVG element ids from a fixed salt, not random
        fig.savefig(folder / f"{name}.png", dpi=_PNG_DPI, metadata={"Software": None})
        engine = fig.get_layout_engine()
        if engine is not None:
            fig.set_layout_engine("none")  # axes stay where the PNG's layout put them
        try:
            fig.savefig(folder / f"{name}.svg", metadata={"Date": None, "Creator": None})
        finally:
            if engine is not None:
                fig.set_layout_engine(engine)
    return (folder / f"{name}.png").read_bytes()


# ---------------------------------------------------------------------------- JSON


def analysis_json(analysis: Mapping) -> str:
    """The analysis as strict JSON text, keys in the order given.

    numpy scalars and arrays become numbers and lists, tuples become lists, and
    NaN or infinite floats become ``null`` so that any JSON reader accepts the file.
    """
    return json.dumps(plain(analysis), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def plain(value):
    """`value` as plain JSON data: string keys, lists for tuples and arrays, Python scalars, None for a non-finite
    float, a path as its string (the reports' JSON and their configuration blocks)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


# ---------------------------------------------------------------------------- content


def report_blocks(analysis: Mapping, *, figures: list[str], stacks: list | None = None) -> list[tuple]:
    """The report as a list of blocks, shared by the Markdown and HTML renderers.

    Blocks are tuples: ``("h", level, text)``, ``("p", text)``, ``("ul", items)``,
    ``("table", headers, rows)``, ``("figure", name, caption)`` and ``("code", text)``.
    ``stacks``: the analysis's (:func:`~spectra.report.tables.stacks_of`), computed here once where the caller has
    not.
    """
    matrices, vectors = matrix_rows(analysis), vector_rows(analysis)
    stacks = stacks_of(analysis) if stacks is None else stacks
    blocks: list[tuple] = [("h", 1, "spectra report: how much rank did this fine-tune use?")]
    blocks += [("h", 2, "Summary"), ("ul", _summary_items(analysis, matrices, vectors, stacks)),
               ("p", rank_picture(analysis, stacks=stacks))]
    note = role_table_note(analysis, stacks=stacks)  # modules with ΔW = 0 are left out of the medians and counts
    headers, cells = role_table(analysis, stacks=stacks)
    blocks.append(("h", 2, "Per role"))
    if cells:
        blocks += [("p", "Median over the role's modules, with the range (min–max) in brackets. Energy-x% rank: "
                         "fewest singular directions that hold x% of ‖ΔW‖_F²; full rank is min(out, in)."
                         + (f" {_stacks_note(stacks)}" if len(stacks) > 1 else "") + (f" {note}" if note else "")),
                   ("table", headers, cells)]
    else:  # every matrix is unchanged: no role has a rank to tabulate
        blocks.append(("p", note))
    if has_activation(analysis):
        blocks.append(("p", "Activation-weighted ranks (the analysis ran with calibration data): energy ranks of "
                            "ΔW·C^½, C = E[x xᵀ] over the calibration tokens, i.e. of the output change ΔW·x on "
                            "the data's inputs; a rank below ΔW's own means part of the update lies in input "
                            "directions the data barely visits. – marks modules the calibration did not reach."))
    blocks.append(("h", 2, "Figures"))
    head = headline_level(analysis)
    marks = energy_marks_text(energy_marks(analysis))  # the figure's dotted lines: "90, 95 and 99%"
    panels = (f" One panel per stack ({', '.join(stack_label(s, stacks) for s in stacks)}), on one colour scale."
              if len(stacks) > 1 else "")
    captions = _FIGURE_CAPTIONS | {"rank_heatmap": f"Energy-{percent(head)} rank by layer and role "
                                                   f"(grey: no such module).{panels}",
                                   "relative_size_heatmap": _FIGURE_CAPTIONS["relative_size_heatmap"] + panels,
                                   "cumulative_energy": f"Cumulative energy share of the top-r directions; dotted "
                                                        f"lines at {marks}."}
    blocks += [("figure", name, captions.get(name, name)) for name in figures]
    blocks += [("h", 2, "Per module"), ("table", *module_table(analysis, stacks=stacks))]
    if vectors:
        blocks += [("h", 3, "Vector deltas (norms, biases)"), ("table", *vector_table(analysis, stacks=stacks))]
    blocks += [("h", 2, "Run configuration"), ("code", json.dumps(plain(analysis.get("config", {})), indent=2))]
    return blocks


def _stacks_note(stacks: list) -> str:
    """What a report of several stacks (a language model and its vision tower) says about its grouping."""
    others = [s for s in stacks if s is not None]
    names = ", ".join(stack_label(s, stacks) for s in stacks)
    return (f"The checkpoint holds {len(stacks)} stacks of layers ({names}), "
            f"each numbered from 0: their modules are never grouped together, and a role of the "
            f"{' or '.join(others)} stack reads with its name ({group_label((others[0], 'q'), stacks)})"
            + (f", the {stack_label(None, stacks)}'s without one." if None in stacks else "."))


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _summary_items(analysis: Mapping, matrices: list[dict], vectors: list[dict], stacks: list) -> list[str]:
    items = [f"{label}: {_checkpoint(analysis.get(key))}" for key, label in (("base", "Base"), ("tuned", "Tuned"))]
    layers = {r["layer"] for r in matrices if r.get("layer") is not None}
    tensors = [r for r in matrices if not r.get("fused_name")]  # a fused tensor once, not again per projection
    split = len(matrices) - len(tensors)
    if len(stacks) > 1:  # layer 3 of a vision tower is not the language model's: count each stack's own
        counts = [(stack_label(s, stacks), len({r["layer"] for r in matrices if r.get("stack") == s
                                        and r.get("layer") is not None})) for s in stacks]
        where = ", ".join(f"{n} layer{'s' * (n != 1)} ({name})" for name, n in counts)
    else:
        where = f"{len(layers)} layer{'s' * (len(layers) != 1)}"
    items.append(f"Modules: {_count(len(tensors), 'weight matrix', 'weight matrices')}"
                 + (f" (and {_count(split, 'projection', 'projections')} of fused ones)" if split else "")
                 + f" and {_count(len(vectors), 'vector delta', 'vector deltas')}"
                 + (f" over {where}" if layers else ", none in a layer")
                 + f"; roles {', '.join(group_label(g, stacks) for g in groups_in(matrices))}")
    floor = _floor_item(analysis, matrices)
    if floor:
        items.append(floor)
    pairing = analysis.get("pairing") or {}
    for key, label in (("only_in_base", "Only in the base, not analysed"),
                       ("only_in_tuned", "Only in the tuned checkpoint, not analysed"),
                       ("skipped", "Skipped (--skip-nonfinite)"), ("notes", "Pairing notes")):
        listed = [str(x) for x in pairing.get(key) or []]
        if listed:
            items.append(f"{label} ({len(listed)}): " + "; ".join(listed[:5]) + (" …" if len(listed) > 5 else ""))
    calibration = analysis.get("calibration")
    if isinstance(calibration, Mapping):  # a calibrated run: the data and the token length it was cut at
        notes = [str(n) for n in calibration.get("notes") or []]
        items.append(f"Calibration data: {calibration.get('data', '?')} ({calibration.get('examples', '?')} examples "
                     f"of at most {calibration.get('max_length', '?')} tokens)"
                     + (f"; notes: {'; '.join(notes)}" if notes else ""))
    total = (analysis.get("timings") or {}).get("total_s")
    if isinstance(total, (int, float)):
        items.append(f"Analysis time: {total:.1f} s")
    versions = analysis.get("versions") or {}
    if versions:
        items.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    items.append(f"Schema version: {analysis.get('schema_version', '–')}")
    return items


def _floor_item(analysis: Mapping, matrices: list[dict]) -> str | None:
    """Which roundings the noise floor holds, counted over the modules (None in files written before it was
    recorded): under auto, what ΔW's residual fits, not how the checkpoints were made (a residual at the fine-tune's
    rounding level does not prove it started from the base's stored values)."""
    held = [(r.get("noise") or {}).get("base_rounding") for r in matrices]
    counted, exact = held.count("counted"), held.count("exact")
    if not counted + exact:
        return None
    choice = (analysis.get("config") or {}).get("base_rounding", "auto")
    alone = "ΔW's residual fits the fine-tune's rounding alone" if choice == "auto" else "the fine-tune's rounding alone"
    parts = [f"both checkpoints' rounding in {counted} module{'s' * (counted != 1)}" if counted else "",
             f"{alone} in {exact} module{'s' * (exact != 1)}" if exact else ""]
    return f"Noise floor (--base-rounding {choice}): " + "; ".join(p for p in parts if p)


def _checkpoint(info) -> str:
    if not isinstance(info, Mapping):
        return "–"
    parts = [str(info.get("path", "?"))]
    details = [str(info[k]) for k in ("format",) if info.get(k)]
    if isinstance(info.get("size_bytes"), int):
        details.append(_bytes(info["size_bytes"]))
    if info.get("fingerprint"):
        details.append(f"fingerprint {str(info['fingerprint'])[:12]}")
    return parts[0] + (f" ({', '.join(details)})" if details else "")


def _bytes(n: int) -> str:
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"


# ---------------------------------------------------------------------------- Markdown


def to_markdown(blocks: list[tuple]) -> str:
    """Render report blocks as Markdown; figures link to ``figures/NAME.png``."""
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out.append(f"{'#' * block[1]} {block[2]}")
        elif kind == "p":
            out.append(block[1])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in block[1]))
        elif kind == "table":
            out.append(markdown_table(block[1], block[2]))
        elif kind == "figure":
            out.append(f"![{block[2]}](figures/{block[1]}.png)\n\n*{block[2]}*")
        elif kind == "code":
            out.append(f"```json\n{block[1]}\n```")
    return "\n\n".join(out) + "\n"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table; pipes inside cells are escaped."""
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers))] + [line(r) for r in rows])


def role_table_markdown(analysis: Mapping) -> str:
    """The per-role table as Markdown (what ``report.md`` shows under "Per role")."""
    return markdown_table(*role_table(analysis))


# ---------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; font-size: .85rem; margin: .5rem 0; }
th, td { border: 1px solid #ddd; padding: .25rem .5rem; text-align: right; white-space: nowrap; }
th { background: #f3f3f5; position: sticky; top: 0; }
td:first-child, th:first-child { text-align: left; }
tbody tr:nth-child(even) { background: #fafafa; }
.scroll { overflow: auto; max-height: 40rem; }
figure { margin: 1.5rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .9rem; color: #555; }
pre { background: #f6f8fa; padding: .75rem; overflow: auto; font-size: .85rem; }
"""


def to_html(blocks: list[tuple], *, images: Mapping[str, bytes]) -> str:
    """Render report blocks as one self-contained HTML page (inline CSS, base64 PNG images)."""
    body = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            body.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
        elif kind == "p":
            body.append(f"<p>{html.escape(block[1])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in block[1]) + "</ul>")
        elif kind == "table":
            body.append(f'<div class="scroll">{html_table(block[1], block[2])}</div>')
        elif kind == "figure":
            data = base64.b64encode(images[block[1]]).decode("ascii")
            caption = html.escape(block[2])
            body.append(f'<figure><img alt="{caption}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{caption}</figcaption></figure>")
        elif kind == "code":
            body.append(f"<pre><code>{html.escape(block[1])}</code></pre>")
    title = html.escape(next((b[2] for b in blocks if b[0] == "h"), "spectra report"))
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
            f"<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def html_table(headers: list[str], rows: list[list[str]]) -> str:
    """An HTML table with escaped cells."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
