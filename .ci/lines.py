"""Line discipline of the library (issue 31): no statement chained with `;` and no line over 120 characters in
skinkd/*.py. What nbdev writes itself is left out: `_modidx.py` (its index of names) and each module's `__all__`.
"""
import ast
import io
import sys
import tokenize
from pathlib import Path

LIMIT = 120


def chained(path: Path) -> list[int]:
    "Line numbers where a `;` token joins two statements."
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return [t.start[0] for t in tokens if t.type == tokenize.OP and t.string == ';']


def generated(text: str) -> set[int]:
    "Line numbers of the `__all__` list nbdev writes (and wraps) itself."
    return {n for node in ast.parse(text).body if isinstance(node, ast.Assign)
            and any(getattr(t, 'id', '') == '__all__' for t in node.targets)
            for n in range(node.lineno, node.end_lineno + 1)}


def too_long(path: Path) -> list[int]:
    "Line numbers of the lines over LIMIT characters."
    text = path.read_text()
    skip = generated(text)
    return [n for n, line in enumerate(text.splitlines(), 1) if len(line) > LIMIT and n not in skip]


def main() -> int:
    files = [f for f in sorted(Path('skinkd').glob('*.py')) if f.name != '_modidx.py']
    semis = [f'{f}:{n}' for f in files for n in chained(f)]
    long = [f'{f}:{n}' for f in files for n in too_long(f)]
    print(f'line discipline: {len(semis)} statement chains with ;, {len(long)} lines over {LIMIT} characters in skinkd/')
    if semis:
        print('split these into one statement per line (in the notebooks, then nbdev_export): ' + ', '.join(semis[:10]),
              file=sys.stderr)
    if long:
        print(f'wrap these to {LIMIT} characters (in the notebooks, then nbdev_export): ' + ', '.join(long[:10]),
              file=sys.stderr)
    return 1 if semis or long else 0


if __name__ == '__main__':
    sys.exit(main())
