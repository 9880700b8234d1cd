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


def test_results_are_as_readable_as_any_file_the_user_writes(tmp_path):
    import os
    import stat

    with atomic_open(tmp_path / "summary.json") as out:
        out.write("{}")
    (tmp_path / "plain.txt").write_text("x")
    mode = stat.S_IMODE(os.stat(tmp_path / "summary.json").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode), oct(mode)


def test_a_folder_holding_the_commands_own_input_is_refused_even_with_force(tmp_path):
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text("name: x\n")
    with pytest.raises(OutputError, match="the command's own input"):
        prepare_folder(tmp_path, force=True, inputs=(scenario,))
    assert scenario.read_text() == "name: x\n"
