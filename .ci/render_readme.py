"""Render README.md from nbs/index.ipynb (what nbdev_readme does, without Quarto, which cannot be
installed offline). `--check` exits 1 when README.md is out of date."""
import sys
from pathlib import Path

from nbconvert import MarkdownExporter

ROOT = Path(__file__).resolve().parents[1]


def render() -> str:
    """The README text rendered from the index notebook."""
    body, _ = MarkdownExporter(exclude_input_prompt=True, exclude_output_prompt=True).from_filename(str(ROOT / 'nbs' / 'index.ipynb'))
    return body.strip() + '\n'


if __name__ == '__main__':
    text, readme = render(), ROOT / 'README.md'
    if '--check' in sys.argv:
        if readme.read_text() != text:
            sys.exit('README.md is out of date with nbs/index.ipynb: run python .ci/render_readme.py and commit')
    else:
        readme.write_text(text)
