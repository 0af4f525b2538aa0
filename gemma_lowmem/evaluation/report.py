"""Evaluation reports: ``report.json`` (everything), ``report.md`` (metric tables, examples, plots) and PNG plots.

A report is a dict. Either one system's result (``metrics``, ``plots``, ``examples``, ...) or several under
``systems`` (``{"systems": {"base": {...}, "adapter": {...}}}``), which the Markdown puts side by side, one column
per system. Optional top-level keys: ``settings`` (what was run; a two-column table) and ``tables`` (ready-made
tables: ``[{"title", "columns", "rows", "note"}]``). Pure Python and matplotlib: no torch.

Plot specs (``plots`` of a system, name -> spec) are drawn by :func:`plot`:

- ``{"kind": "scatter", "x", "y", "xlabel", "ylabel"}``; ``limits: [lo, hi]`` also draws the ``y = x`` line.
- ``{"kind": "confusion", "matrix", "labels"}``: rows are the true labels; ``columns`` names the predicted columns
  when they differ from ``labels`` (e.g. an extra "invalid" column).
- ``{"kind": "bar", "labels", "series": {name: values}}`` (or ``values`` for one series); None values are gaps.
- ``{"kind": "line", "x", "series": {name: values}}``.

Every kind takes an optional ``title``; ``xlabel``/``ylabel`` where they make sense.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path, PurePath
from typing import Any

PLOT_KINDS = ("scatter", "confusion", "bar", "line")
_SINGLE = "value"  # column header of a one-system report


# ------------------------------------------------------------------------------------------------------ formatting


def _jsonable(value: Any) -> Any:
    """A strict-JSON copy: NaN and infinities become None, numpy values Python ones, paths strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy scalars and arrays
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"report value of type {type(value).__name__} is not JSON-serialisable: {value!r:.80}")


def format_value(value: Any) -> str:
    """A metric as a table cell: 4 significant digits, thousands separated, ``n/a`` for None."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        if value.is_integer() and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4g}"
    return _cell(str(value))


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _fenced(text: str) -> list[str]:
    # A fence longer than any backtick run inside the text, so generated Markdown cannot close it early.
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence, text, fence, ""]


def _flatten(value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": scalar}``; lists (matrices, per-row values) are left to report.json."""
    flat: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict):
            flat.update(_flatten(item, name + "."))
        elif not isinstance(item, (list, tuple)):
            flat[name] = item
    return flat


# --------------------------------------------------------------------------------------------------------- metrics


def _matrix_section(section: dict[str, Any]) -> list[str] | None:
    """A dict of dicts of scalars with the same keys (criterion -> statistics) as one matrix table, else None."""
    if not section or not all(isinstance(v, dict) and v for v in section.values()):
        return None
    inner = list(next(iter(section.values())))
    if any(list(v) != inner or any(isinstance(x, (dict, list)) for x in v.values()) for v in section.values()):
        return None
    rows = [[_cell(str(name)), *(format_value(stats[k]) for k in inner)] for name, stats in section.items()]
    return _table(["", *map(_cell, inner)], rows)


def _metric_sections(systems: dict[str, dict[str, Any]]) -> list[str]:
    """Metric tables: top-level scalars in one, then one per nested metric group; a column per system."""
    names = list(systems)
    metrics = {name: system.get("metrics", {}) for name, system in systems.items()}
    keys: list[str] = []  # top-level keys in first-seen order over all systems
    for m in metrics.values():
        keys += [k for k in m if k not in keys]
    scalars = [k for k in keys if not any(isinstance(m.get(k), (dict, list)) for m in metrics.values())]
    lines: list[str] = []
    if scalars:
        lines += ["### Overview", ""]
        lines += _table(["metric", *names], [[_cell(k), *(format_value(metrics[n].get(k)) for n in names)]
                                             for k in scalars])
    for key in keys:
        if key in scalars:
            continue
        sections = {n: metrics[n].get(key) for n in names}
        if all(not isinstance(s, dict) for s in sections.values()):
            continue  # a list only: it is in report.json
        lines += [f"### {key}", ""]
        matrix = _matrix_section(sections[names[0]]) if len(names) == 1 else None
        if matrix is not None:
            lines += matrix
            continue
        flat = {n: _flatten(s) if isinstance(s, dict) else {} for n, s in sections.items()}
        rows: list[str] = []
        for f in flat.values():
            rows += [r for r in f if r not in rows]
        lines += _table(["metric", *names], [[_cell(r), *(format_value(flat[n].get(r)) for n in names)]
                                             for r in rows])
    return lines


