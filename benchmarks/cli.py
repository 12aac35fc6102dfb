"""How fast do the console commands answer `--help` and a usage error?

    python benchmarks/cli.py [--repeats 5]

For every registered console command, the wall time of a fresh process running
- `CMD --help` (skinkd parses in `skinkd.cli`, which loads no PyTorch), and
- `CMD --no-such-flag` (argparse's usage error, status 2),
against what the same answer cost before `skinkd.cli` existed: a process that imports the command's chapter
module (PyTorch, torchvision, ...) and then builds the parser. Best of `repeats`, alternated, so machine
noise hits both alike; the ratio is eager / lazy. The target is about two seconds for help and errors.
"""
import argparse
import subprocess
import sys
import time

from skinkd.core import (COMMANDS)  # the registered commands (tests/test_cli.py checks they are settings.ini's scripts)


def wall(cmd: list[str]) -> float:
    "Wall seconds of one process running `cmd` (its output discarded)."
    t = time.perf_counter(); subprocess.run(cmd, capture_output=True); return time.perf_counter() - t


def eager_cmd(prog: str) -> list[str]:
    "A process that pays what --help used to: import the chapter that does the work, then print the help."
    code = (f"import importlib, skinkd.cli as c; importlib.import_module(c.COMMANDS[{prog!r}].target.split(':')[0]); "
            f"c.build_parser({prog!r}).format_help()")
    return [sys.executable, '-c', code]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--repeats', type=int, default=5, help='runs per variant (best is reported)')
    a = p.parse_args()
    print('| command | --help s | usage error s | import chapter + help s (before) | speed-up |\n|---|---|---|---|---|')
    for prog in sorted(COMMANDS):
        times = {'help': [], 'error': [], 'eager': []}
        for _ in range(a.repeats):
            times['help'].append(wall([prog, '--help']))
            times['error'].append(wall([prog, '--no-such-flag']))
            times['eager'].append(wall(eager_cmd(prog)))
        best = {k: min(v) for k, v in times.items()}
        print(f"| {prog} | {best['help']:.2f} | {best['error']:.2f} | {best['eager']:.2f} | {best['eager'] / best['help']:.1f}x |")


if __name__ == '__main__':
    main()
