"""Untrusted files: crafted pickles and YAML tags are refused and run nothing.

Each crafted file, when loaded the unsafe way, writes a marker file (checked
here first, so the exploit is known to work); through the pipeline the marker
must never appear. A static check keeps every torch.load safe.
"""
from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, small_config, write_config

pytestmark = pytest.mark.reliability("untrusted")


class Exploit:
    """Unpickling this runs Python code that writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def run_pipeline(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *argv], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdin=subprocess.DEVNULL, timeout=300)


def test_the_exploit_runs_code_when_unpickled(tmp_path):
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps({"x": Exploit(marker)}))
    assert marker.read_text() == "code ran"


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_crafted_seed_soul_is_refused_and_runs_nothing(tmp_path, writer):
    marker, soul_pt = tmp_path / "marker", tmp_path / "soul.pt"
    payload = {"alpha": torch.tensor(1.0), "so8_rotation": Exploit(marker)}
    if writer == "torch.save":
        torch.save(payload, soul_pt)
    else:
        soul_pt.write_bytes(pickle.dumps(payload, protocol=2))
    proc = run_pipeline("import-soul", str(soul_pt), "--out", str(tmp_path / "soul.safetensors"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "soul.pt: not a plain tensor file, refused" in proc.stderr
    assert not marker.exists()
    assert not (tmp_path / "soul.safetensors").exists()


def test_config_with_a_python_tag_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    text = f"run: !!python/object/apply:os.system ['touch {marker}']\n"
    yaml.unsafe_load(text)  # noqa: unsafe-load (the control: loaded unsafely, the tag does run code)
    assert marker.exists()
    marker.unlink()
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    proc = run_pipeline("check-config", "--config", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "invalid YAML" in proc.stderr and "python/object/apply" in proc.stderr
    assert not marker.exists()


# Files a Hugging Face / PyTorch trainer would torch.load when resuming.
TRAINER_PICKLES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.pt", "training_args.bin",
                   "adapter_model.bin", "pytorch_model.bin")


def test_resume_loads_no_pickle_from_the_checkpoint_or_the_base(tiny_phi3_dir, tmp_path):
    """A checkpoint and a base folder full of crafted pickles: training resumes from the
    checkpoint's safetensors and JSON, and none of the pickles is opened."""
    from pipeline.config import load_config
    from pipeline.train import train

    base = tmp_path / "base"
    shutil.copytree(tiny_phi3_dir, base)
    cfg_path = write_config(tmp_path / "cfg.yaml", small_config(
        base, tmp_path / "build", train={"steps": 2, "save_every": 1}, soul={"warmup_steps": 0, "anneal_steps": 2}))
    cfg = load_config(cfg_path)
    train(cfg)

    ckpts = cfg.run_dir / "checkpoints"
    shutil.rmtree(ckpts / "final")
    shutil.rmtree(ckpts / "step_000002")
    markers = []
    for folder, names in ((ckpts / "step_000001", TRAINER_PICKLES), (base, ("pytorch_model.bin",))):
        for name in names:
            markers.append(tmp_path / f"marker-{folder.name}-{name}")
            torch.save({"state": Exploit(markers[-1])}, folder / name)
    proc = run_pipeline("train", "--config", str(cfg_path))
    assert proc.returncode == 0, proc.stderr
    assert "resuming from step_000001" in proc.stdout + proc.stderr
    assert json.loads((ckpts / "final" / "checkpoint.json").read_text())["step"] == 2
    assert [m.name for m in markers if m.exists()] == []


# -- no unsafe deserialization in the code ------------------------------------------

SCANNED = ("pipeline", "scripts", "bench", "tests", "docker")
# Anywhere: loaders that unpickle. In pipeline/ nothing may unpickle at all.
PICKLE_MODULES = ("pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib")