# ----------------------------------------------------------------------------------------------------------- plots


def _numbers(values: list[Any]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def plot(spec: dict[str, Any], path: str | Path) -> Path:
    """Draw one plot spec (see the module docstring) as a PNG.

    Args:
        spec: the plot description; ``kind`` is one of :data:`PLOT_KINDS`.
        path: the PNG to write.

    Returns:
        The path written.

    Raises:
        ValueError: an unknown kind or a spec without the fields its kind needs.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    kind = spec.get("kind")
    if kind not in PLOT_KINDS:
        raise ValueError(f"plot kind {kind!r} is not one of {', '.join(PLOT_KINDS)}")
    needed = {"scatter": ("x", "y"), "confusion": ("matrix", "labels"), "bar": ("labels",), "line": ("x", "series")}
    missing = [f for f in needed[kind] if f not in spec]
    if kind == "bar" and "series" not in spec and "values" not in spec:
        missing.append("series or values")
    if missing:
        raise ValueError(f"{kind} plot spec lacks {', '.join(missing)}")
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4.5) if kind != "bar" else (max(6.0, 0.8 * len(spec["labels"]) + 2), 4.5))
    try:
        if kind == "scatter":
            x, y = _numbers(spec["x"]), _numbers(spec["y"])
            if len(x) != len(y):
                raise ValueError(f"scatter plot: {len(x)} x values but {len(y)} y values")
            ax.scatter(x, y, s=18, alpha=0.6)
            if spec.get("limits"):
                lo, hi = spec["limits"]
                ax.plot([lo, hi], [lo, hi], "--", color="grey", linewidth=1, label="y = x")
                pad = 0.03 * (hi - lo)
                ax.set_xlim(lo - pad, hi + pad)
                ax.set_ylim(lo - pad, hi + pad)
                ax.legend(loc="upper left")
            if not x:
                ax.text(0.5, 0.5, "no points", ha="center", va="center", transform=ax.transAxes)
            ax.grid(alpha=0.3)
        elif kind == "confusion":
            matrix = [_numbers(row) for row in spec["matrix"]]
            rows, columns = list(spec["labels"]), list(spec.get("columns") or spec["labels"])
            image = ax.imshow(matrix, cmap="Blues")
            fig.colorbar(image, ax=ax)
            ax.set_xticks(range(len(columns)), [str(c) for c in columns], rotation=45, ha="right")
            ax.set_yticks(range(len(rows)), [str(r) for r in rows])
            top = max((v for row in matrix for v in row if not math.isnan(v)), default=0)
            for r, row in enumerate(matrix):
                for c, v in enumerate(row):
                    ax.text(c, r, format_value(v), ha="center", va="center",
                            color="white" if v > top / 2 else "black")
            ax.set_xlabel(spec.get("xlabel", "predicted"))
            ax.set_ylabel(spec.get("ylabel", "true"))
        elif kind == "bar":
            labels = [str(label) for label in spec["labels"]]
            series = spec.get("series") or {spec.get("ylabel", "value"): spec["values"]}
            width = 0.8 / len(series)
            for s, (name, values) in enumerate(series.items()):
                positions = [i + (s - (len(series) - 1) / 2) * width for i in range(len(labels))]
                ax.bar(positions, _numbers(values), width=width, label=str(name))
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
            ax.set_xlim(-0.5, len(labels) - 0.5)  # all groups in view, also when a series is all gaps
            if len(series) > 1:
                ax.legend()
            ax.grid(axis="y", alpha=0.3)
        else:
            for name, values in spec["series"].items():
                ax.plot(_numbers(spec["x"]), _numbers(values), marker="o", markersize=3, label=str(name))
            ax.legend()
            ax.grid(alpha=0.3)
        if kind != "confusion":
            ax.set_xlabel(spec.get("xlabel", ""))
            ax.set_ylabel(spec.get("ylabel", ""))
        if spec.get("title"):
            ax.set_title(spec["title"])
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)  # figures stay alive in pyplot's registry otherwise
    return path


# -------------------------------------------------------------------------------------------------------- examples


def _row_line(row: dict[str, Any]) -> str:
    return " · ".join(f"{_cell(str(k))}: {format_value(v)}" for k, v in row.items()
                      if not isinstance(v, (dict, list)))


def _examples(systems: dict[str, dict[str, Any]]) -> list[str]:
    """The first examples of each system, grouped by example: prompt excerpt, target, each system's answer."""
    count = max((len(s.get("examples") or []) for s in systems.values()), default=0)
    if not count:
        return []
    lines = ["## Examples", ""]
    for i in range(count):
        present = {name: s["examples"][i] for name, s in systems.items() if i < len(s.get("examples") or [])}
        first = next(iter(present.values()))
        lines += [f"### Example {i + 1}", ""]
        if first.get("prompt_excerpt"):
            lines += ["Prompt (excerpt):", "", *_fenced(first["prompt_excerpt"])]
        if first.get("target_text"):
            lines += ["Target:", "", *_fenced(first["target_text"])]
        for name, example in present.items():
            label = f"Generated ({name})" if len(systems) > 1 or name != _SINGLE else "Generated"
            row = example.get("row") or {}
            lines += [f"{label}:" + (f" {_row_line(row)}" if row else ""), "", *_fenced(example.get("generated", ""))]
    return lines


# ---------------------------------------------------------------------------------------------------------- report


def _file_part(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "plot"


def write_report(report: dict[str, Any], out_dir: str | Path, title: str) -> tuple[Path, Path]:
    """Write ``report.json``, ``report.md`` and one PNG per plot spec into ``out_dir``.

    ``report.json`` is written first, so the numbers survive a plot that fails to draw.

    Args:
        report: one system's result, or ``{"systems": {name: result}}``; optional ``settings`` and ``tables``
            (see the module docstring).
        out_dir: the folder (created).
        title: the Markdown title.

    Returns:
        ``(report.json, report.md)`` paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(json.dumps(_jsonable(report), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    systems = report["systems"] if "systems" in report else {_SINGLE: report}
    lines = [f"# {title}", ""]
    if report.get("settings"):
        lines += ["## Settings", ""]
        lines += _table(["setting", "value"], [[_cell(str(k)), format_value(v)]
                                               for k, v in _flatten(report["settings"]).items()])
    lines += ["## Metrics", ""]
    lines += _metric_sections(systems)
    for table in report.get("tables") or []:
        lines += [f"### {_cell(table['title'])}", ""]
        lines += _table([_cell(str(c)) for c in table["columns"]],
                        [[_cell(c) if isinstance(c, str) else format_value(c) for c in row] for row in table["rows"]])
        if table.get("note"):
            lines += [table["note"], ""]
    plots = [(name, plot_name, spec) for name, system in systems.items()
             for plot_name, spec in (system.get("plots") or {}).items()]
    if plots:
        lines += ["## Plots", ""]
        for name, plot_name, spec in plots:
            file_name = _file_part(plot_name if name == _SINGLE else f"{name}_{plot_name}") + ".png"
            plot(spec, out_dir / file_name)
            caption = spec.get("title") or plot_name
            lines += [f"{caption}" + ("" if name == _SINGLE else f" ({name})") + ":", "",
                      f"![{_cell(plot_name)}]({file_name})", ""]
    lines += _examples(systems)
    md_path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return json_path, md_path
