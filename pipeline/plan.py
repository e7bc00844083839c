"""What Make needs to know about a run: artifact paths and config stamps.

`write_plan(cfg)` validates nothing itself (the config is already loaded);
it writes one stamp per stage under `<run>/stamps/`, each holding exactly the
config values that stage reads, and `<run>/plan.mk` with the artifact paths.
Both are rewritten only when their content changes, so their mtimes move
only when something a stage depends on really changed: that is how `touch
config.yaml` re-runs nothing while a new system prompt re-runs only the
Modelfile and registration.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .artifacts import write_if_changed
from .config import STAGE_INPUTS, Config, stage_inputs_json
from .integrity import sweep
from .ollama import MODELFILES, primary_quantization, stamp_follows_server

# Files of a local base model whose change means training must run again.
BASE_FILE_PATTERNS = ("config.json", "*.safetensors", "tokenizer*", "*.jinja", "generation_config.json")


def stamp_path(cfg: Config, stage: str) -> Path:
    return cfg.stamp_dir / f"{stage}.stamp"


def base_dependencies(cfg: Config) -> list[Path]:
    if not cfg.base_is_local():
        return []  # a hub base is pinned by model.revision, which is in the train stamp
    base = cfg.resolve(cfg.model.base).resolve()
    return sorted({p for pat in BASE_FILE_PATTERNS for p in base.glob(pat) if p.is_file()})


def make_variables(cfg: Config) -> dict[str, str]:
    gguf_dir = cfg.gguf_path("x").parent
    quant_paths = [cfg.gguf_path(q) for q in cfg.gguf.quantizations]
    return {
        "RUN_NAME": cfg.run.name,
        "RUN_DIR": str(cfg.run_dir.resolve()),
        "STAMP_DIR": str(cfg.stamp_dir.resolve()),
        "DATA": " ".join(str(p) for p in cfg.local_data_files()),
        "PREPARED": str(cfg.prepared_marker.resolve()),
        "DATA_REPORT": str(cfg.data_report.resolve()),
        "BASE_DEPS": " ".join(str(p) for p in base_dependencies(cfg)),
        "CHECKPOINT": str(cfg.checkpoint_marker.resolve()),
        "FUSED": str(cfg.fused_marker.resolve()),
        "GGUF_DIR": str(gguf_dir.resolve()),
        "CONVERTED": str(cfg.gguf_path(cfg.gguf.outtype).resolve()),
        "QUANTIZED": " ".join(str(p.resolve()) for p in quant_paths),
        # Empty when quantizing without an importance matrix.
        "IMATRIX": str(cfg.imatrix_path.resolve()) if cfg.imatrix_path else "",
        "CALIBRATION": str(cfg.imatrix_calibration.resolve()) if cfg.imatrix_calibration else "",
        "SERVED_GGUF": str(cfg.gguf_path(primary_quantization(cfg)).resolve()),
        "MODELFILE": str(cfg.modelfile_path.resolve()),
        "FAMILY_TEMPLATE": str((MODELFILES / f"{cfg.ollama.family}.Modelfile").resolve()),
        "OLLAMA_STAMP": str(cfg.ollama_stamp.resolve()),
        "OLLAMA_MODEL": cfg.ollama.model,
        "METRICS": str(cfg.metrics_path.resolve()),
        "PLOTS": " ".join(str(p.resolve()) for p in cfg.plot_paths.values()),
        "HELDOUT": str(cfg.heldout_path.resolve()),
        "EVAL_PASSED": str(cfg.eval_passed.resolve()),
    }


def write_plan(cfg: Config) -> Path:
    """Write the stage stamps and plan.mk (only what changed); return plan.mk's path.

    First removes any artifact of the run that no longer matches what its stage
    recorded (integrity.sweep), so that Make rebuilds it instead of using it, and the Ollama
    stamp when the server no longer has the registered model (ollama.stamp_follows_server).
    """
    sweep(cfg)
    followed = stamp_follows_server(cfg)
    if followed:
        print(followed, file=sys.stderr)
    for stage in STAGE_INPUTS:
        write_if_changed(stamp_path(cfg, stage), stage_inputs_json(cfg, stage))
    lines = ["# Written by `python -m pipeline plan`: artifact paths of this run, for pipeline.mk."]
    lines += [f"{k} := {v}" for k, v in make_variables(cfg).items()]
    plan = cfg.run_dir / "plan.mk"
    write_if_changed(plan, "\n".join(lines) + "\n")
    return plan.resolve()
