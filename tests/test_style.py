"""The house's shape: the line discipline of `.ci/lines.py` (run by tests/run.sh), the inference floor, and the
README's chapter table against the notebooks."""
import ast
import json
import re
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


def test_a_long_line_is_named_and_the_generated_index_is_not(tmp_path):
    (tmp_path / 'skinkd').mkdir()
    (tmp_path / 'skinkd' / 'm.py').write_text('x = 1\n' + 'y = ' + '1 + ' * 30 + '1\n')
    (tmp_path / 'skinkd' / '_modidx.py').write_text('d = ' + repr('x' * 200) + '\n')
    p = lines_check(tmp_path)
    assert p.returncode == 1 and 'skinkd/m.py:2' in p.stderr and '_modidx' not in p.stderr
    assert '1 lines over 120 characters' in p.stdout


def test_the_library_keeps_the_line_discipline():
    p = lines_check(REPO)
    assert p.returncode == 0 and p.stdout.startswith('line discipline: 0 statement chains with ;, 0 lines over 120'), p.stderr


def skinkd_imports(module: str) -> set[str]:
    "The skinkd modules `module` imports, at the top or inside a function."
    tree = ast.parse((REPO / 'skinkd' / f'{module}.py').read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module: found.add(node.module.split('.')[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('skinkd.'): found.add(node.module.split('.')[1])
        elif isinstance(node, ast.Import): found |= {a.name.split('.')[1] for a in node.names if a.name.startswith('skinkd.')}
    return found


def reachable(module: str) -> set[str]:
    "Every skinkd module `module` imports, directly or through others."
    seen, todo = set(), [module]
    while todo:
        for m in skinkd_imports(todo.pop()) - seen:
            seen.add(m)
            todo.append(m)
    return seen


def test_inference_imports_no_training_and_no_reporting():
    for module in ('infer', 'predict', 'export'):
        assert not reachable(module) & {'learner', 'evaluate', 'experiment', 'distill', 'teacher', 'pipeline'}, module


def test_the_readme_chapter_table_lists_the_notebooks_in_order():
    notebooks = sorted(p.stem for p in (REPO / 'nbs').glob('*.ipynb') if p.stem != 'index')
    table = re.findall(r'^\| `(\w+)` \| (?:`skinkd\.(\w+)`)? \|', (REPO / 'README.md').read_text(), re.M)
    assert [name for name, _ in table] == notebooks
    for name, module in table:
        cells = json.loads((REPO / 'nbs' / f'{name}.ipynb').read_text())['cells']
        exp = next((m.group(1) for c in cells if (m := re.match(r'#\| default_exp (\w+)', ''.join(c['source'])))), '')
        assert exp == module, name
