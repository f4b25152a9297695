"""The rec-a-sketch PSV dialect (docs/contracts.md §1): ``|`` separated, backslash as quote character.

Readers never stop at a bad row: they return the good rows and a list of problems, each
naming the file and line, so one malformed line costs one row and is reported.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from recsketch.errors import BadInputError
from recsketch.ids import is_model_id
from recsketch.timestamps import parse_utc


class RecASketchDialect(csv.Dialect):
    delimiter = "|"
    quotechar = "\\"
    doublequote = False
    escapechar = None
    quoting = csv.QUOTE_MINIMAL
    lineterminator = "\n"
    skipinitialspace = False
    strict = True


@dataclass(frozen=True)
class ModelRow:
    mid: str
    name: str
    published_at: datetime | None = None


@dataclass(frozen=True)
class LikeRow:
    mid: str
    uid: str
    modelname: str = ""
    liked_at: datetime | None = None


@dataclass
class ReadResult:
    rows: list
    problems: list[str]
    duplicates: int = 0


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise BadInputError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise BadInputError(f"{path}:{line}: not UTF-8 ({exc.reason})") from None


def _records(path: Path, header: Sequence[str], *, stream: bool = False) -> Iterator[tuple[int, list[str] | str]]:
    """Yield (line number, fields) or (line number, problem) for each data row. ``stream``: read
    the file as it is parsed (memory: one row), for files too large to hold as one string."""
    if not stream:
        yield from _parse(io.StringIO(_read_text(path), newline=""), path, header)
        return
    try:
        handle = path.open(encoding="utf-8", newline="")
    except FileNotFoundError:
        raise BadInputError(f"{path}: file not found") from None
    with handle:
        yield from _parse(handle, path, header)


def _parse(lines: Iterable[str], path: Path, header: Sequence[str]) -> Iterator[tuple[int, list[str] | str]]:
    reader = csv.reader(lines, RecASketchDialect)
    try:
        first = next(reader)
    except StopIteration:
        raise BadInputError(f"{path}: empty file, expected header {'|'.join(header)}") from None
    except UnicodeDecodeError as exc:  # a streamed file is decoded as it is read
        raise BadInputError(f"{path}:1: not UTF-8 ({exc.reason})") from None
    except csv.Error as exc:
        raise BadInputError(f"{path}:1: unreadable header ({exc}), expected {'|'.join(header)}") from None
    if [f.strip() for f in first[: len(header)]] != list(header):
        raise BadInputError(f"{path}:1: header {'|'.join(first)!r}, expected {'|'.join(header)}")
    width = len(first)
    while True:
        line = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except UnicodeDecodeError as exc:
            raise BadInputError(f"{path}: not UTF-8 ({exc.reason}) at or after line {line}") from None
        except csv.Error as exc:
            yield line, f"{path}:{line}: {exc}"
            continue
        if not fields:
            continue
        if len(fields) != width:
            yield line, f"{path}:{line}: {len(fields)} fields, expected {width}"
            continue
        yield line, [f.strip("\r") for f in fields]


def _optional_time(fields: list[str], index: int, column: str, where: str) -> datetime | str | None:
    """An optional ISO 8601 column: the time, None when absent or empty, or the problem."""
    if len(fields) <= index or not fields[index]:
        return None
    try:
        return parse_utc(fields[index])
    except ValueError:
        return f"{where}: bad {column} {fields[index]!r}"


def read_models(path: Path) -> ReadResult:
    """``model_urls.psv``: ``name|mid`` with an optional ``published_at`` column."""
    result = ReadResult([], [])
    seen: set[str] = set()
    for line, fields in _records(path, ("name", "mid")):
        if isinstance(fields, str):
            result.problems.append(fields)
            continue
        name, mid = fields[0], fields[1]
        if not is_model_id(mid):
            result.problems.append(f"{path}:{line}: {mid!r} is not a model id")
            continue
        published = _optional_time(fields, 2, "published_at", f"{path}:{line}")
        if isinstance(published, str):
            result.problems.append(published)
            continue
        if mid in seen:
            result.duplicates += 1
            continue
        seen.add(mid)
        result.rows.append(ModelRow(mid=mid, name=name, published_at=published))
    return result


def iter_likes(path: Path, *, stream: bool = False) -> Iterator[LikeRow | str]:
    """``model_likes_anon.psv`` row by row: a LikeRow, or the problem of a bad row (duplicates
    are not dropped here)."""
    for line, fields in _records(path, ("modelname", "mid", "uid"), stream=stream):
        if isinstance(fields, str):
            yield fields
            continue
        modelname, mid, uid = fields[:3]
        if not is_model_id(mid):
            yield f"{path}:{line}: {mid!r} is not a model id"
            continue
        if not uid:
            yield f"{path}:{line}: empty uid"
            continue
        liked_at = _optional_time(fields, 3, "liked_at", f"{path}:{line}")
        if isinstance(liked_at, str):
            yield liked_at
            continue
        yield LikeRow(mid=mid, uid=uid, modelname=modelname, liked_at=liked_at)


def read_likes(path: Path) -> ReadResult:
    """``model_likes_anon.psv``: ``modelname|mid|uid`` with an optional ``liked_at`` column;
    duplicate (mid, uid) pairs dropped."""
    result = ReadResult([], [])
    seen: set[tuple[str, str]] = set()
    for row in iter_likes(path):
        if isinstance(row, str):
            result.problems.append(row)
        elif (row.mid, row.uid) in seen:
            result.duplicates += 1
        else:
            seen.add((row.mid, row.uid))
            result.rows.append(row)
    return result


def write_psv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Write rows in the rec-a-sketch dialect (used by the demo and test catalogues)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, RecASketchDialect)
        writer.writerow(header)
        writer.writerows(rows)
