"""Read rows from local JSONL, JSON, CSV, Parquet or Excel (.xlsx) files with errors that name file, row and field.

Every task reads its local data through :func:`read_records`; hub data sets go through
:func:`load_hub_records`, which turns "no network" into one clear message. Both take ``columns`` (``--columns``), a
mapping from a task's field to the column that holds it in this data (``{"article": "text"}``), in the spirit of
TRL's and axolotl's field mappings: each row gets the field copied from that column, so the checks and the task see
their own names. A row that has no such column keeps its own field of that name, if any.

A JSONL line that is not JSON is a bad row like any other (it names its line): :func:`read_records` raises it, or
with ``skip_bad_rows`` (training's ``--skip-bad-rows``) skips and counts it; grading (:mod:`gemma_lowmem.grading`)
always skips and counts bad rows. Its neighbours are read either way. A ``.json`` file is one document: malformed,
it has no rows to keep.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma_lowmem.errors import UserError

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".xlsx")
Columns = Mapping[str, str]  # task field -> the data's column


def apply_columns(row: Any, columns: Columns | None) -> Any:
    """``row`` with each mapped field copied from its column (rows that are not dicts pass through).

    Args:
        row: a raw row.
        columns: task field -> column, e.g. ``{"article": "text"}``; None or empty: the row unchanged.

    Returns:
        A new dict when anything was mapped, else ``row`` itself.
    """
    if not columns or not isinstance(row, dict):
        return row
    mapped = {name: row[column] for name, column in columns.items() if column in row}
    return {**row, **mapped} if mapped else row


def columns_hint(name: str, columns: Columns | None) -> str:
    """How ``--columns`` supplies the missing field ``name``: the mapping given for it, or how to give one."""
    if columns and name in columns:
        return f"--columns {name}={columns[name]} names a column this row lacks"
    return f"if your data calls it otherwise, map it: --columns {name}=YOUR_COLUMN"


def missing_field(name: str, row: dict[str, Any], columns: Columns | None) -> str:
    """The message for a row without field ``name``: the fields it has and the ``--columns`` hint."""
    return f"missing field '{name}' (fields present: {', '.join(row) or 'none'}); {columns_hint(name, columns)}"


def check_columns(columns: Columns | None, fields: Sequence[str], task: str) -> None:
    """Refuse a mapping to a field the task never reads (a typo would otherwise be ignored silently).

    Raises:
        UserError: naming the mapping and the task's fields.
    """
    unknown = [f"{name}={column}" for name, column in (columns or {}).items() if name not in fields]
    if unknown:
        raise UserError(f"--columns {' '.join(unknown)}: task '{task}' reads no such field; its fields: "
                        f"{', '.join(fields)}")


def warn_unmatched(where: str, rows: list[Any], columns: Columns | None) -> None:
    """Say so when a mapped column is in no row and neither is its field (an optional field's typo)."""
    keys = set().union(*(r.keys() for r in rows if isinstance(r, dict))) if rows else set()
    for name, column in (columns or {}).items():
        if column not in keys and name not in keys:
            log.warning("%s: --columns %s=%s: no row has a column '%s' (columns: %s)", where, name, column, column,
                        ", ".join(sorted(keys)) or "none")


@dataclass
class BadRows:
    """Rows skipped with ``skip_bad_rows``: how many and why (the first few reasons kept)."""

    count: int = 0
    reasons: list[str] = field(default_factory=list)

    def add(self, reason: str) -> None:
        self.count += 1
        if len(self.reasons) < 20:
            self.reasons.append(reason)


def json_error(err: json.JSONDecodeError, line: bool = True) -> str:
    """``err`` as ``<what> at line L, column C`` (``line=False``: ``at column C``), for a message.

    json's own text may end in "at" already ("Unterminated string starting at"); it is not doubled.
    """
    where = f"line {err.lineno}, column {err.colno}" if line else f"column {err.colno}"
    return f"{err.msg.removesuffix(' at')} at {where}"


def _rows_jsonl(path: Path, text: str) -> Iterable[tuple[str, Any]]:
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {line_no}", json.loads(line)
        except json.JSONDecodeError as err:  # the line's bad row: the caller raises it or skips it
            yield f"line {line_no}", UserError(f"{path}: line {line_no}: malformed JSON ({json_error(err, False)})")


def _rows_json(path: Path, text: str) -> Iterable[tuple[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: malformed JSON ({json_error(err)})") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}: take the single list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(f"{path}: expected a JSON list of objects (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"item {i}", row


def _rows_csv(path: Path, text: str) -> Iterable[tuple[str, Any]]:
    csv.field_size_limit(sys.maxsize)  # news articles exceed the 128 KB default
    reader = csv.DictReader(text.splitlines(keepends=True))
    for i, row in enumerate(reader):
        extra = row.pop(None, None)  # cells past the header's columns (DictReader's restkey)
        if extra:  # the row's bad: the caller raises it or skips it
            yield f"row {i + 2}", UserError(
                f"{path}: row {i + 2}: {len(extra)} more cell(s) than the header has columns (an unquoted comma "
                "inside a text? put the text in double quotes)")
        else:
            yield f"row {i + 2}", row  # row 1 is the header


def _rows_parquet(path: Path) -> Iterable[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a broken file
        raise UserError(f"{path}: not a readable Parquet file ({err})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"row {i}", row


def _rows_xlsx(path: Path) -> Iterable[tuple[str, Any]]:
    """The first sheet of an Excel workbook: row 1 names the columns, each later row is a row (``row N`` as Excel
    numbers it). An empty cell reads as ``""``, as in a CSV file (a spreadsheet has no null); blank rows are skipped,
    and so are columns without a name."""
    try:
        import openpyxl
    except ImportError:
        raise UserError(f"{path}: reading .xlsx needs openpyxl (pip install openpyxl, or the [app] extra)") from None
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)  # data_only: formulas' saved values
    except Exception as err:  # openpyxl raises zipfile, KeyError and its own errors for a file that is not xlsx
        raise UserError(f"{path}: not a readable .xlsx workbook ({type(err).__name__}: {err}); save it from Excel "
                        "as .xlsx, or as .csv (UTF-8)") from None
    try:
        cells = book.worksheets[0].iter_rows(values_only=True)
        header = next(cells, ())
        names = {i: str(name).strip() for i, name in enumerate(header) if name is not None and str(name).strip()}
        seen: dict[str, int] = {}
        for i, name in names.items():
            if name in seen:
                raise UserError(f"{path}: columns {_column_letter(seen[name])} and {_column_letter(i)} are both "
                                f"named '{name}'; rename one")
            seen[name] = i
        for number, values in enumerate(cells, start=2):  # row 1 is the header
            if all(v is None or (isinstance(v, str) and not v.strip()) for v in values):
                continue
            yield f"row {number}", {name: "" if i >= len(values) or values[i] is None else values[i]
                                    for i, name in names.items()}
    finally:
        book.close()


def _column_letter(index: int) -> str:
    """Excel's name of the 0-based column ``index`` (0 -> A, 26 -> AA)."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("A") + rest) + letters
    return letters


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(
            f"{path}: line {line}: not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start}); "
            "re-save the file as UTF-8"
        ) from None


def read_rows(path: str | Path) -> list[tuple[str, Any]]:
    """Every row of a local data file as it stands, with where it is, unchecked and unmapped.

    Args:
        path: a ``.jsonl``, ``.json``, ``.csv``, ``.parquet`` or ``.xlsx`` (first sheet) file.

    Returns:
        ``(where, row)`` in file order, ``where`` as messages name it (``line 3``, ``row 4``, ``item 2``); a JSONL
        line that is not JSON comes as the :class:`UserError` naming it, in place of its row. Blank JSONL lines
        are no rows.

    Raises:
        UserError: no such file, an unknown suffix, a file that is not UTF-8, a malformed ``.json`` or Parquet file.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give a {'/'.join(SUPPORTED_SUFFIXES)} file")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise UserError(f"{path}: unknown file type '{suffix}'; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    if suffix == ".parquet":
        return list(_rows_parquet(path))
    if suffix == ".xlsx":
        return list(_rows_xlsx(path))
    reader = {".jsonl": _rows_jsonl, ".json": _rows_json, ".csv": _rows_csv}[suffix]
    return list(reader(path, _read_text(path)))


def read_records(
    path: str | Path,
    required: Sequence[str] = (),
    text_fields: Sequence[str] = (),
    skip_bad_rows: bool = False,
    bad_rows: BadRows | None = None,
    columns: Columns | None = None,
) -> list[dict[str, Any]]:
    """Read a local data file into a list of dicts.

    Args:
        path: a ``.jsonl``, ``.json``, ``.csv``, ``.parquet`` or ``.xlsx`` (first sheet) file.
        required: fields every row must have (non-null), after ``columns``.
        text_fields: fields that must be non-empty strings.
        skip_bad_rows: skip rows that fail the checks, JSONL lines that are not JSON included (counted in
            ``bad_rows``), instead of raising.
        bad_rows: collects the skipped rows' reasons.
        columns: task field -> column in this file (module docstring); the rows carry both names.

    Returns:
        The rows, in file order.

    Raises:
        UserError: naming the file, the line or row and the field.
    """
    path = Path(path)
    rows = read_rows(path)
    bad_rows = bad_rows if bad_rows is not None else BadRows()
    records = []
    for where, row in rows:
        row = apply_columns(row, columns)
        problem = _check_row(path, where, row, required, text_fields, columns)
        if problem is None:
            records.append(row)
        elif skip_bad_rows:
            bad_rows.add(str(problem))
        else:
            raise problem
    if not records:
        detail = f" ({bad_rows.count} bad rows skipped)" if bad_rows.count else ""
        raise UserError(f"{path}: no usable rows{detail}")
    warn_unmatched(str(path), [row for _, row in rows], columns)
    return records


def _check_row(
    path: Path, where: str, row: Any, required: Sequence[str], text_fields: Sequence[str], columns: Columns | None
) -> UserError | None:
    if isinstance(row, UserError):
        return row
    if not isinstance(row, dict):
        return UserError(f"{path}: {where}: expected an object with fields, got {type(row).__name__}")
    for name in required:
        if row.get(name) is None:
            return UserError(f"{path}: {where}: {missing_field(name, row, columns)}")
    for name in text_fields:
        value = row.get(name)
        if not isinstance(value, str):
            return UserError(f"{path}: {where}: field '{name}' must be text, got {type(value).__name__}")
        if not value.strip():
            return UserError(f"{path}: {where}: field '{name}' is empty")
    return None


def load_hub_records(name: str, config: str | None, split: str, columns: Columns | None = None
                     ) -> list[dict[str, Any]]:
    """Load a split of a Hugging Face hub data set through ``datasets``.

    Args:
        name: the data set id.
        config: its configuration (None: the default).
        split: the split, possibly sliced (``train[:100]``).
        columns: task field -> column of this set (module docstring).

    Returns:
        The rows, the mapped fields copied in.

    Raises:
        UserError: when the hub cannot be reached or the data set is unknown, naming the local alternative.
    """
    try:
        import datasets
    except ImportError:
        raise UserError("loading hub data sets needs the 'datasets' package (pip install datasets)") from None
    try:
        rows = list(datasets.load_dataset(name, config, split=split))
    except Exception as err:  # network, auth and unknown-name errors come in many types
        raise UserError(
            f"could not load data set '{name}' ({config or 'default'}, {split}) from the hub: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
            "Offline? Give a local file with --data PATH (JSONL/CSV/Parquet) or use --demo"
        ) from None
    warn_unmatched(f"{name} ({split})", rows, columns)
    return [apply_columns(row, columns) for row in rows]
