"""Where raw examples come from: files (json/jsonl, csv, parquet, text), a hub dataset, or the bundled data.

`load_splits` returns the raw train and validation splits as `RawSplit`s, which remember their files so an
error found later in a row can name the file and row it came from.
"""
from __future__ import annotations

import csv
import glob
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import datasets
import numpy as np

from finetune.config import ConfigError, DataConfig
from finetune.data.errors import DataError

BUNDLED_DATA_DIR = Path(__file__).resolve().parent.parent / "assets" / "data"
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")
FORMAT_BY_EXTENSION = {
    ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet",
    ".txt": "text", ".text": "text", ".md": "text",
}  # fmt: skip
FORMATS = ("json", "csv", "parquet", "text")

# Reads a list of files of one format into one Dataset (the QA task wraps it to flatten SQuAD's nested layout).
Reader = Callable[[Sequence[str], str, DataConfig], datasets.Dataset]


@dataclass(frozen=True)
class RawSplit:
    """One split of raw examples plus what is needed to say where row `i` came from."""

    name: str  # train | validation
    dataset: datasets.Dataset
    source: str  # for messages: the files, or the hub dataset and split
    files: tuple[str, ...] = ()
    fmt: Optional[str] = None
    reader: Optional[Reader] = None
    cfg: Optional[DataConfig] = None
    # Position in `dataset` -> row of the concatenated files; None: the identity.
    row_map: Optional[tuple[int, ...]] = None

    def select(self, indices: Sequence[int]) -> "RawSplit":
        rows = tuple(self.row_map[i] for i in indices) if self.row_map is not None else tuple(indices)
        return replace(self, dataset=self.dataset.select(indices), row_map=rows)

    def locate(self, index: int) -> str:
        """'file F, row N' (1-based, counting records as read: lines of jsonl, data rows of csv, questions of SQuAD)."""
        row = self.row_map[index] if self.row_map is not None else index
        if len(self.files) == 1:
            return f"file {self.files[0]}, row {row + 1}"
        if self.files and self.reader is not None:
            # Error path only: count the rows of each file to find the one holding `row`.
            for path in self.files:
                count = len(self.reader([path], self.fmt, self.cfg))
                if row < count:
                    return f"file {path}, row {row + 1}"
                row -= count
        return f"{self.source}, row {row + 1}"


def resolve_files(spec: Any, *, key: str) -> list[str]:
    """Expand a path, a list of paths, a directory (recursively, known extensions) or a glob into sorted files."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    files: list[str] = []
    for item in specs:
        item = os.path.expanduser(str(item))
        if any(ch in item for ch in "*?["):
            matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        elif os.path.isdir(item):
            matches = sorted(
                str(p) for p in Path(item).rglob("*")
                if p.is_file() and not p.name.startswith(".") and _extension(str(p)) in FORMAT_BY_EXTENSION
            )  # fmt: skip
        elif os.path.isfile(item):
            matches = [item]
        else:
            raise DataError(f"data.{key}: {item!r} does not exist. Pass an existing file, directory or glob.")
        if not matches:
            raise DataError(
                f"data.{key}: {item!r} matches no data files (known extensions: "
                f"{', '.join(sorted(FORMAT_BY_EXTENSION))}). Check the path, or name the files explicitly."
            )
        files.extend(matches)
    return files


def detect_format(files: Sequence[str], explicit: Optional[str], *, key: str) -> str:
    """The datasets builder for `files`: `explicit` (data.format) or the one their extensions agree on."""
    if explicit is not None:
        if explicit not in FORMATS:
            raise ConfigError(f"data.format={explicit!r} is not one of {', '.join(FORMATS)}.")
        return explicit
    formats = {}
    for path in files:
        fmt = FORMAT_BY_EXTENSION.get(_extension(path))
        if fmt is None:
            raise DataError(
                f"data.{key}: cannot tell the format of {path} from its extension. Set data.format to one of "
                f"{', '.join(FORMATS)}, or rename it to .jsonl/.json/.csv/.parquet/.txt."
            )
        formats.setdefault(fmt, path)
    if len(formats) > 1:
        found = ", ".join(f"{fmt} ({path})" for fmt, path in formats.items())
        raise DataError(f"data.{key} mixes file formats: {found}. Use files of one format per split.")
    return next(iter(formats))


def read_files(files: Sequence[str], fmt: str, cfg: DataConfig, *, json_field: Optional[str] = None) -> datasets.Dataset:
    """Load `files` with datasets' builder for `fmt` (cached as Arrow under cfg.cache_dir)."""
    kwargs: dict[str, Any] = {}
    if fmt == "text":
        if cfg.text_unit not in ("line", "file"):
            raise ConfigError(f"data.text_unit={cfg.text_unit!r}: use 'line' (one document per line) or 'file'.")
        kwargs["sample_by"] = "document" if cfg.text_unit == "file" else "line"
    if json_field is not None:
        kwargs["field"] = json_field
    try:
        return datasets.load_dataset(fmt, data_files=list(files), split="train", cache_dir=cfg.cache_dir, **kwargs)
    except Exception as error:  # datasets wraps parser errors in several types; diagnose them ourselves
        raise DataError(_diagnose_unreadable(files, fmt, error)) from None


