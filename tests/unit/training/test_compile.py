"""trainer.compile: the config key, the toolchain check's one-paragraph errors, compiling the blocks in place, the
compile-time report, and Dynamo's guards: batches of other lengths (padded or packed, with activation
checkpointing) reuse the first step's graphs."""
from __future__ import annotations

import os

import pytest
import torch
from hydra import compose, initialize_config_dir

from finetune.config import ConfigError, parse_config
from finetune.model.gptj import GPTJBlock, GPTJConfig
from finetune.model.heads import GPTJForCausalLM
from finetune.training.compile import CompileWatch, check_toolchain, compile_blocks
from tests.unit.test_config_train import CONF


def trainer_compile(*overrides: str) -> bool:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return parse_config(compose("train", overrides=list(overrides))).trainer.compile


def test_compile_is_off_by_default_and_typed():
    assert trainer_compile() is False
    assert trainer_compile("trainer.compile=true") is True
    with pytest.raises(ConfigError, match=r"trainer\.compile"):
        trainer_compile("trainer.compile=fast")


def test_the_toolchain_of_this_machine_passes():
    check_toolchain("cpu")  # the project's CPU tests need g++ and Python's headers (docs/testing.md)


def assert_one_paragraph_naming_the_fix(err: pytest.ExceptionInfo) -> None:
    message = str(err.value)
    assert "\n" not in message and "trainer.compile=true" in message and "trainer.compile=false" in message


def test_a_missing_cpp_compiler_is_one_paragraph_naming_the_key_and_the_fix():
    from torch._inductor import config as inductor_config

    with inductor_config.patch({"cpp.cxx": (None, "no-such-cxx-for-finetune")}):
        with pytest.raises(ConfigError, match="no-such-cxx-for-finetune") as err:
            check_toolchain("cpu")
    assert "apt-get install g++" in str(err.value)
    assert_one_paragraph_naming_the_fix(err)


def test_missing_python_headers_are_refused(monkeypatch, tmp_path):
    import sysconfig

    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    with pytest.raises(ConfigError, match="python3-dev") as err:
        check_toolchain("cpu")
    assert_one_paragraph_naming_the_fix(err)


def test_a_gpu_without_triton_is_refused(monkeypatch):
    import torch.utils._triton as triton_probe

    monkeypatch.setattr(triton_probe, "has_triton", lambda: False)
    with pytest.raises(ConfigError, match="pip install triton") as err:
        check_toolchain("cuda")
    assert_one_paragraph_naming_the_fix(err)


def tiny_model(**overrides) -> GPTJForCausalLM:
    torch.manual_seed(0)
    return GPTJForCausalLM(GPTJConfig.preset("tiny", vocab_size=128, **overrides))


def test_blocks_compile_in_place_keeping_names():
    model = tiny_model(n_layer=3)
    names = list(model.state_dict())
    assert compile_blocks(model) == 3
    assert list(model.state_dict()) == names  # checkpoints, HF export and LoRA targets see the same modules
    blocks = [m for m in model.modules() if isinstance(m, GPTJBlock)]
    assert all(block._compiled_call_impl is not None for block in blocks)


def test_compile_time_is_reported_once_and_again_only_after_new_graphs():
    double = torch.compile(lambda x: x * 2, backend="eager", dynamic=True)
    watch = CompileWatch()
    records = []
    log = watch.reporting(lambda step, split, values: records.append((step, split, dict(values))), is_main=False)
    double(torch.ones(3))
    log(1, "train", {"loss": 1.0})
    double(torch.ones(5))  # another length: the same graph
    log(2, "train", {"loss": 0.9})
    log(2, "eval", {"loss": 0.8})
    double(torch.ones(3, 2))  # another number of dimensions: a new graph
    log(3, "train", {"loss": 0.7})
    first, second, evaluation, third = (values for _, _, values in records)
    assert first["compiles"] == 1 and first["compile_s"] >= 0 and first["loss"] == 1.0
    assert "compiles" not in second and "compiles" not in evaluation
    assert third["compiles"] == 2 and third["compile_s"] >= first["compile_s"]


def packed_batch(generator: torch.Generator, examples: int) -> dict:
    lengths = torch.randint(2, 24, (examples,), generator=generator).tolist()
    ids = torch.randint(0, 128, (1, sum(lengths)), generator=generator)
    return {"input_ids": ids, "labels": ids, "cu_seq_lens": torch.tensor([0, *lengths]).cumsum(0).int()}


def padded_batch(generator: torch.Generator, rows: int, width: int) -> dict:
    ids = torch.randint(0, 128, (rows, width), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, width // 2:] = 0  # one padded row: the 4-D mask path
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.mark.parametrize("checkpointing", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_batches_of_other_lengths_reuse_the_graphs(checkpointing):
    """Dynamo's guards (backend aot_eager: the graphs and guards of inductor, without building kernels; the
    integration tests build them): after one packed and one padded step, steps with other packed lengths and
    numbers of examples, other padded widths and micro batch sizes compile nothing new."""
    torch._dynamo.reset()  # no graphs from earlier tests: the warmup below compiles
    model = tiny_model()
    model.gradient_checkpointing_enable(checkpointing)
    compile_blocks(model, backend="aot_eager")
    generator = torch.Generator().manual_seed(1)
    warmup = [packed_batch(generator, 3), padded_batch(generator, 4, 17)]
    later = [packed_batch(generator, n) for n in (1, 2, 5, 9)] + [
        padded_batch(generator, rows, width) for rows, width in ((4, 9), (2, 33), (3, 64))]
    watch = CompileWatch()
    for batch in warmup:
        model(**batch).loss.backward()
    warm = watch.compiles
    assert warm >= 2
    for batch in later:
        model(**batch).loss.backward()
    assert watch.compiles == warm


def test_a_set_cpu_capability_gets_its_own_inductor_cache(monkeypatch):
    """Inductor's cache is not keyed on ATEN_CPU_CAPABILITY (a graph cached natively trained to NaN under avx2)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from finetune.training.compile import separate_cache_per_cpu_capability

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    separate_cache_per_cpu_capability()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == default_cache_dir() + "-avx2"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/chosen/by/user")
    separate_cache_per_cpu_capability()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/chosen/by/user"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    separate_cache_per_cpu_capability()  # native: inductor's own default
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
