"""`make eval` on the tiny model: a perplexity row for every model, the bound, and Make's view.

The session's trained and fused tiny model is copied into a run of its own,
whose stamps are made older than the copies, so Make builds only what eval
adds: the GGUFs (convert, quantize, through the real stages) and the report.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import REPO, small_config, write_config
from makeutil import adopt_trained_run, needs_llama_cpp, run_make
from pipeline.config import load_config

pytestmark = pytest.mark.slow

HELDOUT = REPO / "data" / "heldout_ja.txt"
MODELS = ["base", "trained", "fused", "f16", "Q4_K_M"]


@pytest.fixture(scope="module")
def run(fused_run, tiny_phi3_dir, tmp_path_factory):
    needs_llama_cpp()
    root = tmp_path_factory.mktemp("eval")
    # Six steps leave the tiny model far worse than its random base (the gate's 1.83x logit
    # scale is not yet learned away, see test_a_model_past_the_bound...): a loose bound here, for
    # the report's rows. That a trained model passes demo.yaml's real bound is tests/test_demo.py's.
    settings = small_config(tiny_phi3_dir, root / "build", eval={"heldout": str(HELDOUT), "max_ppl_ratio": 1000.0})
    cfg = load_config(write_config(root / "config.yaml", settings))
    adopt_trained_run(fused_run, cfg)
    first = run_make(cfg.source, "eval")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return cfg, settings, first


def report_of(cfg) -> dict:
    return json.loads(cfg.eval_report.read_text(encoding="utf-8"))


def test_every_model_has_a_row(run):
    cfg, _, first = run
    for stage in ("convert", "quantize", "eval"):
        assert f"==> [{stage}] building" in first.stdout
    assert "==> [train]" not in first.stdout and "==> [fuse]" not in first.stdout
    report = report_of(cfg)
    rows = {r["model"]: r for r in report["rows"]}
    assert list(rows) == MODELS
    assert {r["runtime"] for r in report["rows"][:3]} == {"transformers"}
    assert {r["runtime"] for r in report["rows"][3:]} == {"llama.cpp"}
    assert rows["f16"]["source"] == "gguf/t-f16.gguf" and rows["Q4_K_M"]["source"] == "gguf/t-q4_k_m.gguf"
    tokens = report["tokens"]
    assert tokens > 200 and all(r["tokens"] == tokens for r in rows.values())
    for r in rows.values():
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
        assert r["perplexity"] == pytest.approx(math.exp(r["nll"]))
        assert r["ratio_to_base"] == pytest.approx(r["perplexity"] / rows["base"]["perplexity"])
    assert report["bound"] == {"key": "eval.max_ppl_ratio", "figure": "trained / base perplexity",
                               "value": rows["trained"]["ratio_to_base"], "max": cfg.eval.max_ppl_ratio}
    assert report["passed"] and cfg.eval_passed.is_file()
    assert {r["model"]: r["fidelity"]["step"] for r in report["rows"] if "fidelity" in r} == {
        "fused": "fuse", "f16": "convert", "Q4_K_M": "quantize:Q4_K_M"}
    md = cfg.eval_report.with_suffix(".md").read_text(encoding="utf-8")
    for name, r in rows.items():
        assert f"| {name} | {r['source']} | {r['runtime']} | {r['perplexity']:.4g} | {r['ratio_to_base']:.4g} |" in md
    assert "**Japanese ability maintained: PASS**" in md and "`eval.max_ppl_ratio`" in md


def test_perplexities_agree_where_the_models_must(run):
    cfg, _, _ = run
    ppl = {r["model"]: r["perplexity"] for r in report_of(cfg)["rows"]}
    assert ppl["fused"] == pytest.approx(ppl["trained"], rel=1e-4)  # float32 fuse is exact
    assert ppl["f16"] == pytest.approx(ppl["fused"], rel=1e-2)
    assert ppl["Q4_K_M"] == pytest.approx(ppl["f16"], rel=0.2)
    assert abs(ppl["trained"] / ppl["base"] - 1) > 0.05  # training changed the model: the rows can tell


def test_perplexity_is_the_models_own_loss_on_the_heldout_tokens(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.evaluate import heldout_chunks

    cfg, _, _ = run
    tok = AutoTokenizer.from_pretrained(str(cfg.fused_dir))
    chunks = heldout_chunks(cfg, tok)
    ids = tok(HELDOUT.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    assert [t for c in chunks for t in c[1:]] == ids[:cfg.eval.max_tokens]
    assert all(c[0] == tok.bos_token_id and len(c) <= cfg.eval.chunk_tokens for c in chunks)
    model = AutoModelForCausalLM.from_pretrained(str(cfg.fused_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        nll = sum(float(model(torch.tensor([c]), labels=torch.tensor([c])).loss) * (len(c) - 1) for c in chunks)
    fused = next(r for r in report_of(cfg)["rows"] if r["model"] == "fused")
    # Compared as mean NLL: a float32 loss of ~18 nats carries ~1e-6 of rounding, which exp() turns
    # into a relative perplexity difference of the same size whatever the accumulation order.
    assert fused["nll"] == pytest.approx(nll / sum(len(c) - 1 for c in chunks), rel=1e-6)


def test_second_make_eval_does_nothing(run):
    cfg, _, _ = run
    proc = run_make(cfg.source, "eval")
    assert proc.returncode == 0 and "==>" not in proc.stdout, proc.stdout


def test_a_model_past_the_bound_fails_but_keeps_its_report(run):
    cfg, settings, _ = run
    ratio = report_of(cfg)["bound"]["value"]
    strict = ratio / 2
    write_config(cfg.source, {**settings, "eval": {**settings["eval"], "max_ppl_ratio": strict}})
    try:
        proc = run_make(cfg.source, "eval")
        assert proc.returncode != 0
        assert "==> [eval] building reports/eval.passed because stamps/eval.stamp changed" in proc.stdout
        assert f"trained / base perplexity = {ratio:.4g} > {strict:g} (eval.max_ppl_ratio)" in proc.stderr
        report = report_of(cfg)
        assert report["passed"] is False and report["bound"]["max"] == strict and len(report["rows"]) == 5
        assert "**Japanese ability maintained: FAIL**" in cfg.eval_report.with_suffix(".md").read_text("utf-8")
        assert not cfg.eval_passed.exists()
        assert run_make(cfg.source, "eval", "-q").returncode != 0, "a failed eval must not look up to date"
    finally:
        write_config(cfg.source, settings)
