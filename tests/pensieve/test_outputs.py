"""Results files are written whole or not at all; folders are checked before the work."""
import pytest

from pensieve.outputs import OutputError, atomic_open, prepare_folder


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "requests.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as out:
            out.write("half a row,")
            raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["requests.csv"]


def test_force_replaces_only_this_tools_files(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="already holds results"):
        prepare_folder(tmp_path)
    prepare_folder(tmp_path, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
