"""Shared fixtures: tiny offline Phi-3 models on Phi-3.5's real tokenizer, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from pipeline import llamacpp
from pipeline.tiny import build_tiny_phi3

# The property tests (thinking filter, serve) draw the same examples on every run: a CI
# run fails only on a change, never on a new random draw; no example database in the clone.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.load_profile("repeatable")


def needs_llama_cpp_built() -> Path:
    """The pinned llama.cpp's install dir; not built: a skip that says how to build it (a failure in CI,
    as every skip). The tiny models take Phi-3.5's real tokenizer and template from its source."""
    path = llamacpp.install_dir()
    if not (path / ".complete").is_file():
        pytest.skip(f"the pinned llama.cpp is not built at {path}: `make test` (or `make llama-cpp`) builds it")
    return path


@pytest.fixture(scope="session")
def tiny_phi3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny Phi-3 (hidden 256, 2 layers, untied head) on Phi-3.5's real tokenizer. Read-only."""
    needs_llama_cpp_built()
    return build_tiny_phi3(tmp_path_factory.mktemp("tiny") / "tiny-phi3")


@pytest.fixture(scope="session")
def tiny_phi3_tied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny Phi-3 with tie_word_embeddings=True. Treat it as read-only."""
    needs_llama_cpp_built()
    return build_tiny_phi3(tmp_path_factory.mktemp("tiny") / "tiny-phi3-tied", tie_word_embeddings=True)


REPO = Path(__file__).resolve().parent.parent
DEMO_DATA = REPO / "data" / "demo_ja.jsonl"


def deep_merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for k, v in overrides.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def small_config(base_dir: Path, build_dir: Path, **overrides) -> dict:
    """demo.yaml shrunk for tests (few steps, float32 fuse), as a dict."""
    import yaml

    cfg = yaml.safe_load((REPO / "demo.yaml").read_text(encoding="utf-8"))
    cfg = deep_merge(cfg, {
        "run": {"name": "t", "build_dir": str(build_dir)},
        "model": {"base": str(base_dir)},
        "data": {"train": str(DEMO_DATA), "max_length": 128},
        # CPU even where CUDA exists: the exactness checks assume float32 without NF4.
        "train": {"steps": 6, "save_every": 3, "batch_size": 2, "device": "cpu", "lr_warmup_steps": 1},
        "soul": {"warmup_steps": 1, "anneal_steps": 4},
        "fuse": {"dtype": "float32"},
        # Plain quantization unless a test asks for an importance matrix (test_chain does).
        "gguf": {"imatrix": {"calibration": None}},
    })
    return deep_merge(cfg, overrides)


def rerecord(folder: Path, name: str, marker: str = "checkpoint.json") -> None:
    """After a test replaced `name` in a checkpoint (or fused) folder on purpose: record it in
    the folder's marker, as its stage would have, so it is not taken for damage."""
    import json

    from pipeline.integrity import file_record

    path = folder / marker
    recorded = json.loads(path.read_text(encoding="utf-8"))
    recorded["files"][name] = file_record(folder / name)
    path.write_text(json.dumps(recorded), encoding="utf-8")


def write_config(path: Path, cfg: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trained_run(tiny_phi3_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A short full-precision training run on the tiny model; returns its Config."""
    from pipeline.config import load_config
    from pipeline.train import train

    root = tmp_path_factory.mktemp("run")
    cfg = load_config(write_config(root / "config.yaml", small_config(tiny_phi3_dir, root / "build")))
    train(cfg)
    return cfg


@pytest.fixture(scope="session")
def fused_run(trained_run):
    """trained_run fused (float32); returns the same Config."""
    from pipeline.fuse import fuse

    fuse(trained_run)
    return trained_run


# -- skips are failures in CI ---------------------------------------------------------------
# `make test` installs everything the suite needs, so in CI (CI=true, which .ci/run sets) a
# skip is a failure in disguise: a missing toolchain, browser or package. Only the tests
# below may skip there, each for a reason that no CI machine can change.
SKIP_ALLOWED_IN_CI = {
    "tests/test_ollama.py::test_real_ollama_registers_answers_and_stops":
        "needs a real Ollama server (OLLAMA_HOST); no Ollama binary runs on these machines",
    "tests/test_qlora.py::test_an_already_repacked_model_is_refused":
        "the bitsandbytes trap it reproduces exists only on CPUs with AVX512-BF16",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail_a_skip_in_ci(report, nodeid: str) -> None:
    if not (in_ci() and report.skipped and not hasattr(report, "wasxfail")):
        return
    if nodeid in SKIP_ALLOWED_IN_CI:
        return
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI=true, which only the tests in tests/conftest.py SKIP_ALLOWED_IN_CI may: "
                       f"{_skip_reason(report)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A whole module skipped at collection (pytest.importorskip, allow_module_level) counts too."""
    outcome = yield
    _fail_a_skip_in_ci(outcome.get_result(), collector.nodeid)


# -- the reliability group: `pytest -m reliability`, one tally line per category ----------
# A test joins with @pytest.mark.reliability("<category>"); each parametrized case counts
# once, as "passed" (its call passed), "skipped" (at setup, a fixture's skip included, or in
# its call) or "failed" (any phase failed).
_RELIABILITY: dict[str, dict[str, str]] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    _fail_a_skip_in_ci(report, item.nodeid)
    marker = item.get_closest_marker("reliability")
    if marker is None:
        return
    category = marker.args[0] if marker.args else "uncategorized"
    tally = _RELIABILITY.setdefault(category, {})
    if report.failed:
        tally[item.nodeid] = "failed"
    elif report.skipped:
        tally[item.nodeid] = "skipped"
    elif report.when == "call":
        tally[item.nodeid] = "passed"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RELIABILITY:
        return
    terminalreporter.section("reliability")
    for category in sorted(_RELIABILITY):
        outcomes = list(_RELIABILITY[category].values())
        terminalreporter.write_line(
            f"reliability {category}: {len(outcomes)} cases, {outcomes.count('passed')} passed, "
            f"{outcomes.count('skipped')} skipped, {outcomes.count('failed')} failed")
