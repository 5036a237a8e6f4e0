"""Every command in README.md and docs/*.md works as written: its config overrides compose and reach the typed
config, and every repository file it names exists. Also every relative link (and its #anchor) resolves.

Scans whatever pages are there, so a new docs page is checked as soon as it exists. Nothing is launched: the
overrides go through Hydra's compose API and the project's typed config (finetune.config).
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from finetune import config as typed
from finetune.cli import quote_free_text_overrides

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("**/*.md")])
SHELL_FENCES = ("bash", "sh", "shell", "console")
# Scripts and the config each composes; an sbatch script passes its arguments to launch/train.py.
CONFIG_OF_SCRIPT = {
    "launch/train.py": "train", "launch/plan.py": "plan", "launch/generate.py": "generate",
    "launch/evaluate.py": "evaluate", "launch/predict.py": "predict", "launch/export.py": "export",
    "launch/slurm/train.sbatch": "train", "launch/slurm/train_deepspeed_launcher.sbatch": "train",
}  # fmt: skip
FREE_TEXT_KEYS = {"generate": ["prompt"]}  # the script quotes these itself (finetune.cli.quote_free_text_overrides)
# Sections of the composed config and the dataclass that reads them.
SCHEMAS = {
    "task": typed.TaskConfig, "model": typed.ModelConfig, "data": typed.DataConfig, "trainer": typed.TrainerConfig,
    "optim": typed.OptimConfig, "scheduler": typed.SchedulerConfig, "deepspeed": typed.DeepSpeedSection,
    "lora": typed.LoraConfig, "logger": typed.LoggerConfig, "generation": typed.GenerationConfig,
    "sweep": typed.SweepConfig,
}  # fmt: skip
# Top-level names of the repository: a path starting with one of them must exist (others are the user's).
TRACKED_ROOTS = {p.name for p in REPO.iterdir() if p.name not in (".git", ".venv", "outputs", "multirun", "logs")}


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    tokens: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {' '.join(self.tokens)}"


def shell_commands(page: Path) -> list[Command]:
    """The commands of a page's shell code blocks: continuation lines joined, comments dropped, split at && ; |."""
    commands, fence, pending, start = [], None, "", 0
    for number, line in enumerate(page.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip().lower()
            continue
        if fence not in SHELL_FENCES:
            continue
        start = start or number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text, pending = pending + stripped, ""
        tokens = shlex.split(text, comments=True)
        current: list[str] = []
        for token in tokens + [";"]:
            if token in ("&&", ";", "|", "||"):
                if current:
                    commands.append(Command(str(page.relative_to(REPO)), start, tuple(current)))
                current = []
            else:
                current.append(token)
        start = 0
    return commands


COMMANDS = [command for page in PAGES for command in shell_commands(page)]


def script_and_overrides(command: Command) -> tuple[Optional[str], list[str]]:
    for position, token in enumerate(command.tokens):
        if token in CONFIG_OF_SCRIPT:
            args = [t for t in command.tokens[position + 1:] if "=" in t and not t.startswith("-")]
            return token, args
    return None, []


def config_commands() -> list[Command]:
    return [c for c in COMMANDS if script_and_overrides(c)[0] is not None]


def first_point_of_sweeps(overrides: list[str]) -> list[str]:
    """`optim.lr=1e-5,3e-5` (a multirun) -> `optim.lr=1e-05`: one point of the sweep is composed; an interval
    (Optuna's search space) by its low end, `tag(int, ...)` as an int."""
    parsed = OverridesParser.create().parse_overrides(overrides)

    def first(o: Any) -> str:
        if o.is_interval_sweep():
            return str(int(o.value().start) if "int" in o.value().tags else o.value().start)
        return next(iter(o.sweep_string_iterator()))

    return [f"{o.get_key_element()}={first(o)}" if o.is_sweep_override() else text
            for o, text in zip(parsed, overrides)]  # fmt: skip


def typed_value(cfg: Any, key: str) -> Any:
    """The value `key` has once its section went through the typed config (the dataclass the code reads)."""
    section, _, rest = key.partition(".")
    value: Any = typed.to_typed(SCHEMAS[section], cfg[section], section=section)
    for part in rest.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


def test_the_docs_have_commands_for_every_script():
    scripts = {script_and_overrides(c)[0] for c in COMMANDS}
    assert scripts >= {"launch/train.py", "launch/plan.py", "launch/generate.py", "launch/evaluate.py",
                       "launch/predict.py", "launch/export.py", "launch/slurm/train.sbatch"}  # fmt: skip
    assert len(config_commands()) >= 30  # the parser finds the commands at all


def test_readme_is_a_landing_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move details to docs/"
    readme = "\n".join(lines)
    for command in ("make demo", "make test", "task=clm", "task=cls", "task=qa"):
        assert command in readme


@pytest.mark.parametrize("command", config_commands(), ids=str)
def test_documented_command_composes_and_reaches_the_typed_config(command: Command):
    script, overrides = script_and_overrides(command)
    config_name = CONFIG_OF_SCRIPT[script]
    overrides = first_point_of_sweeps(quote_free_text_overrides(overrides, FREE_TEXT_KEYS.get(config_name, [])))
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    if config_name in ("train", "plan"):
        run = typed.parse_config(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
        typed.check_overrides_apply(run, overrides)
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element().lstrip("+~")
        section = key.split(".")[0]
        if override.is_delete() or section == "hydra" or "/" in key:
            continue
        if "." not in key:  # a group choice (task=cls) or a top-level key (prompt=..., checkpoint=...)
            if key == "task":
                assert typed_value(cfg, "task.name") == override.value(), command
            elif not (CONF / key).is_dir():
                assert OmegaConf.to_container(cfg)[key] == override.value(), command
            continue
        expected = override.value()
        actual = typed_value(cfg, key) if section in SCHEMAS else OmegaConf.select(cfg, key)
        if OmegaConf.is_config(actual):
            actual = OmegaConf.to_container(actual)
        assert actual == expected, f"{command}: {key} is {actual!r} in the typed config, the command says {expected!r}"


def repo_paths(command: Command) -> list[str]:
    """Tokens (and override values) that name a path inside the repository: launch/..., conf/..., ds_configs/..."""
    paths = []
    for token in command.tokens:
        value = token.partition("=")[2] if "=" in token and not token.startswith("-") else token
        for candidate in re.split(r"[,\[\]]", value):
            candidate = candidate.strip().strip("'\"")
            if "/" in candidate and candidate.split("/")[0] in TRACKED_ROOTS and "*" not in candidate:
                paths.append(candidate)
    return paths


@pytest.mark.parametrize("command", [c for c in COMMANDS if repo_paths(c)], ids=str)
def test_documented_command_names_existing_files(command: Command):
    missing = [path for path in repo_paths(command) if not (REPO / path).exists()]
    assert not missing, f"{command}: {missing} do not exist"


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a page: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)}: broken links {broken}"


# Inline code that looks like a config key but is Python or a file name.
NOT_CONFIG_KEYS = {"deepspeed.zero", "deepspeed.utils", "deepspeed.initialize", "deepspeed.ops", "model.safetensors"}


def prose_config_keys(page: Path) -> list[str]:
    """`section.key` (or `section.key=value`) in inline code outside code blocks, for the typed sections."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    keys = []
    for span in re.findall(r"`([^`\n]+)`", text):
        for word in span.split():
            match = re.match(r"\+?([a-z_]+)\.([a-z_0-9]+)", word)
            key = match and f"{match.group(1)}.{match.group(2)}"
            if match and match.group(1) in SCHEMAS and key not in NOT_CONFIG_KEYS:
                keys.append(key)
    return keys


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_config_keys_named_in_the_text_exist(page: Path):
    import dataclasses

    unknown = sorted({key for key in prose_config_keys(page)
                      if key.split(".")[1] not in {f.name for f in dataclasses.fields(SCHEMAS[key.split(".")[0]])}})
    assert not unknown, f"{page.relative_to(REPO)} names config keys that do not exist: {unknown}"
