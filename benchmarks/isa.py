"""Cap the CPU instructions PyTorch uses, before it loads (imported by the benchmarks ahead of torch).

`--isa avx2` sets ATEN_CPU_CAPABILITY (PyTorch's vectorised kernels, and Inductor's generated code, which follows it),
ONEDNN_MAX_CPU_ISA (oneDNN's convolutions and matmuls) and MKL_ENABLE_INSTRUCTIONS (MKL's GEMMs): the code paths an
AVX2-only CPU runs, on this CPU's cores and caches (clock, cache sizes and memory bandwidth stay this machine's).
"""
import os

ISA_CAPS = {'avx2': dict(ATEN_CPU_CAPABILITY='avx2', ONEDNN_MAX_CPU_ISA='AVX2', MKL_ENABLE_INSTRUCTIONS='AVX2'),
            'avx512': dict(ATEN_CPU_CAPABILITY='avx512', ONEDNN_MAX_CPU_ISA='AVX512_CORE', MKL_ENABLE_INSTRUCTIONS='AVX512'),
            'native': {}}


def cap_isa(argv: list[str]):
    "Apply `--isa NAME` (or `--isa=NAME`) from the command line to the environment; call it before importing torch."
    for i, a in enumerate(argv):
        name = a.split('=', 1)[1] if a.startswith('--isa=') else argv[i + 1] if a == '--isa' and i + 1 < len(argv) else None
        if name in ISA_CAPS: os.environ.update(ISA_CAPS[name])
