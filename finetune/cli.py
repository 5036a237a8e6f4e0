"""Shared plumbing of the launch/ scripts: the Hydra entry point, user errors as one paragraph printed once, and
prompt-safe Hydra overrides."""
from __future__ import annotations

import difflib
import functools
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, TypeVar

from finetune import distributed
from finetune.config import DATA_KEYS_BY_TASK

# Errors caused by what the user asked for (config, files, arguments): their messages already say the fix,
# so a traceback would only bury it. Add a project error class here when it is of that kind. Named, not
# imported: a module that was never imported raised nothing, and importing finetune.data (datasets, pandas)
# would cost every script 100 MB of memory and a second of start-up.
USER_ERRORS: tuple[tuple[str, str], ...] = (
    ("finetune.config", "ConfigError"),
    ("finetune.model.gptj", "ModelConfigError"),
    ("finetune.model.hf_weights", "CheckpointError"),
    ("finetune.data.errors", "DataError"),
    ("finetune.model.tokenizer", "TokenizerMismatchError"),
    ("finetune.model.generation", "GenerationError"),
    ("finetune.distributed", "RendezvousError"),
)
USER_ERROR_EXIT_CODE = 2  # as argparse: the invocation was wrong


def is_user_error(err: BaseException) -> bool:
    return any(module in sys.modules and isinstance(err, getattr(sys.modules[module], name))
               for module, name in USER_ERRORS)


F = TypeVar("F", bound=Callable)


def print_user_error(message: str) -> None:
    """`<script>: error: <message>` on stderr, once per launch: rank 0 prints an error every rank shares; a rank
    whose error is its own says so (`error (rank 3): ...`). See distributed.error_reporter."""
    who = distributed.error_reporter(message)
    if who is not None:
        tag = f" ({who})" if who else ""
        print(f"{Path(sys.argv[0]).name}: error{tag}: {message}", file=sys.stderr, flush=True)
    distributed.wait_for_error_reports()


