"""`--task` from Hugging Face `datasets`: a save_to_disk directory (a Dataset, or a DatasetDict whose test split is
the held-out set) or a dataset repository's files trains and evaluates; a hub name that cannot be had offline says
what to download."""

import importlib.util
import json

import pytest

from r1lab.cli import main
from r1lab.rewards.tasks import DatasetError, get_task

pytestmark = pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="needs datasets")

ROWS = [{"question": f"What is {n}+1?", "answer": f"It is {n + 1}.\n#### {n + 1}"} for n in range(30)]


def test_a_saved_dataset_dict_keeps_its_test_split(tmp_path):
    import datasets

    saved = tmp_path / "gsm8k-like"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:24]),
                          "test": datasets.Dataset.from_list(ROWS[24:])}).save_to_disk(str(saved))
    task = get_task(str(saved))
    assert len(task.problems("train", 0)) == 24 and len(task.problems("test", 0)) == 6
    assert {p.answer for p in task.problems("test", 0)} == {str(n + 1) for n in range(24, 30)}


def test_a_saved_dataset_is_split_like_a_file_and_bad_rows_are_named(tmp_path):
    import datasets

    saved = tmp_path / "one"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(saved))
    task = get_task(str(saved))
    assert len(task.problems("all", 0)) == 30
    bad = tmp_path / "bad"
    datasets.Dataset.from_list([{"question": "1+1", "answer": "2"}, {"question": "", "answer": "3"}]).save_to_disk(str(bad))
    with pytest.raises(DatasetError, match=r"bad\[train\]:2: field 'question' is empty"):
        get_task(str(bad))


def test_a_dataset_repository_directory_is_read_with_its_splits(tmp_path):
    """The files of a dataset repository as `hf download --repo-type dataset` writes them: splits named by file, a
    configuration's folder (gsm8k's main/) picked by the subset option; a model directory is not taken for one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = tmp_path / "gsm8k"
    (repo / "main").mkdir(parents=True)
    for split, rows in (("train", ROWS[:24]), ("test", ROWS[24:])):
        pq.write_table(pa.Table.from_pylist(rows), repo / "main" / f"{split}-00000-of-00001.parquet")
    for subset in (None, "main"):
        task = get_task(str(repo), **({"subset": subset} if subset else {}))
        assert len(task.problems("train", 0)) == 24 and len(task.problems("test", 0)) == 6
    with pytest.raises(DatasetError, match=r"gsm8k: datasets.load_dataset could not read .* under socratic/"):
        get_task(str(repo), subset="socratic")
    from r1lab.rewards.tasks import is_data_source

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert not is_data_source(str(model))


def test_a_hub_name_offline_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(DatasetError, match="datasets.load_dataset\\('someone/not-cached'\\)"):
        get_task("someone/not-cached")


def test_a_datasets_directory_trains_and_evaluates_as_a_task(tiny_base, tmp_path):
    import datasets

    saved = tmp_path / "sums"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:24]),
                          "test": datasets.Dataset.from_list(ROWS[24:])}).save_to_disk(str(saved))
    run = tmp_path / "run"
    main(["grpo", "--model", str(tiny_base), "--task", str(saved), "--steps", "1", "--prompts-per-step", "2",
          "--samples-per-prompt", "2", "--max-new-tokens", "6", "--eval-every", "0", "--out", str(run),
          "--device", "cpu"])
    assert (run / "model" / "model.safetensors").exists()
    main(["eval", "--model", str(run / "model"), "--task", str(saved), "--problems", "0", "--samples", "2",
          "--max-new-tokens", "6", "--device", "cpu"])
    assert json.loads((run / "eval.json").read_text())["test"]["n_problems"] == 6


def test_sft_reads_a_datasets_source_as_it_reads_a_file(tmp_path):
    import datasets

    """`r1lab sft --data` takes what `--task` takes: a saved DatasetDict's train split, TRL's messages rows; a bad
    row is named SOURCE[train]:ROW."""
    from r1lab.train.sft_data import read_conversations

    chat = lambda q, a: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}  # noqa: E731
    saved = tmp_path / "chats"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([chat("1+1?", "2"), chat("2+2?", "4")]),
                          "test": datasets.Dataset.from_list([chat("3+3?", "6")])}).save_to_disk(str(saved))
    rows = read_conversations(saved)
    assert [r.messages[-1]["content"] for r in rows] == ["2", "4"] and [r.line for r in rows] == [1, 2]
    bad = tmp_path / "bad"
    datasets.Dataset.from_list([chat("1+1?", "2"), {"messages": [{"role": "user", "content": "q"}]}]).save_to_disk(
        str(bad))
    with pytest.raises(DatasetError, match=r"bad\[train\]:2: "):
        read_conversations(bad)
