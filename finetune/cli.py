"""Shared plumbing of the launch/ scripts: user errors as one clear line, prompt-safe Hydra overrides."""
from __future__ import annotations

import functools
import re
import sys
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from finetune.config import ConfigError
from finetune.data.errors import DataError
from finetune.model import ModelConfigError
from finetune.model.generation import GenerationError
from finetune.model.hf_weights import CheckpointError
from finetune.model.tokenizer import TokenizerMismatchError

# Errors caused by what the user asked for (config, files, arguments): their messages already say the fix,
# so a traceback would only bury it. Add a project error class here when it is of that kind.
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    ModelConfigError,
    CheckpointError,
    DataError,
    TokenizerMismatchError,
    GenerationError,
)
USER_ERROR_EXIT_CODE = 2  # as argparse: the invocation was wrong

F = TypeVar("F", bound=Callable)


def run_cli(fn: F) -> F:
    """Decorate a script's main: a user error prints `<script>: error: <message>` to stderr and exits with 2.

    Place it under `@hydra.main`, so it runs inside Hydra's job; any other exception keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr, flush=True)
            sys.exit(USER_ERROR_EXIT_CODE)

    return wrapper  # type: ignore[return-value]


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
