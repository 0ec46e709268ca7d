"""`--task` from Hugging Face `datasets`: a directory written by `save_to_disk` (read with `load_from_disk`), a
dataset repository's files as the hub serves them (`hf download --repo-type dataset NAME --local-dir DIR`: data
files whose names give their splits, read with `load_dataset(DIR)`), or a hub dataset name such as `openai/gsm8k`
(read with `load_dataset`, from the local cache when offline). The rows then go through the same checks as a data
file's, named `SOURCE[split]:ROW`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

from r1lab.rewards.tasks.base import DatasetError

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as the hub spells repository ids
SAVED_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
# a repository's data files (at its top or two folders down: data/, main/, data/main/), in the formats the hub
# converts datasets to or serves them in; not .json, which a model directory (config.json) has too
REPOSITORY_FILES = ("*.parquet", "*.jsonl", "*.csv", "*.arrow")
TRAIN_SPLITS, TEST_SPLITS = ("train",), ("test", "validation")


def is_datasets_source(spec: str) -> bool:
    """A save_to_disk directory, a dataset repository's directory, or (where no such path exists) a hub name."""
    path = Path(spec)
    if path.is_dir():
        return is_saved(path) or any(next(path.glob(level + files), None)
                                     for level in ("", "*/", "*/*/") for files in REPOSITORY_FILES)
    return bool(HUB_NAME.match(spec)) and not path.exists()


def is_saved(path: Path) -> bool:
    return any((path / marker).exists() for marker in SAVED_MARKERS)


def load_splits(spec: str, subset: str | None = None) -> dict[str, Any]:
    """The dataset's splits by name ({"train": dataset} for a single saved Dataset). In a repository's directory,
    subset is the folder of the configuration's files (gsm8k's main/), as the hub lays them out."""
    try:
        import datasets
    except ImportError:
        raise DatasetError("--task names a Hugging Face dataset, which needs the datasets package: "
                           "pip install 'r1lab[datasets]'") from None
    local = Path(spec).is_dir()
    if local and is_saved(Path(spec)):
        loaded = datasets.load_from_disk(spec)
    else:
        try:
            loaded = datasets.load_dataset(spec, data_dir=subset) if local else datasets.load_dataset(spec, subset)
        except Exception as err:  # noqa: BLE001 - offline, unknown name, gated, unreadable: one line saying why
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise DatasetError(_unreadable(spec, subset, reason, local)) from None
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


def _unreadable(spec: str, subset: str | None, reason: str, local: bool) -> str:
    if local:
        return (f"{spec}: datasets.load_dataset could not read this directory's data files"
                f"{f' under {subset}/' if subset else ''} ({reason})")
    return (f"{spec}: no such local path, and it could not be loaded as a hub dataset ({reason}). Without a "
            f"connection it must already be in the datasets cache: download it where there is one (python -c "
            f"\"import datasets; datasets.load_dataset('{spec}'{', ' + repr(subset) if subset else ''})\"), or "
            f"save it with save_to_disk and pass that directory")


def pick_splits(splits: dict[str, Any], spec: str) -> tuple[Any, Any | None, str, str | None]:
    """(train rows, test rows or None, their split names): "train" (or the only split) trains; "test" or
    "validation", where there is one, is the held-out set."""
    train_name = next((n for n in TRAIN_SPLITS if n in splits), None)
    if train_name is None:
        if len(splits) != 1:
            raise DatasetError(f"{spec}: no 'train' split among {', '.join(splits)}: save the one to train on as "
                               "'train'")
        train_name = next(iter(splits))
    test_name = next((n for n in TEST_SPLITS if n in splits and n != train_name), None)
    return splits[train_name], splits[test_name] if test_name else None, train_name, test_name


def dataset_rows(dataset: Any) -> Iterator[tuple[int, Any, str | None]]:
    """(row number from 1, row, None) for each row, as a data file's reader yields them."""
    return ((number, dict(row), None) for number, row in enumerate(dataset, 1))
