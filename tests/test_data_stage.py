"""`make data` as a stage of the DAG: its own stamp, what re-runs when, and real files through `make train`."""
from __future__ import annotations

import json

import pytest

from conftest import small_config, write_config
from makeutil import changed, make, snapshot, top
from test_data import write_sources

pytestmark = pytest.mark.slow

STEPS = {"train": {"steps": 2, "save_every": 2, "batch_size": 2}, "soul": {"warmup_steps": 0, "anneal_steps": 2}}


def announced(proc) -> set[str]:
    return {line.split("[", 1)[1].split("]", 1)[0] for line in proc.stdout.splitlines() if line.startswith("==> [")}


def test_user_files_of_every_format_train_through_make(tmp_path, tiny_phi3_dir):
    """ShareGPT, Alpaca (JSON and CSV), Parquet, a BOM file and one over-long example: make train."""
    from test_data import source_list

    files = write_sources(tmp_path / "in")
    long_file = tmp_path / "in" / "long.jsonl"
    long_file.write_text(json.dumps({"messages": [
        {"role": "user", "content": "とても長い質問です。" * 60}, {"role": "assistant", "content": "短い答え。"}]},
        ensure_ascii=False) + "\n", encoding="utf-8")
    sources = source_list(files) + [{"path": str(long_file), "format": "messages"}]
    config = write_config(tmp_path / "c.yaml", small_config(
        tiny_phi3_dir, tmp_path / "build", data={"train": sources, "max_length": 96, "validation_fraction": 0.0},
        **STEPS))
    proc = make(config, "train")
    assert announced(proc) == {"data", "train"}
    assert "over-long examples (data.max_length 96, data.overlong truncate_prompt): 0 truncated, 1 dropped" \
        in proc.stdout + proc.stderr
    run = tmp_path / "build" / "t"
    report = json.loads((run / "reports" / "data.json").read_text(encoding="utf-8"))
    assert sum(report["read"].values()) == 6 and report["kept"]["train"] == 6
    assert (run / "checkpoints" / "final" / "checkpoint.json").is_file()
    assert announced(make(config, "train")) == set()  # a second make does nothing


def test_a_pii_change_reruns_data_and_what_it_changes(tmp_path, tiny_phi3_dir):
    data = tmp_path / "d.jsonl"
    lines = [{"messages": [{"role": "user", "content": f"質問{i}"}, {"role": "assistant", "content": f"答え{i}です。"}]}
             for i in range(12)]
    lines[0]["messages"][1]["content"] = "担当は taro@example.jp です。"
    data.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")

    def config(**pii):
        return write_config(tmp_path / "c.yaml", small_config(
            tiny_phi3_dir, tmp_path / "build", data={"train": str(data), "validation_fraction": 0.2, "pii": pii},
            **STEPS))

    make(config(), "train")
    run = tmp_path / "build" / "t"
    before = snapshot(run)
    # A category that nothing in the data holds: data runs again, its output is the same, train does not.
    proc = make(config(ip_address="keep"), "train")
    assert announced(proc) == {"data"}
    assert top(changed(before, snapshot(run))) == {"stamps/data.stamp", "reports"}
    # e-mail addresses kept: the prepared data changes, so training runs again.
    proc = make(config(ip_address="keep", email="keep"), "train")
    assert announced(proc) == {"data", "train"}
    assert "taro@example.jp" in (run / "data" / "train.jsonl").read_text(encoding="utf-8") + \
        (run / "data" / "validation.jsonl").read_text(encoding="utf-8")


def test_appended_lines_keep_the_old_split(tmp_path, tiny_phi3_dir):
    data = tmp_path / "d.jsonl"

    def write(n):
        data.write_text("".join(json.dumps({"text": f"これは例文その{i}です。"}, ensure_ascii=False) + "\n"
                                for i in range(n)), encoding="utf-8")

    config = write_config(tmp_path / "c.yaml", small_config(
        tiny_phi3_dir, tmp_path / "build", data={"train": str(data), "validation_fraction": 0.25}))
    run = tmp_path / "build" / "t"

    def splits():
        return {s: {json.loads(x)["source"].rsplit(":", 1)[1] for x in (run / "data" / f"{s}.jsonl").read_text(
            encoding="utf-8").splitlines()} for s in ("train", "validation")}

    write(40)
    make(config, "data")
    old = splits()
    write(80)
    make(config, "data")
    new = splits()
    assert old["validation"] and old["validation"] <= new["validation"] and old["train"] <= new["train"]
    assert len(new["validation"]) > len(old["validation"])


def test_validation_loss_every_eval_every_steps(tmp_path, tiny_phi3_dir):
    from pipeline.config import load_config
    from pipeline.train import train

    cfg = load_config(write_config(tmp_path / "c.yaml", small_config(
        tiny_phi3_dir, tmp_path / "build", train={"steps": 5, "save_every": 5, "eval_every": 2},
        data={"validation_fraction": 0.2})))
    train(cfg)
    rows = [json.loads(x) for x in cfg.metrics_path.read_text(encoding="utf-8").splitlines()]
    evaluated = [r["step"] for r in rows if r["val_loss"] is not None]
    assert evaluated == [2, 4, 5] and all(0 < r["val_loss"] < 50 for r in rows if r["val_loss"] is not None)
