"""`make mutants`: small, realistic bugs, each applied alone to a copy of the tree and run against
the test files that should catch it. Every mutant must be killed (those tests fail).

    make mutants                          every mutant, one after another (about 15 minutes on 2 cores)
    make mutants MUTANTS=fold-transposed  the named ones (comma-separated)

A mutant is one exact text replacement in one file: `find` must occur exactly once (the suite's
tests/test_mutants.py checks that every mutant still applies, so the list cannot rot). Each runs
in a fresh copy of the checkout made as `make demo`'s test makes one (its source files, `.venv`
linked), so the checkout itself is never touched. First the baseline: every named test must pass
on an unmutated copy, so what kills a mutant is the mutant. Prints one line per mutant and a
table for the README; exits 1 when the baseline fails, or a mutant survives (its tests all
passed) or cannot be run.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent))

from makeutil import copy_source_tree  # noqa: E402  (tests/ is not a package)

# pytest's exit status when tests ran and at least one failed: the only one that kills.
TESTS_FAILED = 1
TIMEOUT_S = 1800


@dataclass(frozen=True)
class Mutant:
    name: str
    area: str
    bug: str  # what a developer would have done wrong, in words
    path: str
    find: str
    replace: str
    tests: tuple[str, ...]  # pytest arguments: files or node ids


MUTANTS = (
    # -- training ------------------------------------------------------------------------------
    Mutant("lora-b-not-trained", "training",
           "the optimizer is given only the LoRA A factors: B stays zero, so LoRA never changes the model",
           "pipeline/train.py",
           'lora_params = [p for n, p in self.model.named_parameters() if p.requires_grad and "lora_" in n]',
           'lora_params = [p for n, p in self.model.named_parameters() if p.requires_grad and "lora_A" in n]',
           ("tests/test_demo.py::test_demo_training_learns",)),
    Mutant("accumulation-per-micro-batch", "training",
           "each micro-batch's loss is its own mean, so accumulated steps weight tokens unequally",
           "pipeline/train.py",
           "out = self.model(**batch, num_items_in_batch=n_trained)",
           "out = self.model(**batch)",
           ("tests/test_train.py::test_gradient_accumulation_equals_a_bigger_batch",)),
    Mutant("transition-one-step-ahead", "training",
           "the alpha schedule's transition runs one step ahead of the step it is given",
           "pipeline/soul.py",
           "frac = (step - s.warmup_steps) / s.anneal_steps",
           "frac = (step - s.warmup_steps + 1) / s.anneal_steps",
           ("tests/test_soul.py",)),
    Mutant("end-of-turn-not-trained", "training data",
           "the end-of-turn token after a reply gets no label, so the model never learns to stop",
           "pipeline/data/tokenize.py",
           "        if after is not None and ids[after] in special:\n            inside.append(after)\n",
           "",
           ("tests/test_data.py",)),
    # -- the soul and fusion -------------------------------------------------------------------
    Mutant("rotation-not-skew", "soul",
           "the generator is exponentiated without being made skew-symmetric: R is no rotation",
           "pipeline/soul.py",
           "return skew_exp(a - a.transpose(-1, -2)).float()",
           "return skew_exp(a).float()",
           ("tests/test_soul.py",)),
    Mutant("soul-under-autocast", "soul",
           "the soul runs under the caller's autocast: R h is computed in bfloat16",
           "pipeline/soul.py",
           "with torch.autocast(device_type=h.device.type, enabled=False):",
           "with torch.autocast(device_type=h.device.type, dtype=torch.bfloat16):",
           ("tests/test_soul.py",)),
    Mutant("fold-transposed", "fusion",
           "the head is folded with R^T instead of R",
           "pipeline/soul.py",
           "r, g = rotation.float(), sigmoid(alpha)",
           "r, g = rotation.float().transpose(-1, -2), sigmoid(alpha)",
           ("tests/test_soul.py", "tests/test_fuse.py")),
    Mutant("lora-scale-ignored", "fusion",
           "LoRA is merged without its alpha/r scale",
           "pipeline/adapter.py",
           "scale = alpha / (r ** 0.5) if acfg.get(\"use_rslora\") else alpha / r",
           "scale = alpha / (r ** 0.5) if acfg.get(\"use_rslora\") else 1.0",
           ("tests/test_fuse.py",)),
    # -- the fidelity gate ---------------------------------------------------------------------
    # -- model families ------------------------------------------------------------------------
    Mutant("gate-skips-gemma-embed-scale", "families",
           "the layer-by-layer gate looks embeddings up in the table, skipping the model's embedding module "
           "(Gemma scales by sqrt(hidden)): it no longer computes the model transformers runs",
           "pipeline/layered.py",
           "streams[name] = _Stream(v, [embed(torch.tensor([seq])) for seq in seqs])",
           "streams[name] = _Stream(v, [nn.functional.embedding(torch.tensor([seq]), embed.weight) for seq in seqs])",
           ("tests/test_families.py",)),
    Mutant("gate-uses-layer-0-inputs", "families",
           "every decoder layer gets layer 0's mask and rope, as the Phi-3-only gate did: Gemma-3's full-attention "
           "layers then see a sliding window",
           "pipeline/layered.py",
           'run_layer(files, layer, f"model.layers.{i}.", streams, [p[i] for p in per_prompt])',
           'run_layer(files, layer, f"model.layers.{i}.", streams, [p[0] for p in per_prompt])',
           ("tests/test_families.py",)),
    Mutant("headless-gguf-accepted", "families",
           "convert and quantize accept a GGUF without output.weight (a converter that drops the head, as "
           "Gemma-2's does): llama.cpp runs token_embd as the head and the soul is gone",
           "pipeline/gguf.py",
           "    if OUTPUT_TENSOR not in validate_gguf(path).tensor_types:",
           "    if OUTPUT_TENSOR in validate_gguf(path).tensor_types and False:",
           ("tests/test_family_chain.py::test_a_gguf_without_the_head_is_refused",)),
    Mutant("quantize-gate-off", "gate",
           "the quantize stage's gate is switched off: every quantization is kept, whatever its KL",
           "pipeline/gguf.py",
           "        return check_quantized(cfg, src, tmp, matches[0]) if cfg.fidelity.enabled else None",
           "        return None",
           ("tests/test_gate.py::test_a_quantization_past_its_bound_fails_naming_the_type",)),
    Mutant("quantize-gate-compares-the-wrong-file", "gate",
           "the quantize gate scores the converted GGUF against itself",
           "pipeline/fidelity.py",
           "compare(reference, gguf_logits(quantized, ids, n_ctx)), bound, key, extra={\"n_ctx\": n_ctx})",
           "compare(reference, gguf_logits(converted, ids, n_ctx)), bound, key, extra={\"n_ctx\": n_ctx})",
           ("tests/test_gate.py::test_a_quantization_past_its_bound_fails_naming_the_type",)),
    Mutant("failed-convert-keeps-later-ggufs", "gate",
           "a failed convert gate removes only the converted GGUF, not the quantizations made from it",
           "pipeline/fidelity.py",
           'for p in gguf_dir.glob(f"{cfg.run.name}-*.gguf"):',
           'for p in gguf_dir.glob(f"{cfg.run.name}-{cfg.gguf.outtype}.gguf"):',
           ("tests/test_gate.py::test_a_failed_convert_gate_removes_every_later_gguf_and_the_imatrix",)),
    Mutant("failed-convert-keeps-the-imatrix", "gate",
           "a failed convert gate leaves the importance matrix of the model it refused",
           "pipeline/fidelity.py",
           "        if cfg.imatrix_path is not None:\n            remove(cfg.imatrix_path)\n",
           "",
           ("tests/test_gate.py::test_a_failed_convert_gate_removes_every_later_gguf_and_the_imatrix",)),
    Mutant("tokenization-mismatch-ignored", "gate",
           "the gate records llama.cpp's tokenization mismatches but passes on KL alone",
           "pipeline/fidelity.py",
           'passed = result.kl <= bound and not (extra or {}).get("tokenization_mismatches")',
           "passed = result.kl <= bound",
           ("tests/test_gate.py::test_a_tokenizer_llama_cpp_reads_differently_fails_the_convert_stage",)),
    # -- the data policy -----------------------------------------------------------------------
    Mutant("pii-full-width-missed", "data policy",
           "personal data is searched in the text as written, so full-width forms (０３－…, ｔａｒｏ＠…) pass",
           "pipeline/data/pii.py",
           "probe = text.translate(TO_ASCII)",
           "probe = text",
           ("tests/test_data.py",)),
    Mutant("pii-drop-treated-as-mask", "data policy",
           "a record with a category set to drop is kept (masked) instead of dropped",
           "pipeline/data/pii.py",
           'if any(policy[c] == "drop" for c in found):',
           'if any(policy[c] == "drop" for c in found if c not in ("credit_card", "my_number")):',
           ("tests/test_data.py",)),
    # -- the thinking filter -------------------------------------------------------------------
    Mutant("any-close-tag-ends-thinking", "thinking filter",
           "a thinking section ends at any closing tag, so `<think-a>...</think>` leaks what follows",
           "pipeline/thinking.py",
           "            elif name == section.stack[-1]:",
           "            elif closing:",
           ("tests/test_thinking.py",)),
    # -- integrity -----------------------------------------------------------------------------
    Mutant("full-check-trusts-the-mtime", "integrity",
           "the consuming stage's full check hashes a file only when its mtime moved",
           "pipeline/integrity.py",
           "if full or (recorded_at is not None and st.st_mtime > recorded_at):",
           "if recorded_at is not None and st.st_mtime > recorded_at:",
           ("tests/test_corruption.py",)),
    # -- Ollama registration -------------------------------------------------------------------
    Mutant("proof-accepts-length", "ollama",
           "the proof accepts an answer Ollama cut off at the length limit: a model that never stops passes",
           "pipeline/ollama.py",
           '        if reason != "stop":',
           '        if reason not in ("stop", "length"):',
           ("tests/test_ollama.py",)),
    Mutant("rendered-prompt-unchecked", "ollama",
           "registration never compares the prompt Ollama renders with training's: a wrong TEMPLATE passes",
           "pipeline/ollama.py",
           "    if got != want:\n",
           "    if False:\n",
           ("tests/test_ollama.py",)),
    Mutant("stream-error-line-ignored", "ollama",
           "an {\"error\"} line inside a 200 NDJSON stream is taken as progress: a failed create looks finished",
           "pipeline/ollama.py",
           '                if obj.get("error"):',
           '                if obj.get("error") and False:',
           ("tests/test_ollama_client.py",)),
    Mutant("loopback-through-proxy", "ollama",
           "loopback requests go through http_proxy (as urllib and httpx do): behind a proxy Ollama looks absent",
           "pipeline/goproxy.py",
           "    if is_loopback(host):\n        return None\n",
           "",
           ("tests/test_ollama_client.py",)),
    Mutant("phi3-end-stop-missing", "ollama",
           "the Phi-3 Modelfile lacks the `<|end|>` stop (Phi-3 in Ollama then never stops)",
           "modelfiles/phi3.Modelfile",
           'PARAMETER stop "<|end|>"\n',
           "",
           ("tests/test_ollama.py",)),
)


def apply(mutant: Mutant, tree: Path) -> None:
    """Write the mutant into the copy at `tree`; ValueError when `find` is not there exactly once."""
    path = tree / mutant.path
    text = path.read_text(encoding="utf-8")
    found = text.count(mutant.find)
    if found != 1:
        raise ValueError(f"{mutant.name}: {mutant.path} holds its text {found} times, not once")
    path.write_text(text.replace(mutant.find, mutant.replace), encoding="utf-8")


def first_failure(output: str) -> str:
    """The first FAILED/ERROR line of pytest's short summary, without its message."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" - ")[0].split(" ", 1)[1]
    return "?"


