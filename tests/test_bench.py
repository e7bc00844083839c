"""Benchmarks cannot rot: each bench/*.py runs its --smoke mode (a tiny model, a few steps) and prints its figures."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

# What each benchmark must print: the figures it exists for.
FIGURES = {
    "soul_overhead.py": ("median step", "ratio soul/lora ="),
    "fuse.py": ("peak RSS streaming/straightforward =", "outputs equal: max |difference| 0"),
    "train_throughput.py": ("unpacked  trained tokens/s", "packed    trained tokens/s", "packed/unpacked"),
}
# bench/fullsize.py has a smoke test of its own (tests/test_resources.py::test_fullsize_bench_smoke).
OWN_TEST = {"fullsize.py"}
NOT_BENCHMARKS = {"__init__.py", "common.py"}


def test_every_benchmark_has_a_smoke_run_here():
    benches = {p.name for p in (REPO / "bench").glob("*.py")} - NOT_BENCHMARKS - OWN_TEST
    assert benches == set(FIGURES), "a benchmark without a smoke test here (or a stale entry)"


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_benchmark_smoke_mode(name):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / name), "--smoke"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for figure in FIGURES[name]:
        assert figure in proc.stdout, (figure, proc.stdout[-2000:])
