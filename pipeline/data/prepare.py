"""Stage `data`: the configured sources to a prepared dataset, and a report of what was done.

The story of a run: `read_all` reads every source and converts each row to a
record (a bad row stops the stage, naming the source, the row, the format
expected and the keys seen); `apply_policies` drops or masks credentials
(`data.secrets`), masks or drops personal information (`data.pii`) and removes
exact and near duplicates (`data.dedup`);
`split` puts each kept example in train or validation by a seeded hash of its
content, so appending lines never moves an old example; `write_prepared`
writes `<run>/data/train.jsonl` and `validation.jsonl` (only when their
content changed, so an unchanged dataset retrains nothing) and `data.json`
(each file's sha256 and size) last; `write_report` writes
`reports/data.json` and `data.md`: counts per source and category, and the
PII and credential detectors' recall and false-positive rate on the bundled
corpora `data/pii_corpus.jsonl` and `data/secrets_corpus.jsonl`.

The prepared records are text (messages or text) with their provenance (the
source and row they came from): tokenizer-independent, so changing the base
model does not prepare the data again.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import atomic_write_text, write_if_changed
from ..config import PROJECT_DIR, Config, data_uses_guard
from ..constants import PREPARED_MARKER
from ..errors import DataError
from ..guard import Guard, guard_from_config
from ..integrity import file_record, folder_problem, verify_folder
from .credentials import SECRET_KINDS, apply_secrets_policy, find_secrets
from .dedup import Deduplicator, content_key
from .licenses import license_problem, source_licenses
from .formats import to_record
from .pii import PII_CATEGORIES, apply_policy, scan
from .refusal import refusal_problem, reply_verdict
from .sources import read_jsonl, read_source, source_name

SPLITS = ("train", "validation")
PII_CORPUS = PROJECT_DIR / "data" / "pii_corpus.jsonl"
SECRETS_CORPUS = PROJECT_DIR / "data" / "secrets_corpus.jsonl"


@dataclass
class Tally:
    """What happened to the examples, for the report."""

    read: Counter = field(default_factory=Counter)  # per source
    licenses: dict = field(default_factory=dict)  # per source: license(s), revision, acknowledged
    pii_found: Counter = field(default_factory=Counter)  # finds per category
    pii_examples: Counter = field(default_factory=Counter)  # examples with a find, per category
    pii_dropped: int = 0
    secrets_found: Counter = field(default_factory=Counter)  # finds per kind of credential
    secrets_examples: Counter = field(default_factory=Counter)  # examples with a find, per kind
    secrets_dropped: int = 0
    refusal_kept: int = 0  # examples of refusal-only sources whose every reply refuses
    refusal_dropped: int = 0  # ... and those with a reply that is no refusal
    refusal_unsafe: int = 0  # ... and those whose refusal the guard calls unsafe
    guard_judged: int = 0  # examples the guard judged
    guard_dropped: int = 0  # examples of other sources (data.guard_replies) with an unsafe reply
    guard_categories: Counter = field(default_factory=Counter)  # unsafe replies per category
    duplicates: Counter = field(default_factory=Counter)  # exact, near
    kept: Counter = field(default_factory=Counter)  # per split


def check_licenses(cfg: Config, tally: Tally) -> None:
    """Each source's license (pipeline/data/licenses.py), recorded for the report; a DataError naming
    every source that data.licenses.allow refuses, before any row is read."""
    problems = []
    for src in cfg.data.sources:
        name = source_name(src)
        licenses = source_licenses(src, name, cfg.resolve)
        tally.licenses[name] = {"license": licenses, "revision": src.revision if src.hub else None,
                                "acknowledged": src.license_acknowledged, "purpose": src.purpose}
        problem = license_problem(name, licenses, cfg.data.licenses.allow, src.license_acknowledged)
        if problem:
            problems.append(problem)
    if problems:
        raise DataError("data.licenses: " + ("\n  - ".join([""] + problems) if len(problems) > 1 else problems[0]))


def read_all(cfg: Config, tally: Tally) -> list[dict]:
    """Every source's rows as records with their provenance ("source": where it came from)."""
    check_licenses(cfg, tally)
    records = []
    for src in cfg.data.sources:
        name, rows = read_source(src, cfg.resolve)
        tally.read[name] += len(rows)
        for row in rows:
            record = to_record(row.record, src, row.where)
            if src.purpose == "refusal" and "messages" not in record:
                raise DataError(f"{row.where}: a refusal source (purpose: refusal) needs conversations: in plain "
                                "text every token would be a training target (give format messages, sharegpt "
                                "or alpaca)")
            records.append({**record, "source": row.where, "purpose": src.purpose})
    return records


