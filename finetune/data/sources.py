"""Where raw examples come from: files (json/jsonl, csv, parquet, text), a hub dataset, or the bundled data.

`load_splits` returns the raw train and validation splits as `RawSplit`s, which remember their files so an
error found later in a row can name the file and line it came from. Lines that cannot be parsed at all (a
JSON Lines line that is not a JSON object, a csv line with too many fields) stop the load, or with
`data.on_bad_row=skip` are left out of a cleaned copy of the file and recorded in `RawSplit.read_skips`.
"""
from __future__ import annotations

import csv
import functools
import glob
import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import datasets
import numpy as np

from finetune.config import ConfigError, DataConfig
from finetune.data.bad_rows import UNPARSEABLE, BadRow
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
    # Lines left out because they could not be parsed (data.on_bad_row=skip): (location, problem).
    read_skips: tuple[tuple[str, BadRow], ...] = ()

    def select(self, indices: Sequence[int]) -> "RawSplit":
        rows = tuple(self.row_map[i] for i in indices) if self.row_map is not None else tuple(indices)
        return replace(self, dataset=self.dataset.select(indices), row_map=rows)

    def locate(self, index: int) -> str:
        """Where row `index` came from: 'file F, line N' for JSON Lines and csv (the line its record starts on),
        'file F, row N' for other files (1-based: rows of parquet and text, questions of SQuAD JSON),
        '<hub dataset>, row N' for the hub. Error path only: it may scan the files."""
        row = self.row_map[index] if self.row_map is not None else index
        for position, path in enumerate(self.files):
            lines = record_lines(path, self.fmt)
            is_last = position == len(self.files) - 1
            count = len(lines) if lines is not None else None
            if count is None and not is_last and self.reader is not None:
                count = len(self.reader([path], self.fmt, self.cfg))
            if count is None or row < count:
                return f"file {path}, line {lines[row]}" if lines is not None else f"file {path}, row {row + 1}"
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


def record_lines(path: str, fmt: Optional[str]) -> Optional[list[int]]:
    """1-based line on which each record of a JSON Lines or csv file starts, as datasets reads them (blank and
    unparseable lines hold no record); None for other files. Cached per file version."""
    if fmt not in ("json", "csv") or _is_compressed(path) or (fmt == "json" and not _is_json_lines(path)):
        return None
    stat = os.stat(path)
    return list(_record_lines(path, fmt, stat.st_mtime_ns, stat.st_size))


def unparseable_lines(path: str, fmt: Optional[str]) -> list[tuple[int, int, str]]:
    """(first line, last line, problem) of each record of a JSON Lines or csv file that cannot be parsed."""
    if fmt not in ("json", "csv") or _is_compressed(path) or (fmt == "json" and not _is_json_lines(path)):
        return []
    return [(start, end, problem) for start, end, problem in _scan(path, fmt) if problem is not None]


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
    skipped: list[tuple[str, BadRow]] = []
    try:
        dataset = reader(files, fmt, cfg)
    except DataError:
        bad = {path: unparseable_lines(path, fmt) for path in files}
        if any(bad.values()) and cfg.on_bad_row != "skip":
            raise
        # Read cleaned copies instead; locations still name the original files (record_lines skips the same lines).
        # Blank JSON lines are dropped too: datasets' fallback for columns of mixed types fails on them.
        copied = [path for path in files if bad[path] or _has_blank_json_lines(path, fmt)]
        if not copied:
            raise
        readable = [_cleaned_copy(path, bad[path], cfg) if path in copied else path for path in files]
        dataset = reader(readable, fmt, cfg)
        skipped = [(f"file {path}, line {start}", BadRow("", UNPARSEABLE, problem))
                   for path in files for start, _, problem in bad[path]]  # fmt: skip
    split = RawSplit(name, dataset, source, tuple(files), fmt, reader, cfg, read_skips=tuple(skipped))
    require_rows(split)
    return split


