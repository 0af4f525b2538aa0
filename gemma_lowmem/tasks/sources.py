"""Where a task's rows come from: the bundled demo file, local files or a hub data set, then held out and limited.

Shared by every task that reads rows. A task gives a ``normalise(row) -> dict`` that turns one raw row into the
task's form or raises :class:`BadRow`; :func:`load_rows` names the file and record of a bad row, and skips it
(counting) with ``skip_bad_rows``. Source order, first match wins: ``cfg.demo``; ``cfg.train_file``; ``cfg.data`` as
a local file (when it exists or ends in a data-file suffix); ``cfg.data`` as a hub id; the task's default hub set.
``cfg.columns`` (``--columns FIELD=COLUMN``) renames the data's columns to the task's fields before ``normalise``
sees a row; a task raises :class:`MissingField` for a field it cannot find, and the message then says how
``--columns`` maps one.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma_lowmem.config import DataConfig
from gemma_lowmem.data.records import (
    SUPPORTED_SUFFIXES,
    BadRows,
    check_columns,
    columns_hint,
    load_hub_records,
    read_records,
)
from gemma_lowmem.errors import UserError

log = logging.getLogger(__name__)

HOLDOUT_SEED = 1234  # fixed, so held-out rows do not move with the training seed
Row = dict[str, Any]


class BadRow(ValueError):
    """Raised by a task's ``normalise`` for a row it cannot use; the message names the field and the fix."""


