"""The rec-a-sketch PSV dialect (docs/contracts.md §1): ``|`` separated, backslash as quote character.

Readers never stop at a bad row: they return the good rows and a list of problems, each
naming the file and line, so one malformed line costs one row and is reported.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from recsketch.errors import BadInputError
from recsketch.ids import is_model_id, uid_problem
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


def _records(path: Path, header: Sequence[str], *, stream: bool = True) -> Iterator[tuple[int, list[str] | str]]:
    """Yield (line number, fields) or (line number, problem) for each data row, the file read
    line by line (memory: one row; ``stream`` is kept for callers, every read streams). A bad
    line costs that line: one that is not UTF-8, or whose ``\\`` quotes do not close (which
    would swallow every row after it), is a problem naming its line; a lone CR inside a field is a
    space (it would split the row)."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise BadInputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise BadInputError(f"{path}: a folder, not a file") from None
    with handle:
        yield from _parse(handle, path, header)


MAX_RECORD_LINES = 4  # a quoted field may span lines (the seed's data has names with a newline), this many at most


def _lines(handle: Iterable[bytes], path: Path, problems: list[tuple[int, str]], current: list[int]
           ) -> Iterator[str]:
    """The records of a binary file as text, each whole (its quotes balanced, no CR): a quoted
    field may span up to ``MAX_RECORD_LINES`` lines; a line whose quote does not close within
    them, or that is not UTF-8, goes to ``problems`` and the lines after it are read as usual.
    ``current[0]`` is the number of the record's first line."""
    quote = RecASketchDialect.quotechar
    decoded: list[tuple[int, str | None]] = []  # lines read ahead: (number, text or None if not UTF-8)
    source = enumerate(handle, 1)

    def fill(count: int) -> None:
        while len(decoded) < count:
            try:
                number, raw = next(source)
            except StopIteration:
                return
            try:
                text: str | None = raw.decode("utf-8").removesuffix("\n").removesuffix("\r").replace("\r", " ")
            except UnicodeDecodeError as exc:
                problems.append((number, f"{path}:{number}: not UTF-8 ({exc.reason})"))
                text = None
            decoded.append((number, text))

    while True:
        fill(1)
        if not decoded:
            return
        number, text = decoded.pop(0)
        if text is None:
            continue
        parts, quotes = [text], text.count(quote)
        while quotes % 2 and len(parts) < MAX_RECORD_LINES:  # an open quote: the record goes on
            fill(len(parts))
            if len(decoded) < len(parts) or decoded[len(parts) - 1][1] is None:
                break
            parts.append(str(decoded[len(parts) - 1][1]))
            quotes += parts[-1].count(quote)
        if quotes % 2:
            problems.append((number, f"{path}:{number}: a {quote} quote that does not close"))
            continue
        del decoded[:len(parts) - 1]
        current[0] = number
        yield "\n".join(parts)


def _parse(handle: Iterable[bytes], path: Path, header: Sequence[str]) -> Iterator[tuple[int, list[str] | str]]:
    problems: list[tuple[int, str]] = []
    current = [0]
    reader = csv.reader(_lines(handle, path, problems, current), RecASketchDialect)  # one reader: 6x per-line's
    try:
        first = next(reader)
    except StopIteration:
        first = None
    except csv.Error as exc:
        raise BadInputError(f"{path}:1: unreadable header ({exc}), expected {'|'.join(header)}") from None
    if problems and problems[0][0] == 1:
        raise BadInputError(f"{problems[0][1]}: the header is unreadable, expected {'|'.join(header)}")
    if first is None:
        raise BadInputError(f"{path}: empty file, expected header {'|'.join(header)}")
    if [f.strip() for f in first[: len(header)]] != list(header):
        raise BadInputError(f"{path}:1: header {'|'.join(first)!r}, expected {'|'.join(header)}")
    width = len(first)
    while True:
        try:
            fields: list[str] | None = next(reader)
            error = None
        except StopIteration:
            fields, error = None, None
        except csv.Error as exc:
            fields, error = None, str(exc)
        line = current[0]
        yield from problems  # the bad lines before this one, in order
        problems.clear()
        if error is not None:
            yield line, f"{path}:{line}: {error}"
            continue
        if fields is None:
            return
        if not fields:
            continue
        if len(fields) != width:
            yield line, f"{path}:{line}: {len(fields)} fields, expected {width}"
            continue
        yield line, fields


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
        name, mid = fields[0].replace("\x00", ""), fields[1]  # PostgreSQL's text holds no NUL
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
        if (problem := uid_problem(uid)) is not None:
            yield f"{path}:{line}: {problem}"
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
