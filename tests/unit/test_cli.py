"""finetune.cli: user errors and Hydra's own errors become one paragraph (with did-you-mean suggestions), printed
once, exit code 2; free-text overrides survive Hydra's grammar."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from finetune.cli import hydra_app, hydra_quote, quote_free_text_overrides, run_cli
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


# ------------------------------------------------------------------------------------------------ Hydra's errors
CONF = Path(__file__).resolve().parents[2] / "conf"
TRAIN = Path(__file__).resolve().parents[2] / "launch" / "train.py"


def hydra_error(monkeypatch, capsys, config_name: str, *argv: str) -> str:
    """Run a hydra_app on `argv`; it must exit with 2 and print one line (returned without the script name)."""
    @hydra_app(config_name, config_path=str(CONF))
    def main(cfg):
        raise AssertionError("the config composed; the override should have been refused")

    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "HYDRA_FULL_ERROR" not in err and "hydra.cc" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("train.py: error: ")
    assert os.environ.get("HYDRA_FULL_ERROR") is None  # restored
    return err.strip()[len("train.py: error: "):]


@pytest.mark.parametrize(("argv", "expected"), [
    (["data.prompt_colum=x"], "data.prompt_colum is not a config key (data.prompt_colum=x). Did you mean "
                              "data.prompt_column (with task=clm)"),
    (["task=clm", "data.prompt_colum=x"], "Did you mean data.prompt_column, "),
    (["trainer.max_step=3"], "trainer.max_step is not a config key (trainer.max_step=3). Did you mean "
                             "trainer.max_steps?"),
    (["trainer.lr=1e-4"], "Did you mean optim.lr?"),
    (["trainr.max_steps=3"], "trainr is not a config group or section (trainr.max_steps=3). Did you mean "
                             "trainer.max_steps=3?"),
    (["task=clm", "data.label_column=y"], "data.label_column is a setting of task=cls, not of task=clm"),
    (["model.overrides.n_layer=4"], "model.overrides is a free-form map: add keys to it with a leading +, as "
                                    "+model.overrides.n_layer=4."),
    (["+data.max_seq_len=64"], "data.max_seq_len is already a config key: set it without the leading +, as "
                               "data.max_seq_len=64."),
])
def test_unknown_keys_are_named_with_the_closest_valid_ones(monkeypatch, capsys, argv, expected):
    assert expected in hydra_error(monkeypatch, capsys, "train", *argv)


@pytest.mark.parametrize(("argv", "expected"), [
    (["task=qaa"], "task=qaa: the config group 'task' has no option 'qaa'. Did you mean task=qa? "
                   "Options: clm, cls, qa."),
    (["tsk=qa"], "tsk is not a config group or section (tsk=qa). Did you mean task=qa?"),
    (["deepspeed=zero4"], "Did you mean deepspeed=zero3 or deepspeed=zero2? Options: auto, none, zero2, zero3, "),
    (["experiment=tiny"], "Did you mean experiment=tiny_cpu?"),
])
def test_unknown_group_options_and_task_names_get_suggestions(monkeypatch, capsys, argv, expected):
    assert expected in hydra_error(monkeypatch, capsys, "train", *argv)


@pytest.mark.parametrize(("argv", "expected"), [
    (["trainer.max_steps=[1,"], "Cannot read the override 'trainer.max_steps=[1,': "),
    (["trainer.max_steps"], "The argument 'trainer.max_steps' has no value: write trainer.max_steps=VALUE"),
    (["trainer.max_steps=1,2"], "write trainer.max_steps=[1,2] for a list, trainer.max_steps='1,2' for a string, "
                                "or add --multirun (-m)"),
])
def test_bad_override_syntax_says_how_to_write_it(monkeypatch, capsys, argv, expected):
    assert expected in hydra_error(monkeypatch, capsys, "train", *argv)


def test_other_scripts_get_the_same_errors(monkeypatch, capsys):
    message = hydra_error(monkeypatch, capsys, "generate", "generation.temprature=0.5")
    assert message.startswith("generation.temprature is not a config key") and "generation.temperature" in message


def test_a_two_rank_launch_prints_a_config_error_once(tmp_path):
    """Each rank composes the same command line, fails the same way, and only rank 0 says so."""
    procs = [subprocess.Popen([sys.executable, str(TRAIN), "task=qaa", f"hydra.run.dir={tmp_path}"], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"})
             for rank in (0, 1)]  # fmt: skip
    (out0, err0), (out1, err1) = (proc.communicate(timeout=300) for proc in procs)
    assert [proc.returncode for proc in procs] == [2, 2]
    assert err0.strip() == ("train.py: error: task=qaa: the config group 'task' has no option 'qaa'. "
                            "Did you mean task=qa? Options: clm, cls, qa.")
    assert err1 == "" and out0 == out1 == ""


# User errors on two ranks of a real (gloo) process group, one case after the other; each rank prints its stderr
# lines of each case after a `case <name>` marker. ERRORS[case][rank]: the message it raises, or None (no error).
ERRORS = {"shared": ["data.x is wrong.", "data.x is wrong."], "own": [None, "file F is missing on this node."],
          "different": ["A is wrong.", "B is wrong."]}
REPORT_WORKER = """
import atexit, os, sys, time
from datetime import timedelta
import torch.distributed as dist
from finetune import distributed
from finetune.cli import run_cli
from finetune.config import ConfigError

distributed.ERROR_AGREE_WAIT = timedelta(seconds=3)
dist.init_process_group("gloo")
atexit.register(dist.destroy_process_group)
for case, errors in %r.items():
    os.environ["TORCHELASTIC_RESTART_COUNT"] = case  # as a restart would: its own keys in the store
    print(f"case {case}", file=sys.stderr, flush=True)

    @run_cli
    def main():
        if errors[dist.get_rank()] is None:
            time.sleep(4)  # rank 0 goes on (in a real run, into its next collective) and keeps serving the store
            return
        raise ConfigError(errors[dist.get_rank()])

    try:
        main()
    except SystemExit as exit:
        print(f"exit {exit.code}", file=sys.stderr, flush=True)
    dist.barrier()
""" % ERRORS


def test_user_errors_print_once_unless_a_rank_has_its_own():
    from tests.conftest import free_port

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", REPORT_WORKER], text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env={**env, "RANK": str(rank)})
             for rank in (0, 1)]  # fmt: skip
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    per_rank = [err.replace("-c: error", "prog: error").split("case ")[1:] for _, err in outputs]
    said = {case: [per_rank[rank][i].splitlines()[1:] for rank in (0, 1)] for i, case in enumerate(ERRORS)}
    assert said == {
        # the same error everywhere: rank 0 alone says it
        "shared": [["prog: error: data.x is wrong.", "exit 2"], ["exit 2"]],
        # only rank 1 failed: it says so itself, naming the rank
        "own": [[], ["prog: error (rank 1): file F is missing on this node.", "exit 2"]],
        "different": [["prog: error: A is wrong.", "exit 2"], ["prog: error (rank 1): B is wrong.", "exit 2"]],
    }, outputs
