"""The model card, fused/README.md (pipeline/modelcard.py).

It must parse as a Hugging Face model card (huggingface_hub.ModelCard.load) with base_model,
license, datasets, language ja and tags; state the base and revision, the data sources with
licenses and revisions, the PII and credentials policies with their figures, the refusal-only
sources and their purpose, the soul, the fidelity and the eval figures; say plainly which
figures are not measured yet; and change when one of its inputs changes, and only then. The
fused model's integrity record must not list it. `make demo` writing it, and Make rebuilding it
only when an input changed, are tests/test_demo.py's.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard

from conftest import REPO, small_config, write_config
from pipeline.config import FUSION_MARKER, Config, DataSection, DataSource
from pipeline.integrity import folder_problem, write_sidecar
from pipeline.modelcard import (
    card_path, card_record, dataset_ids, gather, refresh_card, render_card, shown_sources, write_card,
)
from pipeline.ollama import render_modelfile

SECTIONS = ("## Base model", "## Training data", "## Personal information", "## Credentials",
            "## Refusal-only sources", "## The soul", "## Fidelity", "## Evaluation")


def card_problems(text: str) -> list[str]:
    """What a card lacks of what the issue asks (empty: it has everything)."""
    problems = [f"no section {s!r}" for s in SECTIONS if s not in text]
    meta = ModelCard(text).data
    for key in ("base_model", "license", "datasets", "tags"):
        if not getattr(meta, key, None):
            problems.append(f"no metadata {key}")
    if meta.language != "ja":
        problems.append(f"language {meta.language!r}")
    return problems


def unchecked_config(tmp_path, base, **overrides) -> Config:
    """demo.yaml as tests shrink it, validated by pydantic but not against a base folder: the card
    reads no weights, so these tests need no tiny model (and no llama.cpp build)."""
    raw = small_config(base, tmp_path / "b", **overrides)
    return Config.model_validate(raw).model_copy(update={"source": write_config(tmp_path / "c.yaml", raw)})


@pytest.fixture
def cfg(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    return unchecked_config(tmp_path, base, ollama={"family": "phi3"}, data={"train": [
        {"path": str(REPO / "data" / "demo_ja.jsonl"), "format": "messages", "license": "cc-by-4.0"},
        {"hub": "owner/refusals", "revision": "abc123", "split": "train", "license_acknowledged": True}]})
    # the hub source has purpose: refusal in the data report below


def fake_fused(cfg) -> None:
    """A fused folder as far as the card reads it: fusion.json (fuse's provenance)."""
    cfg.fused_dir.mkdir(parents=True)
    (cfg.fused_dir / FUSION_MARKER).write_text(json.dumps({
        "base": cfg.model.base, "revision": "main", "checkpoint": "final", "step": 6, "alpha": 1.618,
        "gate": 0.8345, "dtype": "float32", "merge_base": "original",
        "merge_base_reason": "trained without quantization", "files": {}}), encoding="utf-8")


def data_report(cfg, exact_duplicates: int = 2) -> dict:
    local, hub = cfg.data.sources
    return {
        "read": {local.path: 40, "owner/refusals[train]": 7},
        "sources": {local.path: {"license": ["cc-by-4.0"], "revision": None, "acknowledged": False, "purpose": None},
                    "owner/refusals[train]": {"license": ["cc-by-nc-4.0"], "revision": "abc123", "acknowledged": True,
                                              "purpose": "refusal"}},
        "pii": {"email": {"policy": "mask", "found": 3, "examples": 2}, "phone": {"policy": "drop", "found": 1,
                                                                                   "examples": 1}},
        "pii_dropped_examples": 1,
        "pii_detectors": {"email": {"found": 12, "positives": 12, "false_positives": 0, "negatives": 9}},
        "secrets": {"policy": "drop", "dropped_examples": 4, "found": {"aws_access_key": 4},
                    "examples": {"aws_access_key": 4}},
        "secrets_detectors": {"aws_access_key": {"found": 3, "positives": 3, "false_positives": 0, "negatives": 5}},
        "refusal_sources": {"kept": 6, "dropped_not_refusals": 1},
        "duplicates": {"exact": exact_duplicates, "near": 1},
        "kept": {"train": 30, "validation": 3},
    }


def fidelity_report() -> dict:
    entry = {"reference": "trained", "candidate": "fused", "kl": 1.5e-7, "top1": 1.0, "max_abs": 1e-3,
             "bound": 0.02, "bound_key": "fidelity.max_kl_fused", "passed": True}
    return {"fuse": entry, "convert:f32": {**entry, "kl": 2e-9}, "convert": {**entry, "kl": 3e-6},
            "quantize:Q4_K_M": {**entry, "kl": 0.0421, "bound": 0.1}}


def eval_report(ratio: float = 0.5) -> dict:
    rows = [{"model": m, "runtime": "transformers", "perplexity": p, "ratio_to_base": p / 100.0}
            for m, p in (("base", 100.0), ("trained", 100.0 * ratio), ("fused", 100.0 * ratio))]
    return {"heldout": "data/heldout_ja.txt", "tokens": 512, "rows": rows, "passed": ratio <= 1.0,
            "bound": {"key": "eval.max_ppl_ratio", "figure": "trained / base perplexity", "value": ratio, "max": 1.0}}


def write(path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report), encoding="utf-8")