def load_splits(cfg: DataConfig, *, task: str, reader: Reader = read_files) -> tuple[RawSplit, Optional[RawSplit]]:
    """Raw train and validation splits per the config; validation is carved from train when it has no files."""
    if cfg.dataset_name is not None and cfg.train_file is not None:
        raise ConfigError("Set either data.dataset_name (a hub dataset) or data.train_file (local files), not both.")
    if cfg.dataset_name is not None:
        train, validation = _hub_splits(cfg)
    else:
        train_spec = cfg.train_file if cfg.train_file is not None else BUNDLED_DATA_DIR / task / "train.jsonl"
        validation_spec = cfg.validation_file
        if cfg.train_file is None and validation_spec is None:
            validation_spec = BUNDLED_DATA_DIR / task / "validation.jsonl"
        train = _file_split("train", train_spec, cfg, reader, key="train_file")
        validation = None
        if validation_spec is not None:
            validation = _file_split("validation", validation_spec, cfg, reader, key="validation_file")
    if validation is None and cfg.validation_fraction > 0:
        train, validation = _carve_validation(train, cfg)
    if cfg.max_train_samples is not None:
        train = train.select(range(min(cfg.max_train_samples, len(train.dataset))))
    if validation is not None and cfg.max_eval_samples is not None:
        validation = validation.select(range(min(cfg.max_eval_samples, len(validation.dataset))))
    return train, validation


def require_columns(split: RawSplit, columns: dict[str, str]) -> None:
    """Check that `split` has each column; `columns` maps column name -> the config key that names it."""
    present = split.dataset.column_names
    for column, key in columns.items():
        if column not in present:
            raise DataError(
                f"The {split.name} data ({split.source}) has no column {column!r} (set by data.{key}); its columns "
                f"are {present}. Rename the column in the data, or set data.{key} to the column to use."
            )


def require_rows(split: RawSplit) -> None:
    if len(split.dataset) == 0:
        raise DataError(f"The {split.name} data ({split.source}) is empty. Point the data config at non-empty files.")


def _file_split(name: str, spec: Any, cfg: DataConfig, reader: Reader, *, key: str) -> RawSplit:
    files = resolve_files(spec, key=key)
    fmt = detect_format(files, cfg.format, key=key)
    source = files[0] if len(files) == 1 else f"{len(files)} files: {files[0]} ... {files[-1]}"
    split = RawSplit(name, reader(files, fmt, cfg), source, tuple(files), fmt, reader, cfg)
    require_rows(split)
    return split