def run_cli(fn: F) -> F:
    """Decorate a script's main: a user error prints `<script>: error: <message>` to stderr and exits with 2.

    Place it under `@hydra.main` (or use `hydra_app`), so it runs inside Hydra's job; any other exception keeps
    its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if not is_user_error(err):
                raise
            print_user_error(str(err))
            sys.exit(USER_ERROR_EXIT_CODE)

    return wrapper  # type: ignore[return-value]


Entry = Callable[[], None]  # a script's main: reads sys.argv, as @hydra.main does


def hydra_app(config_name: str, *, config_path: str = "../conf") -> Callable[[Callable[[Any], Any]], Entry]:
    """`@hydra.main` for the launch/ scripts, with the project's errors.

    Hydra's own errors (an unknown key, an unknown group option, an override it cannot parse) become one paragraph
    that names the override and suggests the closest valid keys or options, printed once, exit code 2, no
    traceback. User errors inside the script are handled as by `run_cli`. HYDRA_FULL_ERROR=1 restores Hydra's
    own reports.
    """
    import hydra

    def decorate(fn: Callable[[Any], Any]) -> Entry:
        conf_dir = (Path(inspect.getfile(fn)).resolve().parent / config_path).resolve()  # relative to the script
        task = hydra.main(version_base="1.3", config_path=str(conf_dir), config_name=config_name)(run_cli(fn))

        @functools.wraps(fn)
        def entry() -> None:
            from hydra.errors import HydraException

            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                return task()
            os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors instead of printing a report with a hint
            try:
                task()
            except HydraException as err:
                overrides = [arg for arg in sys.argv[1:] if not arg.startswith("-")]
                print_user_error(explain_hydra_error(err, conf_dir=conf_dir, config_name=config_name,
                                                     overrides=overrides))
                sys.exit(USER_ERROR_EXIT_CODE)
            finally:
                os.environ.pop("HYDRA_FULL_ERROR", None)

        return entry

    return decorate


# ------------------------------------------------------------------------------------------------ Hydra errors
SEE_CONFIG = "`--cfg job` after the script prints every key with its value"


def explain_hydra_error(err: Exception, *, conf_dir: Path, config_name: str, overrides: Sequence[str]) -> str:
    """Hydra's exception -> one paragraph naming the override, the closest valid keys or options, and the fix."""
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(err)
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and "/" in err.missing_cfg_file:
        group, option = err.missing_cfg_file.rsplit("/", 1)
        options = list(err.options or [])
        hint = _did_you_mean([f"{group}={o}" for o in difflib.get_close_matches(option, options, n=3)])
        return (f"{group}={option}: the config group '{group}' has no option '{option}'.{hint} "
                f"Options: {', '.join(options)}.")
    if isinstance(err, OverrideParseException):
        if "missing EQUAL" in text:
            return (f"The argument {err.override!r} has no value: write {err.override}=VALUE "
                    "(group=option or group.key=value).")
        return (f"Cannot read the override {err.override!r}: {_first_line(err.message)}. Overrides are "
                "group=option or group.key=value; quote a value holding spaces, commas, brackets or quotes: "
                "'key=a, b' or key='[a b]'.")
    key = getattr(err.__cause__, "full_key", None)
    if text.startswith("Could not override") and key:
        return _unknown_key(key, _override_of(key, overrides), conf_dir, config_name, overrides)
    match = re.search(r"An item is already at '([^']+)'", text)
    if match:
        key = match.group(1)
        override = _override_of(key, overrides) or f"+{key}=..."
        return f"{key} is already a config key: set it without the leading +, as {override.lstrip('+')}."
    match = re.search(r"Could not delete from config. '([^']+)' does not exist", text)
    if match:
        return _unknown_key(match.group(1), f"~{match.group(1)}", conf_dir, config_name, overrides)
    match = re.match(r"Ambiguous value for argument '([^=']+)=([^']*)'", text)
    if match:
        key, value = match.groups()
        return (f"{key}={value} is ambiguous: write {key}=[{value}] for a list, {key}='{value}' for a string, "
                "or add --multirun (-m) to sweep over the values.")
    return _one_paragraph(text)


def _unknown_key(key: str, override: Optional[str], conf_dir: Path, config_name: str,
                 overrides: Sequence[str]) -> str:
    """The message for a key the composed config does not have, with the closest keys that exist.

    `key` is the first missing part of the override's key (Hydra stops there): `trainr` for `trainr.max_steps=3`.
    """
    others = [o for o in overrides if o != override and not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    cfg = _compose_without(conf_dir, config_name, others)
    given = f" ({override})" if override else ""
    if cfg is None:
        return f"{key} is not a config key{given}. Check the spelling; {SEE_CONFIG}."
    keys = _dotted_keys(cfg)
    parent, _, leaf = key.rpartition(".")
    written, _, value = (override or f"{key}=...").lstrip("+~").partition("=")
    rest = written[len(key):]  # what the override has below the missing key (`.max_steps`)
    if not parent:  # a top-level name: a group (task=qa), a section (trainer.max_steps=3) or a key (prompt=...)
        groups = sorted(p.name for p in conf_dir.iterdir() if p.is_dir() and p.name not in ("hydra", "lr_for_model"))
        names = sorted(set(k for k in keys if "." not in k) | (set() if rest else set(groups)))
        hint = _did_you_mean([f"{name}{rest}={value}" for name in difflib.get_close_matches(leaf, names, n=2)])
        return (f"{key} is not a config group or section{given}.{hint} Sections: "
                f"{', '.join(sorted(set(k for k in keys if '.' not in k)))}; {SEE_CONFIG}.")
    node = _select(cfg, parent)
    siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent]
    if node is not None and hasattr(node, "keys") and not siblings:
        return f"{parent} is a free-form map: add keys to it with a leading +, as +{written}={value}."
    task = _select(cfg, "task.name")
    other_tasks = {}  # data keys of the other tasks: data.prompt_column is valid with task=clm only
    if parent == "data" and task in DATA_KEYS_BY_TASK:
        for name, task_keys in DATA_KEYS_BY_TASK.items():
            for data_key in task_keys:
                if data_key not in siblings:
                    other_tasks.setdefault(data_key, []).append(name)
    if leaf in other_tasks:
        owners = " and ".join(f"task={t}" for t in other_tasks[leaf])
        return f"{key} is a setting of {owners}, not of task={task}{given}: drop it, or choose that task."
    close = [f"{parent}.{s}" for s in difflib.get_close_matches(leaf, siblings + list(other_tasks), n=3)]
    close = [f"{c} (with task={'|'.join(other_tasks[c.rpartition('.')[2]])})"
             if c.rpartition(".")[2] in other_tasks else c for c in close]
    close += [k for k in keys if k.rpartition(".")[2] == leaf and k != key]  # trainer.lr -> optim.lr
    if close:
        listed = ""
    elif siblings:
        listed = f" The keys of {parent}: {', '.join(siblings)}."
    else:
        listed = f" {parent} holds no keys; {SEE_CONFIG}."
    return f"{key} is not a config key{given}.{_did_you_mean(close)}{listed}"


