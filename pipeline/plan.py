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
from .config import STAGE_INPUTS, Config, make_path, modelfile_family, stage_inputs_json
from .integrity import sweep
from .modelcard import card_input_files, card_path, card_record
from .modelfiles import MODELFILES
from .ollama import primary_quantization, stamp_follows_server

# Files of a local base model whose change means training must run again.
BASE_FILE_PATTERNS = ("config.json", "*.safetensors", "tokenizer*", "*.jinja", "generation_config.json")


def stamp_path(cfg: Config, stage: str) -> Path:
    return cfg.stamp_dir / f"{stage}.stamp"


def base_dependencies(cfg: Config) -> list[Path]:
    if not cfg.base_is_local():
        return []  # a hub base is pinned by model.revision, which is in the train stamp
    base = cfg.resolve(cfg.model.base).resolve()
    return sorted({p for pat in BASE_FILE_PATTERNS for p in base.glob(pat) if p.is_file()})


def family_template_dependency(cfg: Config) -> str:
    """The Modelfile's family template as make names it: the run's family's, or every family's
    while the family is not known yet (a hub base not downloaded), so that none is missed."""
    family = modelfile_family(cfg)
    names = [MODELFILES / f"{family}.Modelfile"] if family else sorted(MODELFILES.glob("*.Modelfile"))
    return " ".join(make_path(p) for p in names)


def make_variables(cfg: Config) -> dict[str, str]:
    """plan.mk's variables: the run's name and its files as make names them (config.make_path)."""
    gguf_dir = cfg.gguf_path("x").parent
    quant_paths = [cfg.gguf_path(q) for q in cfg.gguf.quantizations]
    return {
        "RUN_NAME": cfg.run.name,
        "RUN_DIR": make_path(cfg.run_dir),
        "STAMP_DIR": make_path(cfg.stamp_dir),
        "DATA": " ".join(make_path(p) for p in cfg.local_data_files()),
        "PREPARED": make_path(cfg.prepared_marker),
        "DATA_REPORT": make_path(cfg.data_report),
        "BASE_DEPS": " ".join(make_path(p) for p in base_dependencies(cfg)),
        "CHECKPOINT": make_path(cfg.checkpoint_marker),
        "FUSED": make_path(cfg.fused_marker),
        "MODEL_CARD": make_path(card_path(cfg)),
        "CARD_RECORD": make_path(card_record(cfg)),
        # The card's inputs beyond fusion.json and the data report, existing or not (pipeline.mk
        # depends on those that exist): the fidelity and eval reports, a local base's own card.
        "CARD_INPUTS": " ".join(make_path(p) for p in card_input_files(cfg)),
        "GGUF_DIR": make_path(gguf_dir),
        "CONVERTED": make_path(cfg.gguf_path(cfg.gguf.outtype)),
        "QUANTIZED": " ".join(make_path(p) for p in quant_paths),
        # Empty when quantizing without an importance matrix.
        "IMATRIX": make_path(cfg.imatrix_path) if cfg.imatrix_path else "",
        "CALIBRATION": make_path(cfg.imatrix_calibration) if cfg.imatrix_calibration else "",
        "SERVED_GGUF": make_path(cfg.gguf_path(primary_quantization(cfg))),
        "MODELFILE": make_path(cfg.modelfile_path),
        "FAMILY_TEMPLATE": family_template_dependency(cfg),
        "OLLAMA_STAMP": make_path(cfg.ollama_stamp),
        "OLLAMA_MODEL": cfg.ollama.model,
        "METRICS": make_path(cfg.metrics_path),
        "PLOTS": " ".join(make_path(p) for p in cfg.plot_paths.values()),
        "HELDOUT": make_path(cfg.heldout_path),
        "EVAL_PASSED": make_path(cfg.eval_passed),
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