def _hub_splits(cfg: DataConfig) -> tuple[RawSplit, Optional[RawSplit]]:
    name = cfg.dataset_name if cfg.dataset_config is None else f"{cfg.dataset_name} ({cfg.dataset_config})"
    try:
        dataset_dict = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config, cache_dir=cfg.cache_dir)
    except (ConnectionError, FileNotFoundError, OSError) as error:
        raise DataError(
            f"data.dataset_name={cfg.dataset_name!r} could not be loaded from the Hugging Face hub ({error}). "
            "Offline, or without hub access, download the data and pass it as files with data.train_file "
            "(and data.validation_file) instead."
        ) from None
    if "train" not in dataset_dict:
        raise DataError(f"Hub dataset {name} has no 'train' split (splits: {list(dataset_dict)}).")
    train = RawSplit("train", dataset_dict["train"], f"hub dataset {name}, split train")
    require_rows(train)
    for split_name in ("validation", "valid", "dev", "test"):
        if split_name in dataset_dict and cfg.validation_file is None:
            return train, RawSplit("validation", dataset_dict[split_name], f"hub dataset {name}, split {split_name}")
    if cfg.validation_file is not None:
        return train, _file_split("validation", cfg.validation_file, cfg, read_files, key="validation_file")
    return train, None


def _carve_validation(train: RawSplit, cfg: DataConfig) -> tuple[RawSplit, Optional[RawSplit]]:
    """Hold out `validation_fraction` of train, chosen by `split_seed` (same on every rank and every run)."""
    if not 0 < cfg.validation_fraction < 1:
        raise ConfigError(f"data.validation_fraction={cfg.validation_fraction} must be in [0, 1).")
    n = len(train.dataset)
    held_out = int(round(n * cfg.validation_fraction))
    if held_out == 0 or held_out == n:
        return train, None
    order = np.random.default_rng(cfg.split_seed).permutation(n)
    validation_rows = sorted(order[:held_out].tolist())
    train_rows = sorted(order[held_out:].tolist())
    return train.select(train_rows), replace(train.select(validation_rows), name="validation")


def _extension(path: str) -> str:
    lower = path.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if lower.endswith(suffix):
            lower = lower[: -len(suffix)]
    return os.path.splitext(lower)[1]


def _diagnose_unreadable(files: Iterable[str], fmt: str, error: Exception) -> str:
    """Find the file and line that datasets could not parse; fall back to its own message."""
    for path in files:
        problem = _first_problem(path, fmt)
        if problem is not None:
            return f"Cannot read {path} as {fmt}: {problem}. Fix the file (or data.format, if it is not {fmt})."
    reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return f"Cannot read the {fmt} files {list(files)}: {reason}. Check that the files are valid {fmt}."


def _first_problem(path: str, fmt: str) -> Optional[str]:
    if _extension(path) != os.path.splitext(path.lower())[1]:
        return None  # compressed: leave the diagnosis to datasets' message
    try:
        if fmt == "json":
            return _json_problem(path)
        if fmt == "csv":
            return _csv_problem(path)
        if fmt == "text":
            Path(path).read_text(encoding="utf-8")
        if fmt == "parquet":
            import pyarrow.parquet as pq

            pq.read_metadata(path)
    except UnicodeDecodeError as error:
        return f"it is not UTF-8 text ({error})"
    except Exception as error:
        return str(error)
    return None


def _json_problem(path: str) -> Optional[str]:
    text = Path(path).read_text(encoding="utf-8")
    stripped = text.lstrip()
    if not stripped:
        return "the file is empty"
    if stripped.startswith("[") or (stripped.startswith("{") and path.lower().endswith(".json")):
        try:
            json.loads(text)
        except json.JSONDecodeError as error:
            return f"invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        return None
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            return f"line {line_number} is not valid JSON ({error.msg} at column {error.colno})"
        if not isinstance(record, dict):
            return f"line {line_number} is a JSON {type(record).__name__}, but each line must be an object"
    return None


def _csv_problem(path: str) -> Optional[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return "the file is empty (a header row is required)"
        for row in reader:
            if row and len(row) != len(header):
                return f"line {reader.line_num} has {len(row)} fields but the header has {len(header)}"
    return None