def _did_you_mean(candidates: Sequence[str]) -> str:
    if not candidates:
        return ""
    listed = candidates[0] if len(candidates) == 1 else f"{', '.join(candidates[:-1])} or {candidates[-1]}"
    return f" Did you mean {listed}?"


def _override_of(key: str, overrides: Sequence[str]) -> Optional[str]:
    """The override that sets `key`, or a key below it."""
    for override in overrides:
        written = override.partition("=")[0].lstrip("+~")
        if written == key or written.startswith(key + "."):
            return override
    return None


def _compose_without(conf_dir: Path, config_name: str, overrides: Sequence[str]) -> Any:
    """The config composed from the other overrides (or from none, when they fail too); None if even that fails."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    for attempt in (list(overrides), []):
        try:
            GlobalHydra.instance().clear()
            with initialize_config_dir(str(conf_dir), version_base="1.3"):
                return compose(config_name, overrides=attempt)
        except Exception:  # noqa: BLE001 -- a sweep or another bad override: try the plain config
            continue
    return None


def _dotted_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every key of the composed config as a dotted path (sections and leaves), without Hydra's own."""
    from omegaconf import DictConfig

    keys = []
    for name in cfg.keys():
        if not prefix and name == "hydra":
            continue
        path = f"{prefix}{name}"
        keys.append(path)
        value = cfg._get_node(name)
        if isinstance(value, DictConfig):
            keys += _dotted_keys(value, f"{path}.")
    return keys


def _select(cfg: Any, key: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0].rstrip(".") if text.strip() else text


def _one_paragraph(text: str) -> str:
    """Hydra's message without its links and search-path listing, as one paragraph."""
    text = text.split("\nConfig search path:")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("See https://")]
    return " ".join(lines)


# ------------------------------------------------------------------------------------------------ free text
def hydra_quote(value: str) -> str:
    """`value` as a single-quoted Hydra override value that arrives in the config unchanged.

    Escapes for both layers: OmegaConf's `${...}` interpolation, then Hydra's quoting (a backslash run
    before a quote or at the end is doubled, quotes get a backslash).
    """
    value = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    value = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value)
    return f"'{value}'"


def quote_free_text_overrides(argv: Iterable[str], keys: Iterable[str]) -> list[str]:
    """Quote the values of `key=value` arguments for free-text keys (e.g. `prompt`) that the user left unquoted.

    Hydra's override grammar reads commas as a sweep, `null` as None, `${...}` as interpolation; a prompt
    is plain text. Values already quoted or written as a list (`[...]`) are left to Hydra.
    """
    keys = set(keys)
    quoted = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") in keys and value[:1] not in ("'", '"', "["):
            arg = f"{key}={hydra_quote(value)}"
        quoted.append(arg)
    return quoted
