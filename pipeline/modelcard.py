"""The model card: `fused/README.md`, in the Hugging Face model card format.

Its YAML metadata (base_model, license, datasets, language ja, tags) and its sections come
from files only, never from guesses:
  - the base and its revision, the soul's alpha and gate: fusion.json of the fused model;
  - the soul's schedule: soul.* and train.steps (which retrain, and so refuse, when they change);
  - the model's license: `license:` of the base's own model card (its README.md, read with
    huggingface_hub's card parser), else `other` with a note saying why;
  - the data sources with licenses and revisions, the PII and credentials policies with their
    figures, the refusal-only sources: reports/data.json;
  - the fidelity figures: those the artifacts carry (fuse's in fusion.json, each GGUF's in its
    sidecar record, both written in the stage's atomic step), else reports/fidelity.json;
    the eval figures: reports/eval.json. A figure
    not measured yet, or measured on an earlier fused model, says so and which target measures it.

`render_card` is pure: the same files give the same bytes. `write_card` writes README.md only
when its bytes change, so the Modelfile, which carries the card to Ollama (LICENSE), follows the
card's content and not the runs that rendered it. `refresh_card` also rewrites
reports/model_card.json on every call (the card's sha256 and its inputs'): that is the file Make
takes as "the card is current" (pipeline.mk).

The card is not in fusion.json's list of files (fuse.py): convert, quantize and eval refresh it
inside the fused folder after fuse, and a listed file that changes would make integrity.sweep
take the whole fused model for damaged and delete it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData, try_to_load_from_cache

from .artifacts import atomic_write_text, sha256_file, write_if_changed
from .config import Config, looks_local
from .constants import FUSION_MARKER
from .data.sources import source_name
from .errors import PipelineError
from .integrity import recorded_fidelity, sidecar

CARD_FILE = "README.md"
TAGS = ["japanese", "qlora", "soul-fusion", "so8-rotation", "gguf", "ollama"]
NOT_MEASURED = "not measured yet"


@dataclass(frozen=True)
class CardInputs:
    """Everything the card states, as read from the run's files (None: the file does not exist)."""
    fusion: dict
    data: dict | None
    fidelity: dict | None
    eval: dict | None
    base_card: Path | None  # the base's README.md, when it has one at hand
    current_ggufs: frozenset[str]  # GGUF kinds written from this fused model (not an earlier one)
    recorded: dict  # gate entries the artifacts carry: fusion.json's fuse entry, the current GGUFs' sidecars
    eval_current: bool  # eval.json was written after this fused model


def card_path(cfg: Config) -> Path:
    return cfg.fused_dir / CARD_FILE


def card_record(cfg: Config) -> Path:
    """What Make takes as the card being current (rewritten by every refresh)."""
    return cfg.reports_dir / "model_card.json"


def fidelity_report(cfg: Config) -> Path:
    return cfg.reports_dir / "fidelity.json"


# -- reading the inputs ----------------------------------------------------------------------

def read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def base_card_file(cfg: Config) -> Path | None:
    """The base's README.md: in a local base's folder, or in the hub cache for a hub base at its
    revision (never fetched here: rendering the card must not need the network)."""
    if cfg.base_is_local():
        readme = cfg.resolve(cfg.model.base) / CARD_FILE
        return readme if readme.is_file() else None
    cached = try_to_load_from_cache(cfg.model.base, CARD_FILE, revision=cfg.model.revision)
    return Path(cached) if isinstance(cached, str) else None


def gguf_kinds(cfg: Config) -> tuple[str, ...]:
    """The run's GGUFs: the converted outtype, then each quantization."""
    return (cfg.gguf.outtype, *cfg.gguf.quantizations)


def card_input_files(cfg: Config) -> list[Path]:
    """The files the card may read besides fusion.json and the data report, whether they exist
    or not: pipeline.mk makes the card depend on those that exist."""
    files = [fidelity_report(cfg), cfg.eval_report,
             *(sidecar(cfg.gguf_path(k)) for k in gguf_kinds(cfg))]
    if cfg.base_is_local():
        files.append(cfg.resolve(cfg.model.base) / CARD_FILE)
    return files


def written_after(path: Path, *earlier: Path) -> bool:
    """Whether path exists and was written after each existing file of `earlier`."""
    return path.is_file() and all(path.stat().st_mtime >= p.stat().st_mtime for p in earlier if p.is_file())


