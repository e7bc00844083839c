"""Terms of use (pipeline/data/licenses.py): each source's license from its dataset card or the
config, data.licenses.allow enforced at `data` before any row is read, and the report's sources."""
from __future__ import annotations

import json

import pytest

from conftest import small_config, write_config
from makeutil import make, run_make
from pipeline.config import load_config
from pipeline.data.prepare import prepare_data
from pipeline.errors import DataError
from test_data import hub_repo

ALLOW = ["apache-2.0", "cc-by-4.0"]


def local_source(tmp_path, **extra) -> dict:
    data = tmp_path / "local.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"質問{i}"},
                                                     {"role": "assistant", "content": f"答え{i}です。"}]},
                                       ensure_ascii=False) + "\n" for i in range(10)), encoding="utf-8")
    return {"path": str(data), "format": "messages", **extra}


def hub_source(tmp_path, card_license: str | None, **extra) -> dict:
    repo = hub_repo(tmp_path / "repo")
    if card_license:
        readme = repo / "README.md"
        readme.write_text(readme.read_text(encoding="utf-8").replace("---\n", f"---\nlicense: {card_license}\n", 1),
                          encoding="utf-8")
    return {"hub": str(repo), "format": "sharegpt", "split": "train", **extra}


def config(tmp_path, tiny_phi3_dir, sources: list[dict], allow=ALLOW):
    data = {"train": sources, "validation_fraction": 0.0, "licenses": {"allow": allow}}
    return load_config(write_config(tmp_path / "c.yaml", small_config(tiny_phi3_dir, tmp_path / "build", data=data)))


@pytest.mark.reliability("bad-input")
def test_a_source_without_a_known_license_is_refused_naming_it(tmp_path, tiny_phi3_dir):
    cfg = config(tmp_path, tiny_phi3_dir, [local_source(tmp_path)])
    with pytest.raises(DataError, match=r"local\.jsonl: has no known license \(set `license:` on the source\)"):
        prepare_data(cfg)
    assert not cfg.prepared_dir.exists() and not cfg.data_report.exists()


@pytest.mark.reliability("bad-input")
def test_a_license_off_the_list_is_refused_unless_acknowledged(tmp_path, tiny_phi3_dir):
    source = local_source(tmp_path, license="CC-BY-NC-4.0")
    with pytest.raises(DataError, match="has license cc-by-nc-4.0, which data.licenses.allow does not list"):
        prepare_data(config(tmp_path, tiny_phi3_dir, [source]))
    cfg = config(tmp_path, tiny_phi3_dir, [{**source, "license_acknowledged": True}])
    prepare_data(cfg)
    report = json.loads(cfg.data_report.read_text(encoding="utf-8"))
    assert report["sources"][source["path"]] == {"license": ["cc-by-nc-4.0"], "revision": None, "acknowledged": True,
                                                 "purpose": "chat"}
    assert "| cc-by-nc-4.0 (acknowledged) | - | 10 |" in (cfg.reports_dir / "data.md").read_text(encoding="utf-8")


def test_a_hub_datasets_license_comes_from_its_card(tmp_path, tiny_phi3_dir):
    cfg = config(tmp_path, tiny_phi3_dir, [hub_source(tmp_path, "apache-2.0"), local_source(tmp_path, license="mit")],
                 allow=["Apache-2.0", "MIT"])
    prepare_data(cfg)
    md = (cfg.reports_dir / "data.md").read_text(encoding="utf-8")
    assert "repo[train] | apache-2.0 | main | 3 |" in md and "local.jsonl | mit | - | 10 |" in md


@pytest.mark.reliability("bad-input")
def test_a_card_that_disagrees_with_the_config_or_the_list_is_refused(tmp_path, tiny_phi3_dir):
    with pytest.raises(DataError, match="has license cc-by-nc-sa-4.0"):
        prepare_data(config(tmp_path, tiny_phi3_dir, [hub_source(tmp_path, "cc-by-nc-sa-4.0")]))
    with pytest.raises(DataError, match="config says license 'mit', the dataset card says apache-2.0"):
        prepare_data(config(tmp_path, tiny_phi3_dir, [hub_source(tmp_path, "apache-2.0", license="mit")]))
    cfg = config(tmp_path, tiny_phi3_dir, [hub_source(tmp_path, None, license="cc-by-4.0")])
    prepare_data(cfg)  # a card without a license: the config's
    [source] = json.loads(cfg.data_report.read_text(encoding="utf-8"))["sources"].values()
    assert source["license"] == ["cc-by-4.0"]


def test_without_an_allow_list_nothing_is_refused_and_the_report_says_unknown(tmp_path, tiny_phi3_dir):
    cfg = config(tmp_path, tiny_phi3_dir, [local_source(tmp_path)], allow=None)
    prepare_data(cfg)
    assert "| unknown | - | 10 |" in (cfg.reports_dir / "data.md").read_text(encoding="utf-8")


@pytest.mark.reliability("bad-input")
def test_through_make_data_a_noncommercial_card_is_refused_until_acknowledged(tmp_path, tiny_phi3_dir):
    """`make data` on a hub dataset whose card says cc-by-nc-4.0: exit 2 naming it, nothing prepared;
    with license_acknowledged it runs; a local source without a license is refused the same way."""
    def write(sources):
        data = {"train": sources, "validation_fraction": 0.0, "licenses": {"allow": ALLOW}}
        return write_config(tmp_path / "c.yaml", small_config(tiny_phi3_dir, tmp_path / "build", data=data))

    hub = hub_source(tmp_path, "cc-by-nc-4.0")
    proc = run_make(write([hub]), "data")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "has license cc-by-nc-4.0, which data.licenses.allow does not list" in out
    assert "Traceback" not in out and not (tmp_path / "build" / "t" / "data").exists()
    proc = run_make(write([local_source(tmp_path)]), "data")
    assert proc.returncode != 0 and "local.jsonl: has no known license" in proc.stdout + proc.stderr
    make(write([{**hub, "license_acknowledged": True}]), "data")
    md = (tmp_path / "build" / "t" / "reports" / "data.md").read_text(encoding="utf-8")
    assert "cc-by-nc-4.0 (acknowledged)" in md
