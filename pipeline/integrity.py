"""Damaged artifacts are found before anything uses them, and rebuilt.

Every producing stage records what it wrote: a GGUF (or imatrix) gets a
sidecar `<file>.sha256` (JSON: sha256 and size) written before the file is
renamed into place; a folder (a checkpoint, the fused model) lists each of its
files with sha256 and size in its completion marker (`checkpoint.json`,
`fusion.json`), written last.

Two checks use these records:
  - `sweep(cfg)`, run by `plan` at the start of every `make`: for each artifact
    of the run that exists, the record must exist and every size match, a GGUF
    or safetensors header must read, and a file changed after its record was
    written (mtime) is hashed in full. A damaged artifact is removed (its
    record too) with one line saying why, so Make rebuilds it.
  - `verify(...)`, called by the stage that consumes an artifact: the full
    sha256. A mismatch there (bit rot that kept the mtime) removes the artifact
    and fails the stage, naming the file: the next `make` rebuilds it.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from .artifacts import atomic_write_text, sha256_file
from .constants import CHECKPOINT_MARKER, FUSION_MARKER, PREPARED_MARKER
from .errors import PipelineError
from .formats import GGUFError, validate_gguf
from .modeldir import safetensors_problem
from .runlock import unless_busy

SIDECAR_SUFFIX = ".sha256"


class CorruptArtifactError(PipelineError):
    """An artifact whose bytes are not the ones its producer recorded."""


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def file_record(path: Path) -> dict:
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def write_sidecar(final: Path, written: Path | None = None, fidelity: dict | None = None) -> None:
    """Record `written` (default: `final`) as the content of `final`, with the fidelity gate's
    entries for it when given.

    Call it before renaming a temporary file to `final`: a kill between the two
    leaves a record that the old `final` does not match, which sweep() removes.
    """
    record = {"file": final.name, **file_record(written or final), **({"fidelity": fidelity} if fidelity else {})}
    atomic_write_text(sidecar(final), json.dumps(record) + "\n")


def recorded_fidelity(path: Path) -> dict:
    """The fidelity gate's entries recorded with a GGUF (write_sidecar); {} when none are."""
    try:
        value = json.loads(sidecar(path).read_text(encoding="utf-8")).get("fidelity")
    except (OSError, ValueError, AttributeError):
        return {}
    return value if isinstance(value, dict) else {}


