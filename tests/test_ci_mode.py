"""In CI (CI=true) a skip is a failure unless tests/conftest.py's SKIP_ALLOWED_IN_CI names the test;
outside CI a missing toolchain still skips, saying how to build it. The reliability tally counts
skips as skips.

Each case runs pytest in a subprocess: on a real test of the suite with the llama.cpp toolchain
made unavailable (LLAMA_CPP_DIR pointing at an empty folder), and on a scratch suite that uses
this suite's conftest.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

NEEDS_BINDINGS = "tests/test_tiny.py::test_chat_template_ids_are_llama_cpps"  # 3 cases


def pytest_run(cwd, *args: str, ci: bool, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    environ.update(env, **({"CI": "true"} if ci else {}))
    environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", *args],
                          cwd=cwd, capture_output=True, text=True, env=environ, timeout=600)


@pytest.mark.parametrize("ci", [True, False], ids=["ci", "local"])
def test_a_missing_toolchain_fails_in_ci_and_only_skips_outside_it(tmp_path, ci):
    proc = pytest_run(REPO, NEEDS_BINDINGS, ci=ci, LLAMA_CPP_DIR=str(tmp_path / "no-llama-cpp"))
    out = proc.stdout + proc.stderr
    assert f"the pinned llama.cpp is not built at {tmp_path / 'no-llama-cpp'}" in out
    if ci:
        summary = out.strip().splitlines()[-1]
        assert proc.returncode == 1 and "3 errors" in summary and "skipped" not in summary, summary  # at setup
        assert "skipped under CI=true, which only the tests in tests/conftest.py SKIP_ALLOWED_IN_CI may" in out
    else:
        assert proc.returncode == 0 and "3 skipped" in out


def test_a_toolchain_that_is_built_but_broken_fails_even_outside_ci(tmp_path):
    """The .complete marker is there, the libraries are not: an install step went wrong, never a skip."""
    broken = tmp_path / "llama-cpp"
    broken.mkdir()
    (broken / ".complete").touch()
    proc = pytest_run(REPO, NEEDS_BINDINGS, ci=False, LLAMA_CPP_DIR=str(broken))
    # The tiny model (session-scoped, so set up first) fails on the missing source of its real
    # vocabulary; a test that reached the bindings would fail on the missing library.
    assert proc.returncode == 1 and "skipped" not in proc.stdout, proc.stdout[-2000:]
    assert ("the pinned llama.cpp source has no models/ folder" in proc.stdout
            or "no libllama in" in proc.stdout), proc.stdout[-2000:]


SCRATCH_SUITE = {
    "test_ollama.py": '''
import pytest

def test_real_ollama_registers_answers_and_stops():
    pytest.skip("no Ollama here")
''',
    "test_skips.py": '''
import pytest

@pytest.fixture
def tool():
    pytest.skip("the tool is missing")

def test_skipped_in_its_call():
    pytest.skip("not today")

@pytest.mark.reliability("faults")
def test_skipped_by_its_fixture(tool):
    pass

@pytest.mark.reliability("faults")
def test_that_passes():
    pass

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_expected_to_fail():
    assert False
''',
    "test_module_skip.py": '''
import pytest

pytest.importorskip("no_such_module_anywhere")

def test_never_collected():
    pass
''',
}


@pytest.fixture
def scratch(tmp_path):
    """A suite of its own in tests/ beside a copy of this suite's conftest.py."""
    tests = tmp_path / "tests"
    tests.mkdir()
    shutil.copy2(REPO / "tests" / "conftest.py", tests / "conftest.py")
    for name, text in SCRATCH_SUITE.items():
        (tests / name).write_text(text, encoding="utf-8")
    return tmp_path


def test_in_ci_every_skip_fails_but_the_allowed_ones(scratch):
    proc = pytest_run(scratch, "tests", "--ignore=tests/test_module_skip.py", "-p", "no:warnings", ci=True)
    out = proc.stdout
    assert proc.returncode == 1
    assert "FAILED tests/test_skips.py::test_skipped_in_its_call - " in out
    assert "ERROR tests/test_skips.py::test_skipped_by_its_fixture - " in out
    assert "SKIPPED [1] tests/test_ollama.py" in out and "no Ollama here" in out  # on the allow-list
    assert "1 xfailed" in out  # an expected failure is not a skip
    assert "reliability faults: 2 cases, 1 passed, 0 skipped, 1 failed" in out


def test_in_ci_a_module_skipped_at_collection_fails(scratch):
    proc = pytest_run(scratch, "tests/test_module_skip.py", ci=True)
    assert proc.returncode != 0 and "ERROR tests/test_module_skip.py" in proc.stdout, proc.stdout[-2000:]
    assert "skipped under CI=true" in proc.stdout


def test_outside_ci_skips_are_skips_and_the_tally_counts_them(scratch):
    proc = pytest_run(scratch, "tests", "-p", "no:warnings", ci=False)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "reliability faults: 2 cases, 1 passed, 1 skipped, 0 failed" in proc.stdout
