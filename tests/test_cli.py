"Every console command answers --help: exit 0, its own name in the usage line, and its options listed."
import configparser
from pathlib import Path
import subprocess
import sys

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


def test_help_and_usage_errors_load_no_pytorch():
    "Building every parser, --help and a bad flag all answer from skinkd.cli without importing torch."
    probe = ('import sys, contextlib, io\nimport skinkd.cli as c\n'
             'for prog in c.COMMANDS:\n'
             '    for argv in (["--help"], ["--no-such-flag"]):\n'
             '        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n'
             '            try: c.launch(prog, argv)\n'
             '            except SystemExit as e: assert e.code == (0 if argv == ["--help"] else 2), (prog, argv, e.code)\n'
             'print(sorted(m for m in ("torch", "torchvision", "papermill") if m in sys.modules))\n')
    p = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == '[]'


def test_console_scripts_are_the_registered_commands():
    "settings.ini's console scripts and skinkd.cli's commands are the same set, each pointing at its entry point."
    from skinkd import cli
    scripts = console_scripts()
    assert sorted(scripts) == sorted(cli.COMMANDS)
    for prog, target in scripts.items():
        module, name = target.split(':')
        assert module == 'skinkd.cli' and getattr(cli, name).__doc__.startswith(prog + ':')


def test_usage_error_exits_2_with_one_usage_line():
    p = subprocess.run(['skinkd_distill', '--mode', 'bogus'], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == '' and p.stderr.count('usage: skinkd_distill') == 1
    assert "skinkd_distill: error: argument --mode: invalid choice: 'bogus'" in p.stderr.splitlines()[-1]  # argparse's wording of the choices varies by Python


def test_a_successful_command_exits_zero(tmp_path):
    "A real console command runs end to end through skinkd.cli and exits 0 with its own output and nothing on stderr."
    p = subprocess.run(['skinkd_synth', '--out', str(tmp_path / 'syn'), '--n', '3', '--size', '32'], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stderr == '', p.stderr
    assert p.stdout.startswith('wrote 3 synthetic images (32 px, seed 0)')
    assert len(list((tmp_path / 'syn').rglob('*_segmentation.png'))) == 3


def test_entry_points_exit_zero_when_the_command_returns_a_value():
    "pip's console scripts run sys.exit(main()): an entry point must return None even when its command returns a result."
    code = ('import sys\nfrom skinkd import cli\n'
            "cli.command('skinkd_probe', 'Return the options.', 'builtins:vars', config=False)(lambda p: p.add_argument('--x', default='1'))\n"
            "assert cli.launch('skinkd_probe', []) == {'x': '1'}\n"
            "sys.exit(cli.entry_point('skinkd_probe')([]))\n")
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stderr == '', p.stderr


def test_no_module_imports_a_later_chapter():
    "Floors in reading order: every import of a skinkd module, at the top or inside a function, names an earlier chapter."
    import ast, re
    pkg = Path(__file__).resolve().parents[1] / 'skinkd'
    chapter = {p.stem: m.group(1) for p in pkg.glob('*.py') if (m := re.search(r'File to edit: \.\./nbs/(\S+)\.ipynb', p.read_text()))}
    assert chapter['overlays'] < chapter['evaluate'] < chapter['viewer'] and len(chapter) >= 15
    late = []
    for mod, nb in chapter.items():
        for node in ast.walk(ast.parse((pkg / f'{mod}.py').read_text())):
            names = ([node.module.split('.')[0]] if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module else
                     [node.module.split('.')[1]] if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('skinkd.') else
                     [a.name.split('.')[1] for a in node.names if a.name.startswith('skinkd.')] if isinstance(node, ast.Import) else [])
            late += [f'{mod} ({nb}) imports {n} ({chapter[n]}) at line {node.lineno}' for n in names if n in chapter and chapter[n] > nb]
    assert late == []


def test_chapters_papermill_may_run_do_not_rewrite_the_library():
    "A chapter with a parameters cell can run under papermill, which ignores nbdev flags: it must not call nbdev_export."
    import json
    for nb in sorted((Path(__file__).resolve().parents[1] / 'nbs').glob('*.ipynb')):
        cells = json.loads(nb.read_text())['cells']
        if any('parameters' in c.get('metadata', {}).get('tags', []) for c in cells):
            assert not any('nbdev_export(' in ''.join(c['source']) for c in cells if c['cell_type'] == 'code'), nb.name


def test_every_command_runs_a_function_that_exists():
    "A command's target (and each --mode route) names a function of a chapter: a moved function is caught here."
    import importlib
    from skinkd.core import COMMANDS
    for prog in COMMANDS:
        c = COMMANDS.get(prog)
        for target in (c.target, *(t for _, t in c.routes)):
            module, function = target.split(':')
            assert callable(getattr(importlib.import_module(module), function, None)), f'{prog}: {target}'
