"""The line discipline check of `.ci/lines.py` (run by tests/run.sh): it names chained statements, not `;` in strings."""
import subprocess
import sys

from conftest import REPO


def lines_check(cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / '.ci' / 'lines.py')], cwd=cwd, capture_output=True, text=True)


def test_a_chained_statement_is_named_with_its_line(tmp_path):
    (tmp_path / 'skinkd').mkdir()
    (tmp_path / 'skinkd' / 'm.py').write_text("x = 'a;b'  # a ; in a string or comment is fine\na = 1; b = 2\n")
    p = lines_check(tmp_path)
    assert p.returncode == 1 and 'skinkd/m.py:2' in p.stderr and 'm.py:1' not in p.stderr
    assert p.stdout.startswith('line discipline: 1 statement chains with ;')


def test_the_library_chains_no_statements():
    p = lines_check(REPO)
    assert p.returncode == 0 and p.stdout.startswith('line discipline: 0 statement chains with ;'), p.stderr