def gather(cfg: Config, fused_dir: Path) -> CardInputs:
    """Read what the card states, for the fused model in fused_dir (its fusion.json must exist)."""
    marker = fused_dir / FUSION_MARKER
    fusion = read_json(marker)
    if fusion is None:
        raise PipelineError(f"{fused_dir}: no fused model ({FUSION_MARKER}) to write a model card for; "
                            "run `make fuse`")
    ggufs = {k: cfg.gguf_path(k) for k in gguf_kinds(cfg)}
    current = frozenset(k for k, path in ggufs.items() if written_after(path, marker))
    recorded = {"fuse": fusion["fidelity"]} if isinstance(fusion.get("fidelity"), dict) else {}
    for kind in current:  # each GGUF's own steps: no two share a key
        recorded.update(recorded_fidelity(ggufs[kind]))
    return CardInputs(
        fusion=fusion,
        data=read_json(cfg.data_report),
        fidelity=read_json(fidelity_report(cfg)),
        eval=read_json(cfg.eval_report),
        base_card=base_card_file(cfg),
        current_ggufs=current,
        recorded=recorded,
        eval_current=written_after(cfg.eval_report, marker, *ggufs.values()),
    )


# -- the sections ----------------------------------------------------------------------------

def cell(value: object) -> str:
    """A value as one Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[object]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows)]


def base_license(inp: CardInputs) -> tuple[str, str]:
    """(the model's license id, where it comes from): the base's card's `license:`, else other."""
    if inp.base_card is None:
        return "other", ("the base has no model card at hand (no README.md beside its weights), so its license is "
                         "not known here: the fused model is a derivative of the base, check the base's terms "
                         "and set the license before publishing")
    value = ModelCard.load(inp.base_card).data.license
    if not value:
        return "other", ("the base's model card names no license: the fused model is a derivative of the base, "
                         "check the base's terms and set the license before publishing")
    value = value[0] if isinstance(value, list) else value
    return str(value), "from the base's model card (`license:` in its README.md); the fused model is a derivative of the base"


def public_name(name: str) -> str:
    """A hub id as it is; a local file or folder by its own name only: the card is written to be
    published, and the folders of the machine that built the model are nobody's business."""
    return Path(name).name if looks_local(name) else name


def dataset_ids(cfg: Config) -> list[str]:
    """Each source as the card's `datasets:` names it: a hub dataset's id, a local file's name."""
    return [Path(src.path).name if src.hub is None else public_name(src.hub) for src in cfg.data.sources]


def shown_sources(cfg: Config) -> dict[str, str]:
    """The data report's name of each source (data.sources.source_name) -> the card's: a local
    file by its own name, a hub dataset as the report names it."""
    return {source_name(src): Path(src.path).name if src.hub is None
            else source_name(src).replace(src.hub, public_name(src.hub), 1) for src in cfg.data.sources}


def metadata(cfg: Config, inp: CardInputs) -> ModelCardData:
    license_id, _ = base_license(inp)
    return ModelCardData(base_model=public_name(str(inp.fusion.get("base", cfg.model.base))), license=license_id,
                         datasets=dataset_ids(cfg), language="ja", tags=TAGS, library_name="transformers",
                         pipeline_tag="text-generation")


def section_intro(cfg: Config, inp: CardInputs) -> list[str]:
    return [f"# {cfg.run.name}", "",
            f"A Japanese chat model: `{public_name(str(inp.fusion.get('base')))}` fine-tuned with QLoRA and a learned *soul* "
            "rotation, both folded into a standard Hugging Face model of the base's own architecture by "
            "AGIASI Soul Fusion. This card is written by `make fuse` and rewritten when any figure it "
            "states changes."]


def section_base(inp: CardInputs) -> list[str]:
    f = inp.fusion
    license_id, why = base_license(inp)
    local = looks_local(str(f.get("base")))
    return ["## Base model", "",
            f"- base: `{public_name(str(f.get('base')))}`" + (" (a local folder, not a hub id: name the base's hub id here "
                                            "before publishing)" if local else ""),
            f"- revision: `{f.get('revision')}`" + (" (unused for a local folder)" if local else ""),
            f"- license: `{license_id}`, {why}",
            f"- fused from checkpoint `{f.get('checkpoint')}` (step {f.get('step')}), weights in {f.get('dtype')}, "
            f"LoRA merged into the {f.get('merge_base')} weights ({f.get('merge_base_reason')})"]


def section_data(cfg: Config, inp: CardInputs) -> list[str]:
    head = ["## Training data", ""]
    if inp.data is None:
        return head + [f"{NOT_MEASURED}: no data report; run `make data`."]
    read, shown = inp.data.get("read", {}), shown_sources(cfg)
    rows = [[shown.get(name, public_name(name)), ", ".join(s.get("license") or ["unknown"]) + (" (acknowledged)" if s.get("acknowledged") else ""),
             s.get("revision") or "-", s.get("purpose") or "chat", read.get(name, 0)]
            for name, s in inp.data.get("sources", {}).items()]
    kept = inp.data.get("kept", {})
    dup = inp.data.get("duplicates", {})
    return head + table(["source", "license", "revision", "purpose", "rows read"], rows) + [
        "", f"Examples kept: {kept.get('train', 0)} train, {kept.get('validation', 0)} validation. Duplicates "
        f"removed: {dup.get('exact', 0)} exact, {dup.get('near', 0)} near. robots.txt does not apply: no web "
        "page was fetched, only hub datasets and local files."]


def detector(figures: dict | None) -> str:
    if not figures:
        return "-"
    return f"{figures['found']}/{figures['positives']} found, {figures['false_positives']}/{figures['negatives']} false"


def section_pii(inp: CardInputs) -> list[str]:
    head = ["## Personal information", ""]
    if inp.data is None or "pii" not in inp.data:
        return head + [f"{NOT_MEASURED}: run `make data`."]
    detectors = inp.data.get("pii_detectors", {})
    rows = [[c, p.get("policy"), p.get("found"), p.get("examples"), detector(detectors.get(c))]
            for c, p in inp.data["pii"].items()]
    return head + ["Policy `data.pii` per category (mask, drop or keep), with the finds in the training data "
                   "and the detector's figures on the bundled labelled corpus (data/pii_corpus.jsonl).", ""] + \
        table(["category", "policy", "finds", "examples", "detector (recall, false positives)"], rows) + \
        ["", f"Examples dropped for personal information: {inp.data.get('pii_dropped_examples', 0)}."]


def section_secrets(inp: CardInputs) -> list[str]:
    head = ["## Credentials", ""]
    s = (inp.data or {}).get("secrets")
    if s is None:
        return head + [f"{NOT_MEASURED}: run `make data`."]
    detectors = inp.data.get("secrets_detectors", {})
    rows = [[k, n, s.get("examples", {}).get(k, 0), detector(detectors.get(k))] for k, n in s.get("found", {}).items()]
    return head + [f"Policy `data.secrets`: {s.get('policy')} (credentials found by their format, never by "
                   f"entropy). Examples dropped for credentials: {s.get('dropped_examples', 0)}. Detector figures: "
                   "the bundled corpus data/secrets_corpus.jsonl.", ""] + \
        table(["kind", "finds", "examples", "detector (recall, false positives)"], rows)


def section_refusal(cfg: Config, inp: CardInputs) -> list[str]:
    head = ["## Refusal-only sources", ""]
    if inp.data is None:
        return head + [f"{NOT_MEASURED}: run `make data`."]
    names = [n for n, s in inp.data.get("sources", {}).items() if s.get("purpose") == "refusal"]
    if not names:
        return head + ["None: no source sets `purpose: refusal`."]
    r, guard = inp.data.get("refusal_sources", {}), inp.data.get("guard")
    judged = (f" The guard `{guard['model']}` ({guard['format']}) also judged each reply: dropped as unsafe "
              f"{r.get('dropped_unsafe', 0)}.") if guard else ""
    return head + [
        "Sources: " + ", ".join(f"`{shown_sources(cfg).get(n, public_name(n))}`" for n in names) + ". A source with `purpose: refusal` "
        "teaches refusing unsafe requests, never generating them: only assistant replies are training targets (no "
        "user turn ever is), and an example whose replies are not all refusals is dropped. "
        f"Kept {r.get('kept', 0)}, dropped as not refusals {r.get('dropped_not_refusals', 0)}." + judged]


def section_soul(cfg: Config, inp: CardInputs) -> list[str]:
    s, steps = cfg.soul, cfg.train.steps
    alpha, gate = inp.fusion.get("alpha"), inp.fusion.get("gate")
    order = min(s.warmup_steps + s.anneal_steps, steps)
    rows = [["chaos", f"0 - {min(s.warmup_steps, steps)}", f"{s.alpha_start:g}", f"{sigmoid(s.alpha_start):.4f}"],
            ["transition", f"{min(s.warmup_steps, steps)} - {order}", f"linear {s.alpha_start:g} to {s.alpha_target:g}", "rising"],
            ["order", f"{order} - {steps}", f"{s.alpha_target:g}" + (", then learned" if s.learn_alpha else ""),
             f"{sigmoid(s.alpha_target):.4f}"]]
    return ["## The soul", "",
            "h' = h + sigmoid(alpha) · R h, R block-diagonal with rotations in SO(8) "
            + ("(one 8×8 block shared across the hidden dimension)" if s.shared_block else "(hidden/8 blocks of 8×8)")
            + ", folded exactly into the LM head: W' = W + sigmoid(alpha) · W R.", "",
            f"Fused with alpha {alpha:+.4f}, gate sigmoid(alpha) {gate:.4f}." if alpha is not None and gate is not None
            else "Fused alpha and gate: not recorded in fusion.json.", "",
            f"Schedule over {steps} steps:", ""] + table(["phase", "steps", "alpha", "gate"], rows)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def fidelity_steps(cfg: Config) -> list[tuple[str, str | None]]:
    """(fidelity.json step, the GGUF kind it measured, None for the fused model)."""
    steps: list[tuple[str, str | None]] = [("fuse", None)]
    if cfg.fidelity.compare_f32:
        steps.append(("convert:f32", cfg.gguf.outtype))
    steps.append(("convert", cfg.gguf.outtype))
    return steps + [(f"quantize:{q}", q) for q in cfg.gguf.quantizations]


def section_fidelity(cfg: Config, inp: CardInputs) -> list[str]:
    head = ["## Fidelity", "", "KL divergence of each model's next-token distribution from the one it was made "
            "from, on the gate's prompts (the stage fails past its bound).", ""]
    if not cfg.fidelity.enabled:
        return head[:2] + ["Not measured: `fidelity.enabled` is false in this run's config."]
    report = {**(inp.fidelity or {}), **inp.recorded}
    rows = []
    for step, kind in fidelity_steps(cfg):
        e = report.get(step)
        if e is None or (kind is not None and kind not in inp.current_ggufs):
            target = "make fuse" if kind is None else "make gguf"
            rows.append([step, "-", "-", f"{NOT_MEASURED}: run `{target}`", "-", "-", "-"])
            continue
        rows.append([step, e["reference"], e["candidate"], f"{e['kl']:.3g}", f"{e['top1']:.3f}", f"{e['bound']:.3g}",
                     "pass" if e["passed"] else "FAIL"])
    return head + table(["step", "reference", "candidate", "KL", "top-1", "bound", "result"], rows)


def section_eval(inp: CardInputs) -> list[str]:
    head = ["## Evaluation", ""]
    if inp.eval is None:
        return head + [f"{NOT_MEASURED}: run `make eval`."]
    if not inp.eval_current:
        return head + [f"{NOT_MEASURED} for this fused model (reports/eval.json measured an earlier one): "
                       "run `make eval`."]
    e, b = inp.eval, inp.eval["bound"]
    rows = [[r["model"], r["runtime"], f"{r['perplexity']:.4g}", f"{r['ratio_to_base']:.4g}"] for r in e["rows"]]
    verdict = "PASS" if e["passed"] else "FAIL"
    return head + [f"Perplexity on held-out Japanese text (`{Path(e['heldout']).name}`, {e['tokens']} tokens), "
                   "lower is better.", ""] + table(["model", "runtime", "perplexity", "vs base"], rows) + [
        "", f"Japanese ability maintained: {verdict} ({b['figure']} = {b['value']:.4g}, bound {b['max']:g}, "
        f"`{b['key']}`)."]


# -- rendering and writing -------------------------------------------------------------------

def render_card(cfg: Config, inp: CardInputs) -> str:
    """The card's text: YAML metadata, then one section per subject (pure: same inputs, same bytes)."""
    sections = [section_intro(cfg, inp), section_base(inp), section_data(cfg, inp), section_pii(inp),
                section_secrets(inp), section_refusal(cfg, inp), section_soul(cfg, inp), section_fidelity(cfg, inp),
                section_eval(inp)]
    body = "\n\n".join("\n".join(s) for s in sections)
    return f"---\n{metadata(cfg, inp).to_yaml()}\n---\n\n{body}\n"


def write_card(cfg: Config, fused_dir: Path) -> bool:
    """Render the card of the fused model in fused_dir into its README.md; True when the bytes changed."""
    return write_if_changed(fused_dir / CARD_FILE, render_card(cfg, gather(cfg, fused_dir)))


def refresh_card(cfg: Config) -> Path | None:
    """Rewrite the run's card when its inputs changed it, and its record in any case; None when
    the run has no fused model yet (nothing to describe)."""
    if not cfg.fused_marker.is_file():
        return None
    changed = write_card(cfg, cfg.fused_dir)
    inputs = [cfg.fused_marker, cfg.data_report, *card_input_files(cfg)]
    record = {"card": CARD_FILE, "sha256": sha256_file(card_path(cfg)),
              "inputs": {p.name: sha256_file(p) for p in inputs if p.is_file()}}
    atomic_write_text(card_record(cfg), json.dumps(record, indent=1) + "\n")
    print(f"[card] {'wrote' if changed else 'unchanged:'} {card_path(cfg)}")
    return card_path(cfg)
