"""finetune.cli: user errors become one line and exit code 2; free-text overrides survive Hydra's grammar."""
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from finetune.cli import hydra_quote, quote_free_text_overrides, run_cli
from finetune.config import ConfigError

TRICKY = [
    "In a shocking finding, scientists discovered a herd of unicorns. It's 'true', they said.",
    "null",
    "42",
    "[not a list]",
    "cost ${x} and \\${y}",
    "back\\slash \\' and trailing \\",
    "key=value",
    "  padded  ",
    "",
]


@pytest.mark.parametrize("text", TRICKY)
def test_quoted_value_reaches_the_config_unchanged(text):
    override = OverridesParser.create().parse_overrides([f"prompt={hydra_quote(text)}"])[0]
    cfg = OmegaConf.create({"prompt": None})
    cfg.prompt = override.value()
    assert cfg.prompt == text  # read back through OmegaConf, so `${` interpolation would have fired


def test_only_unquoted_free_text_keys_are_quoted():
    argv = ["prompt=a, b", "+prompt=c", "prompt='kept'", "prompt=[x,y]", "model=tiny", "generation.top_k=3"]
    assert quote_free_text_overrides(argv, keys=["prompt"]) == [
        "prompt='a, b'", "+prompt='c'", "prompt='kept'", "prompt=[x,y]", "model=tiny", "generation.top_k=3",
    ]


def test_run_cli_turns_user_errors_into_one_line_and_exit_code_2(capsys):
    @run_cli
    def main():
        raise ConfigError("generation.top_k must be >= 0; set it to 0 to disable.")

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("error: generation.top_k must be >= 0; set it to 0 to disable.")
    assert len(err.strip().splitlines()) == 1


def test_run_cli_leaves_bugs_with_their_traceback():
    @run_cli
    def main(value):
        return 1 / value

    assert main(2) == 0.5
    with pytest.raises(ZeroDivisionError):
        main(0)