def _cleaned_copy(path: str, bad: list[tuple[int, int, str]], cfg: DataConfig) -> str:
    """`path` without the `bad` line ranges, under the datasets cache (same name, so the format is unchanged).
    Named by the file's path, size and mtime: every rank and every rerun finds the one rank 0 wrote."""
    stat = os.stat(path)
    digest = hashlib.sha256(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(cfg.cache_dir or datasets.config.HF_DATASETS_CACHE) / "finetune_cleaned" / digest
    target = root / Path(path).name
    if not target.exists():
        dropped = {line for start, end, _ in bad for line in range(start, end + 1)}
        root.mkdir(parents=True, exist_ok=True)
        partial = root / f".{target.name}.{os.getpid()}.tmp"
        with (open(path, encoding="utf-8", newline="") as source,
              open(partial, "w", encoding="utf-8", newline="") as out):  # fmt: skip
            keep_blank = _extension(path) == ".csv"  # in csv, a blank line may belong to a quoted field
            out.writelines(line for number, line in enumerate(source, start=1)
                           if number not in dropped and (keep_blank or line.strip()))  # fmt: skip
        os.replace(partial, target)  # atomic: a reader never sees half a file
    if bad and record_lines(str(target), "csv" if _extension(path) == ".csv" else "json") == []:
        raise DataError(f"No line of {path} could be parsed ({bad[0][2]} at line {bad[0][0]}, ...). Fix the file.")
    return str(target)


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
    # Unparseable lines stay counted once, with train (their file's split).
    return train.select(train_rows), replace(train.select(validation_rows), name="validation", read_skips=())


def _is_compressed(path: str) -> bool:
    return _extension(path) != os.path.splitext(path.lower())[1]


def _is_json_lines(path: str) -> bool:
    """A .jsonl file, or a .json file whose first line is a whole JSON object (datasets reads both as lines)."""
    if path.lower().endswith(".jsonl"):
        return True
    with open(path, encoding="utf-8", errors="replace") as handle:
        first = next((line for line in handle if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _has_blank_json_lines(path: str, fmt: str) -> bool:
    if fmt != "json" or _is_compressed(path) or not _is_json_lines(path):
        return False
    with open(path, encoding="utf-8", errors="replace") as handle:
        return any(not line.strip() for line in handle)


@functools.lru_cache(maxsize=64)
def _record_lines(path: str, fmt: str, mtime_ns: int, size: int) -> tuple[int, ...]:  # stat: the cache key
    return tuple(start for start, _, problem in _scan(path, fmt) if problem is None)


def _scan(path: str, fmt: str) -> Iterable[tuple[int, int, Optional[str]]]:
    """(first line, last line, problem or None) of each record of a JSON Lines or csv file."""
    with open(path, encoding="utf-8", newline="" if fmt == "csv" else None) as handle:
        if fmt == "json":
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield number, number, _json_line_problem(line)
            return
        reader = csv.reader(handle)
        header = next(reader, None)
        end = reader.line_num
        for row in reader:
            start, end = end + 1, reader.line_num
            if row:  # blank lines hold no record (pandas skips them)
                too_many = len(row) > len(header)
                yield start, end, (f"the line has {len(row)} fields but the header has {len(header)}" if too_many
                                   else None)


def _json_line_problem(line: str) -> Optional[str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return f"the line is not valid JSON ({error.msg}, column {error.colno})"
    return None if isinstance(record, dict) else f"the line is a JSON {type(record).__name__}, not an object"


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
            skippable = len(unparseable_lines(path, fmt))
            if skippable:  # line-level damage: the rest of the file is usable
                many = f" ({skippable} lines cannot be parsed)" if skippable > 1 else ""
                return (f"Cannot read {path} as {fmt}: {problem}{many}. Fix the file, or set data.on_bad_row=skip "
                        "to drop unparseable lines (they are counted in the metrics).")
            return f"Cannot read {path} as {fmt}: {problem}. Fix the file (or data.format, if it is not {fmt})."
    reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return f"Cannot read the {fmt} files {list(files)}: {reason}. Check that the files are valid {fmt}."


def _first_problem(path: str, fmt: str) -> Optional[str]:
    if _is_compressed(path):
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
            return f"line {line_number} is not valid JSON ({error.msg}, column {error.colno})"
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