def run_tests(tests: tuple[str, ...], repo: Path, mutant: Mutant | None) -> tuple[str, str, float]:
    """pytest on `tests` in a fresh copy of the tree, with `mutant` applied (None: the baseline).
    Returns (verdict, what decided it, seconds): "killed" (a test failed), "survived" (all
    passed) or "error" (pytest could not run them, or timed out)."""
    with tempfile.TemporaryDirectory(prefix="agiasi-mutant-") as tmp:
        tree = copy_source_tree(Path(tmp) / "tree")
        node_modules = repo / "pipeline" / "ui" / "node_modules"
        if node_modules.is_dir():
            (tree / "pipeline" / "ui" / "node_modules").symlink_to(node_modules)
        if mutant is not None:
            apply(mutant, tree)
        env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
        t0 = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                  cwd=tree, capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return "error", f"timed out after {TIMEOUT_S} s", time.monotonic() - t0
        seconds = time.monotonic() - t0
    if proc.returncode == TESTS_FAILED:
        return "killed", first_failure(proc.stdout), seconds
    if proc.returncode == 0:
        return "survived", "every test passed", seconds
    return "error", f"pytest exit {proc.returncode}: {proc.stdout[-500:]}{proc.stderr[-500:]}", seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    names = [n for arg in args.names for n in arg.split(",") if n]
    unknown = sorted(set(names) - {m.name for m in MUTANTS})
    if unknown:
        parser.error(f"no mutant named {', '.join(unknown)}; `--list` lists them")
    chosen = [m for m in MUTANTS if not names or m.name in names]
    if args.list:
        for m in chosen:
            print(f"{m.name:40} {m.area:16} {m.bug}")
        return 0
    repo = TESTS.parent
    # The baseline: every test the chosen mutants name passes on the tree as it is, in a copy made
    # the same way, so a failure under a mutant is the mutant's doing, not the copy's.
    baseline = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
    print(f"==> [baseline] {len(baseline)} test targets on the unmutated tree", flush=True)
    verdict, why, seconds = run_tests(baseline, repo, None)
    print(f"    {'passed' if verdict == 'survived' else verdict} in {seconds:.0f} s" +
          ("" if verdict == "survived" else f": {why}"), flush=True)
    if verdict != "survived":
        print("the named tests fail without any mutant: fix the suite first", file=sys.stderr)
        return 1
    rows = []
    for m in chosen:
        print(f"==> [mutant] {m.name} ({m.area}): {m.bug}", flush=True)
        verdict, why, seconds = run_tests(m.tests, repo, m)
        print(f"    {verdict} in {seconds:.0f} s: {why}", flush=True)
        rows.append((m, verdict, why))
    print("\n| mutant | area | the bug | killed by |\n|---|---|---|---|")
    for m, verdict, why in rows:
        if verdict == "killed" and "\\u" in why:  # pytest escapes non-ASCII parameters: show the test alone
            why = why.split("[")[0]
        bug = m.bug.replace("|", "\\|")  # a table cell: a pipe of <|end|> must not end it
        print(f"| `{m.name}` | {m.area} | {bug} | {why if verdict == 'killed' else verdict.upper() + ': ' + why} |")
    alive = [m.name for m, verdict, _ in rows if verdict != "killed"]
    print(f"\n{len(rows) - len(alive)} of {len(rows)} mutants killed" + (f"; not killed: {', '.join(alive)}" if alive else ""))
    return 1 if alive else 0


if __name__ == "__main__":
    sys.exit(main())
