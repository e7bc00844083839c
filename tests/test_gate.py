"""The fidelity gate's failing branches, each driven through `make gguf` by a real model that
fails it honestly: no gate is switched off, no comparison is faked.

- quantize: a quantization whose KL (measured on this very model) is above its bound;
- convert: a fused folder whose head moved by one vocabulary row after fuse scored it (what an
  off-by-one in a padded vocabulary does): the GGUF made from it is not the model that was gated;
- tokenization: a fused tokenizer.json with two pieces swapped while tokenizer.model (what the
  Phi-3 converter reads) keeps them, so llama.cpp reads the same text as other tokens.

Each case starts from a copy of one fully built run (convert, imatrix, two quantizations), and
checks what the README promises: the stage fails naming the step, nothing of it is renamed into
place, every artifact past the failed step is removed, and the next `make` does not take the
run for finished.
"""
from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import yaml
from safetensors.torch import load_file, save_file

from conftest import REPO, rerecord, small_config, write_config
from makeutil import adopt_trained_run, make, needs_llama_cpp, run_make
from pipeline.config import FUSION_MARKER, load_config
from pipeline.fidelity import prompt_ids
from pipeline.hf import load_tokenizer

pytestmark = pytest.mark.slow

QUANTIZATIONS = ["Q8_0", "Q4_K_M"]


@pytest.fixture(scope="module")
def built(fused_run, tiny_phi3_dir, tmp_path_factory):
    """The session's trained and fused tiny model, taken through convert (with the f32 check),
    the importance matrix and two quantizations by make; every gate passed."""
    needs_llama_cpp()
    root = tmp_path_factory.mktemp("gate")
    settings = small_config(tiny_phi3_dir, root / "build", gguf={
        "quantizations": QUANTIZATIONS,
        "imatrix": {"calibration": str(REPO / "data" / "calibration_ja.txt"), "ctx": 64}})
    cfg = load_config(write_config(root / "config.yaml", settings))
    adopt_trained_run(fused_run, cfg)
    make(cfg.source, "gguf")
    return root


@pytest.fixture
def run(built, tmp_path):
    """A copy of the built run of its own (same mtimes, so Make sees it current), and its settings."""
    shutil.copytree(built / "build", tmp_path / "build")
    settings = yaml.safe_load((built / "config.yaml").read_text(encoding="utf-8"))
    settings["run"]["build_dir"] = str(tmp_path / "build")
    cfg = load_config(write_config(tmp_path / "config.yaml", settings))
    assert "==>" not in make(cfg.source, "gguf").stdout, "the copied run should be up to date"
    return cfg, settings


def fidelity_report(cfg) -> dict:
    return json.loads((cfg.reports_dir / "fidelity.json").read_text(encoding="utf-8"))


def later_artifacts(cfg) -> list[str]:
    """The GGUFs and the importance matrix a failed convert gate must not leave behind."""
    found = sorted(p.name for p in cfg.gguf_path("x").parent.glob("*.gguf"))
    return found + ([cfg.imatrix_path.name] if cfg.imatrix_path.exists() else [])


def assert_fails_again(cfg, step: str) -> None:
    """What failed is not taken for finished: Make still sees work, and doing it fails again."""
    assert run_make(cfg.source, "gguf", "-q").returncode != 0
    again = run_make(cfg.source, "gguf")
    assert again.returncode != 0 and f"fidelity gate failed at {step}" in again.stderr, again.stderr[-2000:]


def refit_fused_file(cfg, name: str, edit) -> None:
    """Edit one text file of the fused folder, as a broken fuse would have written it, and record it
    in the folder's marker (so the integrity check takes it for fuse's own output, not for damage)."""
    path = cfg.fused_dir / name
    path.write_text(edit(path.read_text(encoding="utf-8")), encoding="utf-8")
    rerecord(cfg.fused_dir, name, marker=FUSION_MARKER)


def shift_the_head_by_one_row(cfg) -> None:
    """The fused head with every vocabulary row moved down by one, recorded as fuse's own output."""
    path = cfg.fused_dir / "model.safetensors"
    tensors = load_file(str(path))
    tensors["lm_head.weight"] = tensors["lm_head.weight"].roll(1, dims=0).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    rerecord(cfg.fused_dir, path.name, marker=FUSION_MARKER)


