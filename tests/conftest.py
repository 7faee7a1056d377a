import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")      # nothing in the lab may reach a hub at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

NOTEBOOK_RESULTS = []   # filled by test_notebooks.py, printed as a table at the end


def installed_or_skip(find, required: bool, what: str):
    """``find()``'s result (a program's path); where it is not installed, a skip — or a failure when
    ``required`` (CI, or the LABKIT_REQUIRE_* switch of :mod:`labkit.notebook`)."""
    from labkit.errors import EngineNotInstalledError
    try:
        return find()
    except EngineNotInstalledError as exc:
        if required:
            pytest.fail(f"CI requires {what}: {exc}")
        pytest.skip(f"{what} is not installed: {exc}")


@pytest.fixture(scope="session")
def smollm2_path():
    from labkit import models
    return models.get("smollm2")


def pytest_terminal_summary(terminalreporter):
    if NOTEBOOK_RESULTS:
        from labkit.runner import format_table, write_summary
        terminalreporter.section("notebook wall times (CPU tier)")
        terminalreporter.write_line(format_table(NOTEBOOK_RESULTS))
        write_summary(NOTEBOOK_RESULTS)


@pytest.fixture(scope="session")
def lora_adapter_gguf(tmp_path_factory):
    """A LoRA adapter GGUF for the bundled SmolLM2, made the way chapter 10 makes one: PEFT saves the
    adapter, llama.cpp's convert_lora_to_gguf.py converts it. Its weights are random (not the usual
    zero-initialised B), so applying it visibly changes the model's output. ~10 s."""

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from labkit import llama_tools, models
    folder = models.hf_folder("smollm2", dtype="float32")
    out = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(out / "adapter")
    llama_tools.convert_lora(out / "adapter", folder, out / "adapter.gguf", "f32")
    return out / "adapter.gguf"