def screened(rec: dict, purpose: str, where: str, guard: Guard | None, guard_replies: bool, tally: Tally) -> bool:
    """Whether the example may be trained on. A refusal source's replies must all be refusals
    (pipeline/data/refusal.py) and, with a guard, safe; with data.guard_replies every other
    source's replies must be safe too. Each drop is counted."""
    if purpose == "refusal" and refusal_problem(rec):
        tally.refusal_dropped += 1
        return False
    if guard is not None and (purpose == "refusal" or guard_replies) and "messages" in rec:
        verdict = reply_verdict(guard, rec, where)
        tally.guard_judged += 1
        if verdict.verdict == "unsafe":
            tally.guard_categories.update(verdict.categories or ["unspecified"])
            if purpose == "refusal":
                tally.refusal_unsafe += 1
            else:
                tally.guard_dropped += 1
            return False
    if purpose == "refusal":
        tally.refusal_kept += 1
    return True


def apply_policies(cfg: Config, records: list[dict], tally: Tally) -> list[dict]:
    """Records after the refusal and guard screens, the credentials and PII policies and duplicate
    removal, in their original order. Credentials are looked for first, in the text as written (a
    PII mask could cut a key in two)."""
    policy = cfg.data.pii.model_dump()
    d = cfg.data.dedup
    dedup = Deduplicator(exact=d.exact, near=d.near, threshold=d.threshold)
    guard = guard_from_config(cfg) if data_uses_guard(cfg) else None
    kept = []
    for rec in records:
        source, purpose = rec.pop("source"), rec.pop("purpose")
        if not screened(rec, purpose, source, guard, cfg.data.guard_replies, tally):
            continue
        rec, secrets = apply_secrets_policy(rec, cfg.data.secrets)
        tally.secrets_found.update(secrets)
        tally.secrets_examples.update(secrets.keys())
        if rec is None:
            tally.secrets_dropped += 1
            continue
        cleaned, found = apply_policy(rec, policy)
        tally.pii_found.update(found)
        tally.pii_examples.update(found.keys())
        if cleaned is None:
            tally.pii_dropped += 1
            continue
        duplicate = dedup.seen(cleaned) if (d.exact or d.near) else None
        if duplicate:
            tally.duplicates[duplicate] += 1
            continue
        kept.append({**cleaned, "source": source})
    return kept