class MissingField(BadRow):
    """A row lacks the task's field ``name``; :func:`normalise_rows` adds how ``--columns`` supplies it."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


@dataclass(frozen=True)
class HubSet:
    """A hub data set: id, config, the splits to train and validate on (``val_split`` None: hold out)."""

    name: str
    config: str | None = None
    train_split: str = "train"
    val_split: str | None = "validation"
    sliced: bool = True  # ask the hub for the first max_*_samples rows only (False: load the split, then balance)


@dataclass
class LoadedRows:
    """Normalised rows and the bookkeeping of where they came from."""

    train: list[Row]
    val: list[Row]
    bad_rows: BadRows = field(default_factory=BadRows)
    source: str = ""


def normalise_rows(rows: list[Any], normalise: Callable[[Row], Row], where: str, skip_bad_rows: bool,
                   bad_rows: BadRows, columns: Mapping[str, str] | None = None) -> list[Row]:
    """Apply ``normalise`` to each row, naming ``where`` and the 1-based record of a bad one.

    Args:
        rows: raw rows (dicts from a file or the hub), ``columns`` already applied.
        normalise: the task's row function; raises :class:`BadRow`.
        where: the file or hub split, for messages.
        skip_bad_rows: skip and count bad rows instead of raising.
        bad_rows: collects skipped rows.
        columns: the ``--columns`` mapping, for the hint on a :class:`MissingField`.

    Returns:
        The normalised rows, in order.

    Raises:
        UserError: a bad row without ``skip_bad_rows``, or no usable row at all.
    """
    out = []
    for i, row in enumerate(rows, start=1):
        try:
            out.append(normalise(row))
        except BadRow as err:
            problem = f"{where}: record {i}: {err}"
            if isinstance(err, MissingField):
                problem += f"; {columns_hint(err.name, columns)}"
            if not skip_bad_rows:
                raise UserError(problem + " (or pass --skip-bad-rows to skip such rows)") from None
            bad_rows.add(problem)
    if not out:
        raise UserError(f"{where}: no usable rows ({bad_rows.count} bad rows skipped)")
    return out


def holdout(rows: list[Row], fraction: float, where: str, group: str | None = None) -> tuple[list[Row], list[Row]]:
    """Split rows into (train, val) with a fixed-seed draw, per ``group`` value when given; both keep file order.

    Args:
        rows: the rows.
        fraction: share held out for validation: at least one row from each group of 2 or more rows (from all rows
            when every group has a single row); single-row groups stay in training.
        where: the source, for the error message.
        group: a field whose values are held out in the same share each (essay set, label), or None.

    Returns:
        (training rows, validation rows).
    """
    if len(rows) < 2:
        raise UserError(f"{where}: {len(rows)} usable row(s); need at least 2 to hold out validation rows, "
                        "or give a validation file with --val-file")
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[row.get(group) if group else None].append(i)
    if all(len(members) < 2 for members in groups.values()):  # every group a single row: draw from all rows
        groups = {None: list(range(len(rows)))}
    rng = random.Random(HOLDOUT_SEED)
    val_idx: set[int] = set()
    for key in sorted(groups, key=str):
        members = groups[key]
        if len(members) >= 2:
            val_idx.update(rng.sample(members, max(1, round(len(members) * fraction))))
    return [r for i, r in enumerate(rows) if i not in val_idx], [r for i, r in enumerate(rows) if i in val_idx]


def take_balanced(rows: list[Row], n: int | None, key: str | None) -> list[Row]:
    """At most ``n`` rows, drawn round-robin over the values of ``key`` (file order kept within each value).

    Args:
        rows: the rows.
        n: the limit (None: all rows).
        key: the field to balance (None: the first ``n`` rows).

    Returns:
        The chosen rows in their original order.
    """
    if n is None or len(rows) <= n:
        return rows
    if key is None:
        return rows[:n]
    queues: dict[Any, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        queues[row.get(key)].append(i)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < n:
        for value in sorted(queues, key=str):
            if depth < len(queues[value]) and len(chosen) < n:
                chosen.append(queues[value][depth])
        depth += 1
    return [rows[i] for i in sorted(chosen)]


def _number_ids(rows: list[Row], prefix: str) -> list[Row]:
    """Give each row whose ``id`` is None the id ``<prefix>-<i>``, ``i`` its 0-based place among ``rows``.

    Args:
        rows: normalised rows (changed in place).
        prefix: names the source, e.g. the file's stem.

    Returns:
        ``rows``.
    """
    for i, row in enumerate(rows):
        if row.get("id") is None:
            row["id"] = f"{prefix}-{i}"
    return rows


def is_local(data: str | None) -> bool:
    """``data`` names a local file: it exists, or ends in a data-file suffix (so a typo says "no such file")."""
    return data is not None and (Path(data).exists() or Path(data).suffix.lower() in SUPPORTED_SUFFIXES)


def load_rows(cfg: DataConfig, normalise: Callable[[Row], Row], *, fields: Sequence[str], demo_file: Path,
              hub: HubSet | None, demo_val_fraction: float = 0.2, holdout_fraction: float = 0.1,
              group: str | None = None, balance: str | None = None,
              prepare: Callable[[Path, list[Any]], list[Any]] | None = None, required: Sequence[str] = (),
              text_fields: Sequence[str] = (), numbered_ids: bool = False) -> LoadedRows:
    """Load, normalise, hold out and limit a task's rows (source order in the module docstring).

    Args:
        cfg: the data configuration.
        normalise: the task's row function (raises :class:`BadRow`).
        fields: every field ``normalise`` reads: what ``cfg.columns`` may map to.
        demo_file: the bundled demo set.
        hub: the default hub set; None: the task has none, and a missing ``--data`` is an error.
        demo_val_fraction: share of the demo set held out.
        holdout_fraction: share of a training file held out when no validation file or split is given.
        group: field held out in equal shares (see :func:`holdout`).
        balance: field balanced when ``max_train_samples``/``max_val_samples`` cut (see :func:`take_balanced`).
        prepare: ``prepare(path, raw_rows) -> raw_rows`` for a local file before ``normalise`` (e.g. to fill a
            field from a file next to it).
        required: fields every row of a local file must hold, checked by
            :func:`~gemma_lowmem.data.records.read_records` so that the error names the line (``normalise`` sees
            hub rows unchecked).
        text_fields: fields of a local file's rows that must be non-empty text, checked the same way.
        numbered_ids: a row that ``normalise`` gives the id None gets ``<file stem>-<i>`` (hub:
            ``<set>-<split>-<i>``), ``i`` counting the usable rows of its file or split.

    Returns:
        The rows and what was skipped.
    """
    check_columns(cfg.columns, fields, cfg.task)
    bad = BadRows()

    def local(path: str | Path) -> list[Row]:
        path = Path(path)
        raw = read_records(path, required, text_fields, skip_bad_rows=cfg.skip_bad_rows, bad_rows=bad,
                           columns=cfg.columns)
        rows = normalise_rows(prepare(path, raw) if prepare else raw, normalise, str(path), cfg.skip_bad_rows, bad,
                              cfg.columns)
        return _number_ids(rows, path.stem) if numbered_ids else rows

    def from_hub(chosen: HubSet, split: str, limit: int | None) -> list[Row]:
        # Slicing on the hub side keeps a 287k-row split out of memory.
        sliced = f"{split}[:{limit}]" if chosen.sliced and limit else split
        rows = normalise_rows(load_hub_records(chosen.name, chosen.config, sliced, cfg.columns), normalise,
                              f"{chosen.name} ({sliced})", cfg.skip_bad_rows, bad, cfg.columns)
        return _number_ids(rows, f"{chosen.name.split('/')[-1]}-{split}") if numbered_ids else rows

    val: list[Row] | None = None
    if cfg.demo:
        if not demo_file.exists():
            raise UserError(f"{demo_file}: the bundled demo set is missing; reinstall gemma-lowmem")
        train, val = holdout(local(demo_file), demo_val_fraction, str(demo_file), group)
        source = f"demo set {demo_file.name}"
    elif cfg.train_file or is_local(cfg.data):
        source = str(cfg.train_file or cfg.data)
        train = local(source)
    elif cfg.data is None and hub is None:
        raise UserError(f"task '{cfg.task}' has no default data set: give a local file with --data PATH "
                        "(JSONL/CSV/Parquet) or use --demo")
    else:
        chosen = hub if cfg.data is None or (hub is not None and cfg.data == hub.name) else HubSet(cfg.data)
        source = f"hub data set {chosen.name}" + (f" ({chosen.config})" if chosen.config else "")
        train = from_hub(chosen, chosen.train_split, cfg.max_train_samples)
        if not cfg.val_file and chosen.val_split:
            try:
                val = from_hub(chosen, chosen.val_split, cfg.max_val_samples)
            except UserError as err:  # the train split loaded, so the set most likely has no such split
                log.warning("no '%s' split (%s); holding out %.0f%% of the training rows", chosen.val_split, err,
                            100 * holdout_fraction)
    if cfg.val_file:
        val = local(cfg.val_file)
    if val is None:
        train, val = holdout(train, holdout_fraction, source, group)
    if bad.count:
        log.warning("%s: skipped %d bad row(s), e.g. %s", source, bad.count, "; ".join(bad.reasons[:3]))
    return LoadedRows(take_balanced(train, cfg.max_train_samples, balance),
                      take_balanced(val, cfg.max_val_samples, balance), bad, source)