def measured_run(cfg) -> None:
    """Every report written, and the GGUFs after the fused model, as a whole chain leaves them."""
    fake_fused(cfg)
    write(cfg.data_report, data_report(cfg))
    write(cfg.reports_dir / "fidelity.json", fidelity_report())
    for kind in (cfg.gguf.outtype, *cfg.gguf.quantizations):
        cfg.gguf_path(kind).parent.mkdir(parents=True, exist_ok=True)
        cfg.gguf_path(kind).write_bytes(b"GGUF")
    write(cfg.eval_report, eval_report())


def test_the_card_parses_and_states_every_section_with_its_figures(cfg):
    measured_run(cfg)
    assert refresh_card(cfg) == card_path(cfg)
    text = card_path(cfg).read_text(encoding="utf-8")
    assert card_problems(text) == []
    meta = ModelCard.load(card_path(cfg)).data
    assert meta.base_model == Path(cfg.model.base).name and meta.license == "other"  # the tiny base has no card
    # Hub ids as they are; local files and folders by their own names, never this machine's paths.
    assert meta.datasets == [Path(cfg.data.sources[0].path).name, "owner/refusals"]
    assert str(cfg.source.parent) not in text
    for figure in ("cc-by-4.0", "cc-by-nc-4.0 (acknowledged)", "abc123",  # sources, licenses, revisions
                   "| email | mask | 3 | 2 | 12/12 found, 0/9 false |", "Policy `data.secrets`: drop",
                   "Examples dropped for credentials: 4", "| aws_access_key | 4 | 4 | 3/3 found, 0/5 false |",
                   "`owner/refusals[train]`", "teaches refusing unsafe requests, never generating them",
                   "dropped as not refusals 1", "alpha +1.6180", "gate sigmoid(alpha) 0.8345",
                   "| quantize:Q4_K_M | trained | fused | 0.0421 |", "| fused | transformers | 50 | 0.5 |",
                   "Japanese ability maintained: PASS"):
        assert figure in text, figure
    assert "not measured yet" not in text
    assert json.loads(card_record(cfg).read_text())["sha256"]


def test_figures_not_measured_yet_say_so_and_invent_nothing(cfg):
    fake_fused(cfg)
    text = render_card(cfg, gather(cfg, cfg.fused_dir))
    assert card_problems(text) == []
    for line in ("not measured yet: no data report; run `make data`.",
                 "| fuse | - | - | not measured yet: run `make fuse` |",
                 "| quantize:Q4_K_M | - | - | not measured yet: run `make gguf` |",
                 "not measured yet: run `make eval`."):
        assert line in text, line


def test_figures_of_an_earlier_fused_model_are_not_stated_as_this_ones(cfg):
    measured_run(cfg)
    later = cfg.fused_marker.stat().st_mtime + 10
    os.utime(cfg.fused_marker, (later, later))  # fused again after the GGUFs and eval were made
    text = render_card(cfg, gather(cfg, cfg.fused_dir))
    assert "| convert | - | - | not measured yet: run `make gguf` |" in text
    assert "reports/eval.json measured an earlier one): run `make eval`" in text
    assert "| fuse | trained | fused |" in text  # fuse's own figure is this model's


def test_the_card_changes_when_an_input_changes_and_only_then(cfg):
    measured_run(cfg)
    assert write_card(cfg, cfg.fused_dir)
    first, stat = card_path(cfg).read_bytes(), card_path(cfg).stat()
    assert not write_card(cfg, cfg.fused_dir)  # same inputs: the same bytes, the file left alone
    assert card_path(cfg).read_bytes() == first and card_path(cfg).stat().st_mtime_ns == stat.st_mtime_ns
    write(cfg.data_report, data_report(cfg, exact_duplicates=5))
    assert write_card(cfg, cfg.fused_dir)
    assert "Duplicates removed: 5 exact" in card_path(cfg).read_text(encoding="utf-8")
    write(cfg.eval_report, eval_report(ratio=1.5))
    assert write_card(cfg, cfg.fused_dir)
    assert "Japanese ability maintained: FAIL" in card_path(cfg).read_text(encoding="utf-8")