def test_a_quantization_past_its_bound_fails_naming_the_type(run):
    cfg, settings = run
    measured = fidelity_report(cfg)["quantize:Q4_K_M"]["kl"]
    assert measured > 0
    bound = measured / 4  # the same quantization of the same model, now held to a bound it misses
    settings["fidelity"]["max_kl_quantized"]["Q4_K_M"] = bound
    write_config(cfg.source, settings)

    proc = run_make(cfg.source, "gguf")
    assert proc.returncode != 0
    assert "==> [quantize] building gguf/t-q4_k_m.gguf because stamps/quantize.stamp changed" in proc.stdout
    assert (f"fidelity gate failed at quantize:Q4_K_M: KL(t-f16.gguf || t-q4_k_m.gguf (n_ctx 2048)) = "
            f"{measured:.4g} > {bound:.4g} (fidelity.max_kl_quantized.Q4_K_M)") in proc.stderr, proc.stderr[-2000:]
    entry = fidelity_report(cfg)["quantize:Q4_K_M"]
    assert entry["passed"] is False and entry["bound"] == bound
    assert "| quantize:Q4_K_M |" in (cfg.reports_dir / "fidelity.md").read_text(encoding="utf-8")
    assert not cfg.gguf_path("Q4_K_M").exists() and not cfg.gguf_path("Q4_K_M").with_suffix(".gguf.sha256").exists()
    assert cfg.gguf_path("f16").exists() and cfg.imatrix_path.exists()  # before the failed step: kept
    assert not list(cfg.run_dir.rglob(".tmp-*"))
    assert_fails_again(cfg, "quantize:Q4_K_M")


@pytest.mark.parametrize("compare_f32,step", [(True, "convert:f32"), (False, "convert")])
def test_a_failed_convert_gate_removes_every_later_gguf_and_the_imatrix(run, compare_f32, step):
    cfg, settings = run
    assert later_artifacts(cfg) == ["t-f16.gguf", "t-q4_k_m.gguf", "t-q8_0.gguf", "imatrix.gguf"]
    settings["fidelity"]["compare_f32"] = compare_f32
    write_config(cfg.source, settings)
    shift_the_head_by_one_row(cfg)

    proc = run_make(cfg.source, "gguf")
    assert proc.returncode != 0
    assert "==> [convert] building gguf/t-f16.gguf because" in proc.stdout
    assert f"fidelity gate failed at {step}: KL(fused" in proc.stderr, proc.stderr[-2000:]
    entry = fidelity_report(cfg)[step]
    assert entry["passed"] is False and entry["kl"] > 100 * entry["bound"]  # another model, not rounding
    assert later_artifacts(cfg) == []
    assert not list(cfg.run_dir.glob("gguf/*.sha256")) and not list(cfg.run_dir.rglob(".tmp-*"))
    assert "==> [imatrix]" not in proc.stdout and "==> [quantize]" not in proc.stdout
    assert_fails_again(cfg, step)


def swap_two_pieces(cfg) -> tuple[str, str]:
    """The fused tokenizer.json with the ids of the two pieces the gate's prompts use most swapped
    (special and byte pieces aside): still a valid tokenizer, splitting text the same way, but
    naming two pieces by each other's ids. tokenizer.model keeps them as they were."""
    tokenizer = load_tokenizer(cfg.fused_dir)
    special = set(tokenizer.added_tokens_decoder)
    used = Counter(i for ids in prompt_ids(tokenizer) for i in ids if i not in special)
    pieces = [tokenizer.convert_ids_to_tokens(i) for i, _ in used.most_common()]
    a, b = [p for p in pieces if not p.startswith("<0x")][:2]

    def edit(text: str) -> str:
        data = json.loads(text)
        vocab = data["model"]["vocab"]
        vocab[a], vocab[b] = vocab[b], vocab[a]
        return json.dumps(data, ensure_ascii=False)

    refit_fused_file(cfg, "tokenizer.json", edit)
    return a, b


def test_a_tokenizer_llama_cpp_reads_differently_fails_the_convert_stage(run):
    cfg, _ = run
    swapped = swap_two_pieces(cfg)
    proc = run_make(cfg.source, "gguf")
    assert proc.returncode != 0, swapped
    assert "fidelity gate failed at convert: llama.cpp tokenizes" in proc.stderr, proc.stderr[-2000:]
    report = fidelity_report(cfg)
    entry = report["convert"]
    # the logits branch passes (both runtimes are fed the same ids): only the tokenization check fails
    assert entry["kl"] <= entry["bound"] and report["convert:f32"]["passed"]
    assert entry["passed"] is False and entry["tokenization_mismatches"], swapped
    assert later_artifacts(cfg) == []
    assert_fails_again(cfg, "convert")
