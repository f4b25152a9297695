from pathlib import Path

import pytest

from recsketch.errors import BadInputError, InvalidModelId
from recsketch.ids import is_model_id, validate_model_id
from recsketch.psv import read_likes, read_models, write_psv
from tests.catalogs import REAL_CATALOGUE, SAMPLE_CATALOGUE

HEX = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("value", [HEX, "b7LzIm8JrnPw4GBDOMBNGYc39qM", "dGUrytaktlDeNudCEGKk31oTJY"])
def test_model_ids_accepted(value: str) -> None:
    assert validate_model_id(value) == value


@pytest.mark.parametrize("value", ["", "../../etc/passwd", HEX.upper(), HEX[:-1] + "g", "/" + HEX[1:],
                                   "x" * 25, "x" * 28, HEX + "\n", None, 42, "a b" * 9])
def test_model_ids_rejected(value: object) -> None:
    assert not is_model_id(value)
    with pytest.raises(InvalidModelId, match="not a Sketchfab model id"):
        validate_model_id(value, source="test input")


def test_the_sample_of_the_real_catalogue_keeps_its_quirks() -> None:
    result = read_models(SAMPLE_CATALOGUE)
    assert result.problems == [] and len(result.rows) == 332 and result.duplicates == 2
    names = {row.mid: row.name for row in result.rows}
    assert names["0dea8bff43c34e97a830801fd534528b"] == "Overwatch | Dva Fan Art"  # backslash-quoted
    assert sum(len(mid) != 32 for mid in names) == 30  # legacy ids


@pytest.mark.skipif(not REAL_CATALOGUE.exists(), reason="the whole shared/data/model_urls.psv is not beside the repo")
def test_real_catalogue_reads_as_the_seed_counted_it() -> None:
    result = read_models(REAL_CATALOGUE)
    assert result.problems == []
    assert len(result.rows) == 28_806  # the seed's count before thresholding
    assert result.duplicates == 18
    names = {row.mid: row.name for row in result.rows}
    assert names["0dea8bff43c34e97a830801fd534528b"] == "Overwatch | Dva Fan Art"  # backslash-quoted
    assert sum(len(mid) != 32 for mid in names) == 953  # legacy ids are kept (954 rows, 1 duplicate)


def test_dialect_round_trip_and_bad_rows_are_named(tmp_path: Path) -> None:
    path = tmp_path / "model_urls.psv"
    rows = [("A | B", HEX, ""), ("plain", "b7LzIm8JrnPw4GBDOMBNGYc39qM", "2026-01-02T03:04:05+00:00")]
    write_psv(path, ("name", "mid", "published_at"), rows)
    text = path.read_text()
    assert "\\A | B\\" in text  # quoted with backslashes, as rec-a-sketch wrote it
    # append: a duplicate, a bad id, a wrong field count and a CRLF line
    path.write_text(text + f"again|{HEX}|\nbad|not-an-id|\ntoo|many|fields|here\r\ncrlf|{'a' * 32}|\r\n")
    result = read_models(path)
    assert [r.mid for r in result.rows] == [HEX, "b7LzIm8JrnPw4GBDOMBNGYc39qM", "a" * 32]
    assert result.rows[0].name == "A | B"
    assert result.rows[1].published_at is not None and result.rows[1].published_at.day == 2
    assert result.duplicates == 1
    assert len(result.problems) == 2
    assert any(":5:" in p and "not-an-id" in p for p in result.problems)
    assert any(":6:" in p and "4 fields" in p for p in result.problems)


def test_likes_duplicates_dropped_and_header_checked(tmp_path: Path) -> None:
    path = tmp_path / "model_likes_anon.psv"
    write_psv(path, ("modelname", "mid", "uid"), [("m", HEX, "u1"), ("m", HEX, "u1"), ("m", HEX, "u2")])
    result = read_likes(path)
    assert [(r.mid, r.uid) for r in result.rows] == [(HEX, "u1"), (HEX, "u2")]
    assert result.duplicates == 1
    path.write_text("mid|uid\n")
    with pytest.raises(BadInputError, match="header"):
        read_likes(path)


def test_a_non_utf8_line_is_named_and_the_rest_read(tmp_path: Path) -> None:
    path = tmp_path / "model_urls.psv"
    path.write_bytes(b"name|mid\nok|" + HEX.encode() + b"\n\xff\xfe|" + HEX.encode() + b"\nafter|" + b"1" * 32 + b"\n")
    result = read_models(path)
    assert [row.name for row in result.rows] == ["ok", "after"]
    assert len(result.problems) == 1 and result.problems[0].startswith(f"{path}:3: not UTF-8")
