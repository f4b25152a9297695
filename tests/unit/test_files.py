from pathlib import Path

import pytest

from recsketch import storage


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "result.bin"
    storage.write_bytes(target, b"old")
    with pytest.raises(OSError, match="disk full"), storage.atomic_write(target) as handle:
        handle.write(b"half of the new")
        raise OSError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["result.bin"]
    storage.write_text(target, "new")
    assert target.read_text() == "new"
