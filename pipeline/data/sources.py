"""Read one configured source into rows: (where, record) pairs.

A source is a local file, read by its suffix: JSONL (`.jsonl`), JSON (`.json`,
a list of objects), Parquet (`.parquet`) or CSV (`.csv`); or a dataset of the
Hugging Face hub (`hub: owner/name`, or a local folder laid out as a hub
repository), at `revision`, `split` and `subset`: huggingface_hub fetches the
repository into its cache (HF_TOKEN and HF_HUB_OFFLINE apply), and `datasets`
reads it there as a local folder.

JSON and JSONL are read here, line by line, so an error names the line; a UTF-8
BOM and CRLF line ends are accepted. Parquet, CSV and hub datasets are read by
`datasets`; rows are numbered from 1. Every error is a DataError naming the source.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import datasets
from huggingface_hub import snapshot_download

from ..errors import DataError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class Row:
    where: str  # "data/x.jsonl:3", "owner/name[train] row 17"
    record: object  # what the source holds (a dict unless the source is broken)


def read_jsonl(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line. Raises DataError naming the line."""
    text = _read_text(path)
    rows = []
    # split on "\n" only: str.splitlines also breaks at U+2028 and the like, which JSON strings may hold
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON: {e.msg} (column {e.colno})") from None
    return rows


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a data file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        n = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from None
    return text.removeprefix("\ufeff")  # the BOM Windows editors write


def _read_json(path: Path) -> list[tuple[int, object]]:
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(value, list):
        raise DataError(f"{path}: a .json source must hold a list of objects, not a {type(value).__name__} "
                        "(one object per line is .jsonl)")
    return list(enumerate(value, start=1))


def _with_datasets(what: str, load) -> list[tuple[int, object]]:
    """Rows of a `datasets` load, with its errors turned into a DataError naming `what`."""
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        ds = load()
    except Exception as e:  # noqa: BLE001 (datasets raises many kinds; each is the user's input)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{what}: cannot be read: {msg}") from None
    return list(enumerate(ds, start=1))


def source_name(src) -> str:
    """How reports and errors name a source: the file as configured, or owner/name[split]."""
    if src.hub is None:
        return src.path
    return f"{src.hub}{':' + src.subset if src.subset else ''}[{src.split}]"


def read_source(src, resolve) -> tuple[str, list[Row]]:
    """Rows of one source (a config DataSource), at most src.max_examples.

    `resolve` turns a configured path into a Path. Returns the source's name
    (the file as configured, or `owner/name[split]`, `owner/name:subset[split]`) and its rows.
    """
    name = source_name(src)
    if src.hub is not None:
        folder = hub_folder(src, resolve)
        rows = _with_datasets(name, lambda: datasets.load_dataset(
            str(folder), name=src.subset, split=src.split))
        out = [Row(f"{name} row {n}", rec) for n, rec in rows]
    else:
        path = resolve(src.path)
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            rows = read_jsonl(path)
        elif suffix == ".json":
            rows = _read_json(path)
        elif suffix == ".parquet":
            rows = _with_datasets(name, lambda: datasets.load_dataset(
                "parquet", data_files=str(path), split="train"))
        elif suffix == ".csv":
            rows = _with_datasets(name, lambda: datasets.load_dataset(
                "csv", data_files=str(path), split="train", encoding="utf-8-sig", keep_default_na=False))
        else:
            raise DataError(f"{path}: unknown file type {suffix or '(none)'} (expected one of {', '.join(SUFFIXES)})")
        sep = ":" if suffix in (".jsonl", ".json") else " row "
        out = [Row(f"{name}{sep}{n}", rec) for n, rec in rows]
    if src.max_examples is not None:
        out = out[: src.max_examples]
    if not out:
        raise DataError(f"{name}: no examples (the source is empty)")
    return name, out


def hub_folder(src, resolve) -> Path:
    """A hub source's repository folder: the local folder it names, else its snapshot at src.revision."""
    return resolve(src.hub) if _is_local_folder(src.hub, resolve) else _hub_snapshot(src)


def _hub_snapshot(src) -> Path:
    """The dataset repository at src.revision, in the hub cache (downloaded once; HF_TOKEN and
    HF_HUB_OFFLINE apply). `datasets` then reads it as a local folder, which it does offline too."""
    try:
        # token=None: huggingface_hub reads HF_TOKEN (or a stored login) itself
        return Path(snapshot_download(src.hub, repo_type="dataset", revision=src.revision, token=None))
    except Exception as e:  # noqa: BLE001 (network, auth, missing revision: each is the user's to fix)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{src.hub}@{src.revision}: cannot fetch the dataset from the hub: {msg} "
                        "(set HF_TOKEN for a gated dataset; offline, it must be in the hub cache)") from None


def _is_local_folder(hub: str, resolve) -> bool:
    return hub.startswith((".", "/", "~")) or hub.count("/") != 1 or resolve(hub).is_dir()
