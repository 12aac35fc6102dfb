"Every console command answers --help: exit 0, its own name in the usage line, and its options listed."
import configparser
import subprocess

import pytest

from conftest import REPO


def console_scripts() -> dict[str, str]:
    "Command name -> entry point, as settings.ini declares them."
    ini = configparser.ConfigParser(); ini.read(REPO / 'settings.ini')
    lines = [l.strip() for l in ini['DEFAULT']['console_scripts'].splitlines() if l.strip()]
    return dict(l.split('=', 1) for l in lines)


@pytest.mark.parametrize('name', sorted(console_scripts()))
def test_help_exits_zero_and_lists_options(name):
    p = subprocess.run([name, '--help'], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f'usage: {name}') and '-h, --help' in p.stdout and p.stderr == ''
    assert p.stdout.count('\n  -') >= 2  # at least one option of its own besides --help
