"""launch/generate.py as a user runs it: a subprocess with Hydra overrides, in a clean working directory."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune.config import GenerationConfig
from finetune.model import GPTJConfig, build_model
from finetune.model.generation import generate_text
from finetune.model.hf_weights import save_pretrained
from finetune.model.tokenizer import GPTJTokenizer

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "generate.py"
# The example of GPT-J's model card.
UNICORN = (
    "In a shocking finding, scientists discovered a herd of unicorns living in a remote, previously unexplored "
    "valley, in the Andes Mountains. Even more surprising to the researchers was the fact that the unicorns "
    "spoke perfect English."
)


def run_generate(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *overrides], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def new_token_counts(stderr: str) -> list[int]:
    line = next(l for l in stderr.splitlines() if l.startswith("[generate] new tokens per prompt:"))
    return [int(n) for n in line.split(":", 1)[1].split(";")[0].split(",")]


def test_model_card_example_on_random_tiny_model(tmp_path):
    result = run_generate(
        tmp_path, "model=tiny", f"prompt={UNICORN}", "generation.do_sample=true", "generation.temperature=0.9",
        "generation.max_length=100",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(UNICORN)  # commas and the apostrophe-free text passed through Hydra intact
    assert len(result.stdout.strip()) > len(UNICORN)
    # max_length counts the prompt: a random model rarely emits eos, and the seed makes this run fixed.
    prompt_tokens = len(GPTJTokenizer.from_pretrained(None).encode(UNICORN))
    assert new_token_counts(result.stderr) == [100 - prompt_tokens]
    assert list(tmp_path.iterdir()) == []  # no outputs/ or .hydra/ for this tool


def test_batch_of_prompts_with_max_new_tokens(tmp_path):
    # A list is Hydra syntax: quoted items keep their commas, `\${` escapes an interpolation.
    result = run_generate(tmp_path, "model=tiny", 'prompt=["Hello, world", "It costs \\${x}"]',
                          "generation.max_new_tokens=5")
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.split("-" * 80)
    assert first.startswith("Hello, world") and second.lstrip("\n").startswith("It costs ${x}")
    assert new_token_counts(result.stderr) == [5, 5]


def test_generates_from_a_saved_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model(GPTJConfig.preset("tiny", n_layer=1), task="clm").eval()
    tokenizer = GPTJTokenizer.from_pretrained(None)
    save_pretrained(model, tmp_path / "ckpt", config=model.config, task="clm", extra_writer=tokenizer.save_pretrained)
    prompt = "The capital of France is"
    expected = generate_text(model, tokenizer, [prompt], GenerationConfig(max_new_tokens=5))[0]

    result = run_generate(tmp_path, f"model.path={tmp_path / 'ckpt'}", f"prompt={prompt}",
                          "generation.max_new_tokens=5", "device=cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout == prompt + expected.text + "\n"


@pytest.mark.parametrize("override,expected_code,named", [
    ("generation.temprature=1", 2, "Did you mean generation.temperature?"),  # Hydra's error, made ours
    ("+generation.temprature=1", 2, "generation.temprature"),  # added anyway: the typed config refuses it
    ("generation.max_length=3", 2, "max_length"),
    ("model.dtype=float64", 2, "model.dtype"),
    ("model.path=/nonexistent/checkpoint", 2, "/nonexistent/checkpoint"),
])
def test_bad_settings_fail_with_a_short_message_and_no_traceback(tmp_path, override, expected_code, named):
    result = run_generate(tmp_path, "model=tiny", override, "generation.max_new_tokens=2")
    assert result.returncode != 0 and (expected_code is None or result.returncode == expected_code)
    assert "Traceback" not in result.stderr
    assert named in result.stderr
    if expected_code == 2:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout == ""
