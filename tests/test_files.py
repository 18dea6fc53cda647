"""Files on disk (`lorakit.files`): atomic folder and file writes, the writability probe, hub-id
shapes."""

from pathlib import Path

import pytest

from lorakit.errors import LorakitError
from lorakit.files import (
    atomic_dir,
    atomic_file,
    atomic_write_text,
    check_writable,
    looks_like_hub_id,
)


def test_atomic_dir_failure_keeps_the_old_folder(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "weights").write_text("old")
    with pytest.raises(OSError), atomic_dir(target) as staging:
        (staging / "weights").write_text("half")
        raise OSError(28, "No space left on device")
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_atomic_file_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as staging:
        staging.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_writability_is_probed_at_the_nearest_existing_folder(tmp_path):
    check_writable(tmp_path / "runs" / "a" / "b", "output.dir")  # nothing created
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(LorakitError, match="is a file, not a folder"):
        check_writable(tmp_path / "file" / "run", "output.dir")
    with pytest.raises(
        LorakitError, match="^--out: cannot write /proc/x/y: creating a file in /proc"
    ):
        check_writable(Path("/proc/x/y"), "--out")


@pytest.mark.parametrize(
    ("reference", "hub"),
    [
        ("org/model", True),
        ("./org/model", False),
        ("/abs/model", False),
        ("a/b/c", False),
        ("model", False),
        ("~/model", False),
    ],
)
def test_hub_id_shape(reference, hub):
    assert looks_like_hub_id(reference) is hub