def unsafe_loads(source: str, filename: str = "<source>", *, strict: bool = False) -> list[str]:
    """Calls in `source` that may run code from a file: torch.load without a literal
    weights_only=True (however torch or its load is imported or aliased), numpy.load with
    allow_pickle=True, yaml's unsafe loaders; with strict (pipeline/), any use of pickle,
    dill, cloudpickle or joblib loaders. A line marked `# noqa: unsafe-load` is a deliberate
    exception (a test's control). Returns one "file:line: what" per finding."""
    tree = ast.parse(source, filename)
    waived = {n for n, line in enumerate(source.splitlines(), 1) if "# noqa: unsafe-load" in line}
    modules: dict[str, str] = {}  # local name -> module it is bound to
    functions: dict[str, str] = {}  # local name -> "module.function"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                modules[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                functions[a.asname or a.name] = f"{node.module}.{a.name}"
                modules.setdefault(a.asname or a.name, f"{node.module}.{a.name}")

    def qualified(func: ast.expr) -> str | None:
        parts = []
        while isinstance(func, ast.Attribute):
            parts.append(func.attr)
            func = func.value
        if not isinstance(func, ast.Name):
            return None
        root = functions.get(func.id) if not parts else modules.get(func.id)
        return ".".join([root or func.id, *reversed(parts)])

    def keyword(call: ast.Call, name: str):
        kw = next((k for k in call.keywords if k.arg == name), None)
        return kw.value.value if kw is not None and isinstance(kw.value, ast.Constant) else kw

    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or node.lineno in waived:
            continue
        name = qualified(node.func) or ""
        where = f"{filename}:{node.lineno}"
        if name in ("torch.load", "torch.serialization.load") and keyword(node, "weights_only") is not True:
            found.append(f"{where}: {name} without weights_only=True")
        elif name in ("numpy.load", "np.load") and keyword(node, "allow_pickle") not in (None, False):
            found.append(f"{where}: {name} with allow_pickle")
        elif name in ("yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all"):
            found.append(f"{where}: {name}")
        elif name in ("yaml.load", "yaml.load_all") and any(
                isinstance(k.value, ast.Attribute) and k.value.attr in ("Loader", "UnsafeLoader", "FullLoader")
                for k in node.keywords if k.arg == "Loader"):
            found.append(f"{where}: {name} with an unsafe Loader")
        elif strict and name.split(".")[0] in PICKLE_MODULES and name.split(".")[-1] in (
                "load", "loads", "Unpickler", "load_session"):
            found.append(f"{where}: {name} unpickles")
    return found


def scanned_files() -> list[Path]:
    return sorted(p for d in SCANNED if (REPO / d).is_dir() for p in (REPO / d).rglob("*.py"))


def test_no_unsafe_load_in_the_code():
    files = scanned_files()
    assert any(p.name == "soul.py" for p in files) and len(files) > 20
    found = []
    for path in files:
        rel = path.relative_to(REPO)
        found += unsafe_loads(path.read_text(encoding="utf-8"), str(rel), strict=rel.parts[0] == "pipeline")
    assert found == []


BAD_SOURCES = [
    "import torch\ntorch.load('x.pt')",
    "import torch\ntorch.load('x.pt', weights_only=False)",
    "import torch as T\nT.load(f, map_location='cpu')",
    "from torch import load\nload('x')",
    "from torch import load as fetch\nfetch('x', weights_only=None)",
    "import torch\nopts = {}\ntorch.load('x', **opts)",
    "import torch.serialization\ntorch.serialization.load('x')",
    "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
    "import yaml\nyaml.unsafe_load(s)",
    "import yaml\nyaml.load(s, Loader=yaml.Loader)",
]
BAD_IN_PIPELINE = [
    "import pickle\npickle.load(f)",
    "import pickle\npickle.loads(b)",
    "from pickle import loads\nloads(b)",
    "import dill\ndill.load(f)",
    "import joblib\njoblib.load('m.joblib')",
]
GOOD_SOURCES = [
    "import torch\ntorch.load('x.pt', map_location='cpu', weights_only=True)",
    "from torch import load\nload('x', weights_only=True)",
    "import json\njson.load(f)",
    "from safetensors.torch import load_file\nload_file('x')",
    "import yaml\nyaml.load(s, Loader=_UniqueKeyLoader)",
    "import numpy as np\nnp.load('x.npy')",
]


@pytest.mark.parametrize("source", BAD_SOURCES + BAD_IN_PIPELINE)
def test_the_checker_catches_an_unsafe_load(source):
    assert len(unsafe_loads(source, strict=True)) == 1


@pytest.mark.parametrize("source", BAD_IN_PIPELINE)
def test_pickle_is_allowed_outside_pipeline_only(source):
    assert unsafe_loads(source) == []


@pytest.mark.parametrize("source", GOOD_SOURCES)
def test_the_checker_passes_safe_loads(source):
    assert unsafe_loads(source, strict=True) == []
