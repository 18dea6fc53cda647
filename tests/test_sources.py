"""Data sources (`lorakit.data.sources`): every file type read into rows that remember where
they came from."""

import pytest

from lorakit.data.pipeline import load_rows
from lorakit.errors import LorakitError
from lorakit.recipe import DatasetSpec
from tests.conftest import write_jsonl

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"messages": []}], "'messages' is empty"),
        ([{"messages": [{"role": "robot", "content": "x"}]}], "role 'robot'"),
        ([{"messages": [{"role": "user", "content": "x"}]}], "no assistant message"),
        ([{"messages": [{"role": "assistant", "content": 3}]}], "string 'content'"),
        ([{"instruction": "x", "output": ""}], "field 'output' is empty"),
        ([{"question": "x"}], "cannot tell the dataset format"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, rows, message):
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(LorakitError) as caught:
        load_rows([DatasetSpec(path=str(data))])
    assert str(caught.value).startswith(f"{data}:1")
    assert message in str(caught.value)


def test_empty_dataset_is_an_error(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    with pytest.raises(LorakitError, match="the dataset is empty"):
        load_rows([DatasetSpec(path=str(data))])


def test_csv_and_parquet_sources(tmp_path, tiny_model):
    import pandas as pd

    frame = pd.DataFrame({"instruction": ["Say hi.", "Say bye."], "output": ["hi", "bye"]})
    frame.to_csv(tmp_path / "rows.csv", index=False)
    frame.to_parquet(tmp_path / "rows.parquet")
    for name in ("rows.csv", "rows.parquet"):
        rows = load_rows([DatasetSpec(path=str(tmp_path / name))])
        assert [fmt for _, fmt in rows] == ["alpaca", "alpaca"]
        assert rows[1][0].data["output"] == "bye"
        where = f"{tmp_path / name}:3" if name.endswith(".csv") else f"{tmp_path / name}: row 2"
        assert rows[1][0].where == where


def test_json_arrow_saved_and_txt_folder_sources(tmp_path):
    import json

    from datasets import Dataset, DatasetDict

    rows = [
        {"instruction": "Say hi.", "output": "hi"},
        {"instruction": "Say bye.", "output": "bye"},
    ]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    table = Dataset.from_list(rows)
    table.save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": table, "test": table.select([1])}).save_to_disk(str(tmp_path / "dict"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("First document.")
    (docs / "sub" / "b.txt").write_text("Second document.")

    for spec in (
        DatasetSpec(path=str(tmp_path / "rows.json")),
        DatasetSpec(path=str(arrow)),
        DatasetSpec(path=str(tmp_path / "saved")),
        DatasetSpec(path=str(tmp_path / "dict")),
    ):
        loaded = load_rows([spec])
        assert [(r.data["output"], fmt) for r, fmt in loaded] == [
            ("hi", "alpaca"),
            ("bye", "alpaca"),
        ]
    test_split = load_rows([DatasetSpec(path=str(tmp_path / "dict"), split="test")])
    assert [r.data["output"] for r, _ in test_split] == ["bye"]
    with pytest.raises(LorakitError, match="no split 'valid' \\(it has train, test\\)"):
        load_rows([DatasetSpec(path=str(tmp_path / "dict"), split="valid")])
    texts = load_rows([DatasetSpec(path=str(docs))])
    assert [(r.data["text"], fmt) for r, fmt in texts] == [
        ("First document.", "text"),
        ("Second document.", "text"),
    ]


def test_hub_id_offline_is_one_clear_error(monkeypatch):
    import datasets
    import huggingface_hub

    # As with HF_HUB_OFFLINE=1 set before the libraries load (no network retries).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(LorakitError) as caught:
        load_rows([DatasetSpec(path="someone/some-dataset")])
    assert str(caught.value).startswith(
        "someone/some-dataset: cannot load the hub dataset (offline, or not a dataset id?): "
    )
    assert "\n" not in str(caught.value)
