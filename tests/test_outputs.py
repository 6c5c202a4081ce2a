"""An output that cannot be written is one line naming the path and the fix, exit code 2, before any
work starts, in every command that writes files."""
import os
import shutil
import subprocess
import time

import pytest

from condensevit.cli import main
from condensevit.outputs import OutputError, check_output_dir, check_output_file


def _writable(folder) -> bool:
    try:
        with open(os.path.join(folder, "probe"), "w"):
            pass
    except OSError:
        return False
    os.unlink(os.path.join(folder, "probe"))
    return True


@pytest.fixture
def unwritable(tmp_path):
    """A folder nobody may write into: read-only permissions, or (for root, whom permissions do not
    stop) the immutable flag."""
    folder = tmp_path / "locked"
    folder.mkdir()
    undo = None
    os.chmod(folder, 0o555)
    if _writable(folder) and shutil.which("chattr"):
        os.chmod(folder, 0o755)
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
            undo = ["chattr", "-i", str(folder)]
    if _writable(folder):
        if undo:
            subprocess.run(undo)
        pytest.skip("no way to make a folder unwritable here (root without chattr)")
    yield folder
    if undo:
        subprocess.run(undo)
    os.chmod(folder, 0o755)


@pytest.mark.parametrize("argv,flag,target", [
    (["train", "--model", "deit_tiny_patch16_224", "--output", "{d}/run"], "--output", "{d}/run"),
    (["train", "--model", "deit_tiny_patch16_224", "--output", "{d}"], "--output", "{d}"),
    (["bench", "--models", "deit_tiny_patch16_224", "--json", "{d}/b.json"], "--json", "{d}/b.json"),
    (["bench", "--models", "deit_tiny_patch16_224", "--plot", "{d}/sub/b.png"], "--plot", "{d}/sub/b.png"),
    (["viz", "--model", "stvit_deit_tiny_patch16_224", "--image", "sample:china", "--out", "{d}/x.png"], "--out",
     "{d}/x.png"),
    (["demo", "--out", "{d}/demo"], "--out", "{d}/demo"),
])
def test_an_unwritable_output_is_one_line_naming_it_before_any_work(unwritable, capsys, argv, flag, target):
    d = str(unwritable)
    t0 = time.perf_counter()
    assert main([a.format(d=d) for a in argv]) == 2
    assert time.perf_counter() - t0 < 20  # no training, no benchmark, no model run
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert f"cannot write to {target.format(d=d)}" in err and f"pass another {flag}" in err
    assert os.listdir(unwritable) == []


def test_output_checks_name_a_file_in_the_way(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputError, match="is a file, not a folder; pass another --out"):
        check_output_file(tmp_path / "f" / "x.png", "--out")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "f", "--output")
    with pytest.raises(OutputError, match="is a folder; give a file name"):
        check_output_file(tmp_path, "--json")
    # a folder that does not exist yet is fine (and not created by the check)
    assert check_output_dir(tmp_path / "new" / "deeper") == str(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists() and os.listdir(tmp_path) == ["f"]
