"""Line discipline of the library (issue 31): no statements chained with `;` in skinkd/*.py (an error), and the
count of lines over 120 characters (reported; it becomes an error once the long lines are wrapped)."""
import io
import sys
import tokenize
from pathlib import Path

LIMIT = 120


def chained(path: Path) -> list[int]:
    "Line numbers where a `;` token joins two statements."
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return [t.start[0] for t in tokens if t.type == tokenize.OP and t.string == ';']


def main() -> int:
    files = sorted(Path('skinkd').glob('*.py'))
    semis = [f'{f}:{n}' for f in files for n in chained(f)]
    long = sum(len(line) > LIMIT for f in files for line in f.read_text().splitlines())
    print(f'line discipline: {len(semis)} statement chains with ;, {long} lines over {LIMIT} characters in skinkd/')
    if semis:
        print('split these into one statement per line (in the notebooks, then nbdev_export): ' + ', '.join(semis[:10]),
              file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
