"""Terms of use: every source's license, checked against `data.licenses.allow` at `data`.

A hub dataset's license is its dataset card's: `license:` in the metadata of the snapshot's
README.md, read with huggingface_hub's card parser (a list of licenses is kept as it is: each
must be allowed). A local file's is the config's: `license:` on the source. A hub source may
set `license:` too, for a card without one; a card and a config that disagree are an error.
With `data.licenses.allow` (a list of SPDX-like ids, compared without regard to case), a
source whose license is unknown or not on the list stops the stage, naming the source and its
license, unless the source sets `license_acknowledged: true` (the user has checked the terms
and takes them on). Without `allow`, nothing is refused and the report still lists each
source's license. robots.txt does not apply: this tool fetches no web pages, only hub datasets
through huggingface_hub and files the user gives it.
"""
from __future__ import annotations

from pathlib import Path

from huggingface_hub import DatasetCard

from ..errors import DataError
from .sources import hub_folder

UNKNOWN = "unknown"


def card_licenses(folder: Path) -> list[str]:
    """The licenses in a dataset repository's card metadata ([] without a card or a `license:`)."""
    readme = folder / "README.md"
    if not readme.is_file():
        return []
    try:
        value = DatasetCard.load(readme).data.license
    except Exception as e:  # noqa: BLE001 (the card's YAML is the dataset author's: any parse error)
        raise DataError(f"{readme}: cannot read the dataset card's metadata ({type(e).__name__})") from None
    if value is None:
        return []
    return [str(v).strip().lower() for v in (value if isinstance(value, list) else [value]) if str(v).strip()]


def source_licenses(src, name: str, resolve) -> list[str]:
    """The source's licenses, lower case ([UNKNOWN] when none is known). DataError when a hub
    card and the config's `license:` disagree."""
    declared = [src.license.strip().lower()] if src.license else []
    if src.hub is None:
        return declared or [UNKNOWN]
    card = card_licenses(hub_folder(src, resolve))
    if card and declared and declared[0] not in card:
        raise DataError(f"{name}: the config says license {src.license!r}, the dataset card says "
                        f"{', '.join(card)}: remove the config's license or check the card")
    return card or declared or [UNKNOWN]


def license_problem(name: str, licenses: list[str], allow: list[str] | None, acknowledged: bool) -> str | None:
    """Why data.licenses.allow refuses the source (None when it does not)."""
    if allow is None or acknowledged:
        return None
    allowed = {a.strip().lower() for a in allow}
    refused = [lic for lic in licenses if lic not in allowed]
    if not refused:
        return None
    what = "has no known license (set `license:` on the source)" if refused == [UNKNOWN] else \
        f"has license {', '.join(refused)}, which data.licenses.allow does not list"
    return (f"{name}: {what}. Allowed: {', '.join(sorted(allowed)) or '(none)'}. Check the source's terms, then add "
            "its license to data.licenses.allow or set license_acknowledged: true on the source")
