"""modelfiles/: the Ollama TEMPLATE and stops of each chat format, one file per family.

Read by the Modelfile stage (pipeline.ollama) and, before anything is built, by
check-config (pipeline.basetokenizer checks the stops against the base's
tokenizer), so it is a module of its own that neither imports.

Errors: OllamaError (exit 2) for a missing Modelfile or one without a TEMPLATE block.
"""
from __future__ import annotations

import re
from pathlib import Path

from .errors import OllamaError

MODELFILES = Path(__file__).resolve().parent.parent / "modelfiles"


def family_template(family: str) -> str:
    path = MODELFILES / f"{family}.Modelfile"
    if not path.is_file():
        known = sorted(p.stem for p in MODELFILES.glob("*.Modelfile"))
        raise OllamaError(f"ollama.family: no template {path.name} in modelfiles/ (known: {', '.join(known)})")
    return path.read_text(encoding="utf-8")


def family_spec(family: str) -> tuple[str, list[str]]:
    """The TEMPLATE text and the stop strings of a family's Modelfile fragment."""
    text = family_template(family)
    template = re.search(r'^TEMPLATE """(.*?)"""', text, re.S | re.M)
    if template is None:
        raise OllamaError(f"modelfiles/{family}.Modelfile: no TEMPLATE \"\"\"...\"\"\" block")
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
    return template.group(1), stops