def folder_records(folder: Path, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """sha256 and size of every file of a folder (recursively), for its completion marker."""
    return {str(p.relative_to(folder)): file_record(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in exclude}


# -- checks ------------------------------------------------------------------

def _header_problem(path: Path) -> str | None:
    """A cheap structural check of a GGUF or safetensors file; None when it reads."""
    try:
        if path.suffix == ".gguf":
            try:
                validate_gguf(path)
            except GGUFError as e:
                return str(e)
        elif path.suffix == ".safetensors":
            return safetensors_problem(path, key="header")
    except OSError as e:
        return f"cannot read it ({e})"
    return None


def _file_problem(path: Path, record: dict, *, full: bool, recorded_at: float | None) -> str | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing"
    if st.st_size != record.get("size"):
        return f"size {st.st_size} bytes, {record.get('size')} recorded (truncated or rewritten)"
    if full or (recorded_at is not None and st.st_mtime > recorded_at):
        actual = sha256_file(path)
        if actual != record.get("sha256"):
            return f"sha256 {actual[:12]}..., {str(record.get('sha256'))[:12]}... recorded (changed on disk)"
    return _header_problem(path)


def file_problem(path: Path, *, full: bool = False) -> str | None:
    """Why the GGUF/imatrix file `path` cannot be trusted, or None (it matches its sidecar)."""
    try:
        side = sidecar(path)
        record = json.loads(side.read_text(encoding="utf-8"))
        recorded_at = side.stat().st_mtime
    except FileNotFoundError:
        return f"no {sidecar(path).name} (not written by this pipeline, or written by an older version)"
    except (ValueError, OSError) as e:
        return f"unreadable {sidecar(path).name} ({e})"
    return _file_problem(path, record, full=full, recorded_at=recorded_at)


def folder_problem(folder: Path, marker_name: str, *, full: bool = False) -> str | None:
    """Why the folder artifact cannot be trusted (its marker lists each file), or None."""
    marker = folder / marker_name
    try:
        records = json.loads(marker.read_text(encoding="utf-8")).get("files")
        recorded_at = marker.stat().st_mtime
    except FileNotFoundError:
        return f"no {marker_name}"
    except (ValueError, OSError, AttributeError) as e:
        return f"unreadable {marker_name} ({e})"
    if records is None:
        return None  # written by an older version, which recorded no files: nothing to check against
    if not isinstance(records, dict):
        return f"{marker_name}: 'files' is not a table of files"
    for name, record in records.items():
        problem = _file_problem(folder / name, record, full=full, recorded_at=recorded_at)
        if problem:
            return f"{name}: {problem}"
    return None


def remove(path: Path) -> None:
    """Remove a damaged artifact and its record; a folder is renamed aside first (one atomic step)."""
    if path.is_dir():
        aside = path.with_name(f".tmp-damaged-{path.name}.{os.getpid()}")
        os.replace(path, aside)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
        sidecar(path).unlink(missing_ok=True)


def verify_file(path: Path) -> str:
    """Full check of a GGUF before a stage consumes it; a damaged one is removed, then reported.

    Returns its sha256 (just checked), so the caller need not hash it again.
    """
    problem = file_problem(path, full=True)
    if problem:
        remove(path)
        raise CorruptArtifactError(f"{path}: {problem}; removed it, run make again to rebuild it")
    return json.loads(sidecar(path).read_text(encoding="utf-8"))["sha256"]


def verify_folder(folder: Path, marker_name: str, *, remove_damaged: bool = True) -> None:
    """Full check of a folder artifact before a stage consumes it (see verify_file).

    remove_damaged=False for a folder the run does not own (a checkpoint given by path).
    """
    problem = folder_problem(folder, marker_name, full=True)
    if problem:
        if not remove_damaged:
            raise CorruptArtifactError(f"{folder}: {problem}")
        remove(folder)
        raise CorruptArtifactError(f"{folder}: {problem}; removed it, run make again to rebuild it")


def sweep(cfg) -> list[str]:
    """The quick check of every artifact of the run (see the module's doc); returns what was removed."""
    removed = []
    folders = [(cfg.prepared_dir, PREPARED_MARKER), (cfg.final_checkpoint, CHECKPOINT_MARKER),
               (cfg.fused_dir, FUSION_MARKER)]
    for folder, marker in folders:
        if folder.exists():
            problem = folder_problem(folder, marker)
            if problem:
                removed.append(f"{folder}: {problem}")
                remove(folder)
                if folder == cfg.prepared_dir:  # the report says the data stage is done: not any more
                    cfg.data_report.unlink(missing_ok=True)
    files = [cfg.gguf_path(cfg.gguf.outtype), *(cfg.gguf_path(q) for q in cfg.gguf.quantizations)]
    if cfg.imatrix_path is not None:
        files.append(cfg.imatrix_path)
    for path in files:
        if path.exists():
            problem = file_problem(path)
            if problem:
                removed.append(f"{path}: {problem}")
                remove(path)
    for line in removed:
        print(f"==> [verify] {line}; removed, it will be rebuilt", file=sys.stderr)
    remove_leftovers(cfg.run_dir)
    return removed


def remove_leftovers(run_dir: Path) -> None:
    """Delete the `.tmp-*` files and folders a killed stage left in the run folder.

    Only when no other build is running there (runlock): its temporary files are
    work in progress. A killed fuse or convert can leave gigabytes behind.
    """
    if not run_dir.is_dir() or not any(run_dir.rglob(".tmp-*")):
        return
    with unless_busy(run_dir) as free:
        if not free:
            return
        for tmp in sorted(run_dir.rglob(".tmp-*"), key=lambda p: len(p.parts)):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
