"""The test command itself: a native crash names its test and the rest of the suite still runs."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_crashing_test_is_named_and_the_others_run(tmp_path):
    (tmp_path / "test_crash.py").write_text(
        "import ctypes\n"
        "def test_before():\n    pass\n"
        "def test_segfault():\n    ctypes.string_at(0)\n"
        "def test_after():\n    pass\n")
    (tmp_path / "test_other.py").write_text("def test_other():\n    pass\n")
    # the options of `make test` (Makefile) and setup.cfg's addopts
    make = (REPO / "Makefile").read_text()
    options = re.search(r"pytest (.*) tests\n", make).group(1).split()
    result = subprocess.run([sys.executable, "-m", "pytest", *options, "-p", "faulthandler",
                             "-p", "no:cacheprovider", "-q", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "crashed while running 'test_crash.py::test_segfault'" in out
    assert "INTERNALERROR" not in out
    assert re.search(r"1 failed, 3 passed", out), out