def test_the_models_license_is_the_base_cards(cfg):
    base = cfg.resolve(cfg.model.base)
    (base / "README.md").write_text("---\nlicense: mit\nlanguage: ja\n---\n\n# A base\n", encoding="utf-8")
    fake_fused(cfg)
    text = render_card(cfg, gather(cfg, cfg.fused_dir))
    assert ModelCard(text).data.license == "mit" and "from the base's model card" in text


def test_the_modelfile_names_the_card_that_registration_sends_as_the_license(cfg):
    assert "# LICENSE: `make ollama` sends the model card, fused/README.md, as the model's license" in \
        render_modelfile(cfg).splitlines()


def test_fuse_writes_the_card_outside_the_fused_models_integrity_record(fused_run):
    """The card is refreshed after fuse: fusion.json does not list it, so rewriting it never makes
    the sweep at the start of every make take the fused model for damaged."""
    card = card_path(fused_run)
    assert card_problems(card.read_text(encoding="utf-8")) == []
    assert "README.md" not in json.loads(fused_run.fused_marker.read_text())["files"]
    card.write_text(card.read_text(encoding="utf-8") + "\nedited\n", encoding="utf-8")
    assert folder_problem(fused_run.fused_dir, FUSION_MARKER, full=True) is None
    write_card(fused_run, fused_run.fused_dir)  # as it was


def test_each_ggufs_gate_figures_travel_in_its_sidecar(cfg):
    """Convert and quantize record their gate entries in the GGUF's sidecar, written before the
    rename: the card states them with reports/ gone, and only for GGUFs of this fused model."""
    measured_run(cfg)
    (cfg.reports_dir / "fidelity.json").unlink()
    entries = fidelity_report()
    write_sidecar(cfg.gguf_path(cfg.gguf.outtype), fidelity={k: entries[k] for k in ("convert:f32", "convert")})
    write_sidecar(cfg.gguf_path("Q4_K_M"), fidelity={"quantize:Q4_K_M": entries["quantize:Q4_K_M"]})
    text = render_card(cfg, gather(cfg, cfg.fused_dir))
    assert "| convert | trained | fused | 3e-06 |" in text and "| quantize:Q4_K_M | trained | fused | 0.0421 |" in text
    later = cfg.fused_marker.stat().st_mtime + 10
    os.utime(cfg.fused_marker, (later, later))  # fused again: the GGUFs, and their figures, are an earlier model's
    assert "| quantize:Q4_K_M | - | - | not measured yet: run `make gguf` |" in render_card(cfg, gather(cfg, cfg.fused_dir))


def test_the_fused_models_own_gate_figure_needs_no_report(fused_run):
    """fuse's figure travels in fusion.json: a card rendered with reports/ gone (cleaned, or the fused
    folder copied elsewhere) still states it, and never sends the user to a `make fuse` that has nothing to do."""
    recorded = json.loads(fused_run.fused_marker.read_text())["fidelity"]
    assert recorded["passed"] and recorded["bound_key"] == "fidelity.max_kl_fused"
    text = render_card(fused_run, replace(gather(fused_run, fused_run.fused_dir), fidelity=None))
    assert f"| fuse | trained | {recorded['candidate']} | {recorded['kl']:.3g} |" in text
    assert "run `make fuse`" not in text


def test_sources_are_named_by_hub_id_or_file_name_never_by_folder():
    """`data/demo_ja.jsonl` (demo.yaml's) has one slash, like a hub id: the config says it is a file."""
    demo = SimpleNamespace(data=DataSection(train="data/demo_ja.jsonl"))
    assert dataset_ids(demo) == ["demo_ja.jsonl"] and shown_sources(demo) == {"data/demo_ja.jsonl": "demo_ja.jsonl"}
    real = SimpleNamespace(data=DataSection(train=[DataSource(hub="llm-jp/oasst2-33k-ja")]))
    assert dataset_ids(real) == ["llm-jp/oasst2-33k-ja"]
    assert shown_sources(real) == {"llm-jp/oasst2-33k-ja[train]": "llm-jp/oasst2-33k-ja[train]"}