def in_validation(rec: dict, seed: int, fraction: float) -> bool:
    """A seeded hash of the example's content: the same example lands in the same split whatever is around it."""
    h = hashlib.sha256(f"{seed}:{content_key(rec)}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def split(cfg: Config, records: list[dict], tally: Tally) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for rec in records:
        body = {k: v for k, v in rec.items() if k != "source"}
        out["validation" if in_validation(body, cfg.run.seed, cfg.data.validation_fraction) else "train"].append(rec)
    if not out["train"]:
        raise DataError(f"data: no training example left ({sum(tally.read.values())} read, "
                        f"{tally.refusal_dropped} refusal-source examples without a refusal, "
                        f"{tally.refusal_unsafe + tally.guard_dropped} with a reply the guard calls unsafe, "
                        f"{tally.secrets_dropped} dropped for credentials, "
                        f"{tally.pii_dropped} dropped for personal information, "
                        f"{sum(tally.duplicates.values())} duplicates, {len(out['validation'])} in validation)")
    tally.kept.update({s: len(v) for s, v in out.items()})
    return out


def write_prepared(cfg: Config, splits: dict[str, list[dict]]) -> None:
    """The split files (rewritten only when changed), then the marker that records them."""
    folder = cfg.prepared_dir
    folder.mkdir(parents=True, exist_ok=True)
    for name, recs in splits.items():
        write_if_changed(folder / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    marker = {"files": {f"{s}.jsonl": file_record(folder / f"{s}.jsonl") for s in SPLITS},
              "examples": {s: len(v) for s, v in splits.items()}}
    write_if_changed(cfg.prepared_marker, json.dumps(marker, indent=1, sort_keys=True) + "\n")


def pii_detector_figures(corpus: Path = PII_CORPUS) -> dict[str, dict]:
    """Recall and false-positive rate of each detector on a labelled corpus.

    Each line: {"category", "lang", "text", "pii": true|false}. A positive is
    found when the category's detector fires on it; a negative (a look-alike)
    is a false positive when it does.
    """
    figures = {c: {"positives": 0, "found": 0, "negatives": 0, "false_positives": 0} for c in PII_CATEGORIES}
    for n, rec in read_jsonl(corpus):
        if not isinstance(rec, dict) or rec.get("category") not in figures:
            raise DataError(f"{corpus}:{n}: expected an object with a known category; saw {rec!r:.60}")
        fired = scan(rec["text"])[1].get(rec["category"], 0) > 0
        f = figures[rec["category"]]
        if rec["pii"]:
            f["positives"] += 1
            f["found"] += fired
        else:
            f["negatives"] += 1
            f["false_positives"] += fired
    for f in figures.values():
        f["recall"] = f["found"] / f["positives"] if f["positives"] else None
        f["false_positive_rate"] = f["false_positives"] / f["negatives"] if f["negatives"] else None
    return figures


def secrets_detector_figures(corpus: Path = SECRETS_CORPUS) -> dict[str, dict]:
    """Recall and false positives of the credential detectors on a labelled corpus.

    Each line: {"kind", "text", "secret": true|false}; kind is the credential's kind for a
    positive (found when that kind fires) and what the look-alike imitates for a negative
    (placeholders, hashes, UUIDs, code; a false positive when any kind fires on it).
    """
    figures = {k: {"positives": 0, "found": 0, "negatives": 0, "false_positives": 0} for k in SECRET_KINDS}
    for n, rec in read_jsonl(corpus):
        if not isinstance(rec, dict) or rec.get("kind") not in figures or not isinstance(rec.get("secret"), bool):
            raise DataError(f"{corpus}:{n}: expected {{\"kind\": one of {', '.join(SECRET_KINDS)}, \"text\", "
                            f"\"secret\": true|false}}; saw {rec!r:.60}")
        kinds = {f.kind for f in find_secrets(rec["text"])}
        f = figures[rec["kind"]]
        if rec["secret"]:
            f["positives"] += 1
            f["found"] += rec["kind"] in kinds
        else:
            f["negatives"] += 1
            f["false_positives"] += bool(kinds)
    return figures


def guard_report(cfg: Config, tally: Tally) -> dict | None:
    if not data_uses_guard(cfg):
        return None
    g = cfg.serve.guard
    return {"model": g.model, "format": g.format, "guard_replies": cfg.data.guard_replies,
            "judged": tally.guard_judged, "dropped_refusal_sources": tally.refusal_unsafe,
            "dropped_other_sources": tally.guard_dropped, "categories": dict(sorted(tally.guard_categories.items()))}


def guard_lines(cfg: Config, tally: Tally) -> str:
    report = guard_report(cfg, tally)
    if report is None:
        return "Not asked: no serve.guard, or nothing for it to judge (no refusal-only source, data.guard_replies off)."
    scope = "every source's assistant replies" if cfg.data.guard_replies else "the refusal-only sources' replies"
    categories = ", ".join(f"{k} {v}" for k, v in report["categories"].items()) or "none"
    return (f"{report['model']} ({report['format']}) judged {scope}: {report['judged']} examples, "
            f"{report['dropped_refusal_sources']} dropped from refusal-only sources and "
            f"{report['dropped_other_sources']} from the others as unsafe. Unsafe replies per category: {categories}.")


def write_report(cfg: Config, tally: Tally) -> None:
    detectors = pii_detector_figures()
    secret_detectors = secrets_detector_figures()
    report = {
        "inputs_sha256": cfg.section_digest("data"),
        "read": dict(tally.read),
        "sources": tally.licenses,
        "pii": {c: {"policy": getattr(cfg.data.pii, c), "found": tally.pii_found[c],
                    "examples": tally.pii_examples[c]} for c in PII_CATEGORIES},
        "pii_dropped_examples": tally.pii_dropped,
        "secrets": {"policy": cfg.data.secrets, "dropped_examples": tally.secrets_dropped,
                    "found": {k: tally.secrets_found[k] for k in SECRET_KINDS},
                    "examples": {k: tally.secrets_examples[k] for k in SECRET_KINDS}},
        "secrets_detectors": secret_detectors,
        "refusal_sources": {"kept": tally.refusal_kept, "dropped_not_refusals": tally.refusal_dropped,
                            "dropped_unsafe": tally.refusal_unsafe},
        "guard": guard_report(cfg, tally),
        "duplicates": {"exact": tally.duplicates["exact"], "near": tally.duplicates["near"]},
        "kept": {s: tally.kept[s] for s in SPLITS},
        "pii_detectors": detectors,
    }
    lines = ["# Training data", "", "| source | license | revision | rows read |", "|---|---|---|---:|"]
    for name, n in tally.read.items():
        lic = tally.licenses.get(name, {})
        ack = " (acknowledged)" if lic.get("acknowledged") else ""
        lines.append(f"| {name} | {', '.join(lic.get('license', []))}{ack} | {lic.get('revision') or '-'} | {n} |")
    lines += ["", f"Kept: {tally.kept['train']} train, {tally.kept['validation']} validation "
              f"(seeded split, validation_fraction {cfg.data.validation_fraction}). "
              f"Duplicates removed: {tally.duplicates['exact']} exact, {tally.duplicates['near']} near. "
              f"Dropped for credentials: {tally.secrets_dropped}. "
              f"Dropped for personal information: {tally.pii_dropped}.", "",
              "## Personal information", "",
              "| category | policy | finds | examples | detector recall | detector false positives |",
              "|---|---|---:|---:|---:|---:|"]
    for c in PII_CATEGORIES:
        f = detectors[c]
        lines.append(f"| {c} | {getattr(cfg.data.pii, c)} | {tally.pii_found[c]} | {tally.pii_examples[c]} | "
                     f"{f['found']}/{f['positives']} | {f['false_positives']}/{f['negatives']} |")
    lines += ["", "Detector figures: the bundled corpus data/pii_corpus.jsonl (Japanese and English, "
              "positives and look-alikes per category).", "",
              "## Credentials", "", f"Policy `data.secrets`: {cfg.data.secrets}.", "",
              "| kind | finds | examples | detector recall | detector false positives |", "|---|---:|---:|---:|---:|"]
    for k in SECRET_KINDS:
        f = secret_detectors[k]
        lines.append(f"| {k} | {tally.secrets_found[k]} | {tally.secrets_examples[k]} | "
                     f"{f['found']}/{f['positives']} | {f['false_positives']}/{f['negatives']} |")
    lines += ["", "Detector figures: the bundled corpus data/secrets_corpus.jsonl (credentials of each kind "
              "in Japanese and English text, and look-alikes: placeholders, hashes, UUIDs, code)."]
    refusal = [n for n, lic in tally.licenses.items() if lic.get("purpose") == "refusal"]
    lines += ["", "## Refusal-only sources", "",
              ("Sources: " + ", ".join(refusal) + ". They teach refusing unsafe requests, never generating: only "
               "assistant replies are training targets, and an example whose replies are not all refusals "
               f"(pipeline/data/refusal.py) is dropped. Kept {tally.refusal_kept}, dropped {tally.refusal_dropped}"
               + (f", dropped as unsafe by the guard {tally.refusal_unsafe}" if data_uses_guard(cfg) else "") + ".")
              if refusal else "None."]
    lines += ["", "## Guard", "", guard_lines(cfg, tally)]
    cfg.reports_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.reports_dir / "data.md", "\n".join(lines) + "\n")
    atomic_write_text(cfg.data_report, json.dumps(report, indent=1, ensure_ascii=False) + "\n")


def prepare_data(cfg: Config) -> Path:
    """Run the data stage.

    Input: a validated Config (data.* keys and the sources they name).
    Output: the prepared folder `<run>/data/` (train.jsonl, validation.jsonl,
    data.json) and reports/data.{json,md}. Raises DataError naming the source
    and row of a bad example, or when no training example is left.
    """
    tally = Tally()
    records = apply_policies(cfg, read_all(cfg, tally), tally)
    splits = split(cfg, records, tally)
    write_prepared(cfg, splits)
    write_report(cfg, tally)
    print(f"[data] {sum(tally.read.values())} read, {tally.kept['train']} train + {tally.kept['validation']} "
          f"validation kept in {cfg.prepared_dir}")
    return cfg.prepared_dir


def prepared_is_current(cfg: Config) -> bool:
    """Whether the prepared dataset exists, is intact, and was made from the current data.* keys."""
    try:
        report = json.loads(cfg.data_report.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(report, dict) and report.get("inputs_sha256") == cfg.section_digest("data")
            and folder_problem(cfg.prepared_dir, PREPARED_MARKER) is None)


def read_prepared(cfg: Config) -> tuple[dict[str, list[dict]], str]:
    """The prepared splits (preparing them first when stale) and their sha256, which training records."""
    if not prepared_is_current(cfg):
        prepare_data(cfg)
    verify_folder(cfg.prepared_dir, PREPARED_MARKER)
    marker = cfg.prepared_marker.read_bytes()
    splits = {s: [rec for _, rec in read_jsonl(cfg.prepared_dir / f"{s}.jsonl")] for s in SPLITS}
    return splits, hashlib.sha256(marker).hexdigest()
