"""Any GGUF a learner points at: split into parts (as Qwen publishes its larger quants), in a folder
whose name has spaces and Japanese, and too big for free memory before an expensive step."""
import shutil

import pytest

import labkit
from labkit import gguf, hardware, memory, models
from labkit.errors import CorruptModelError, InsufficientMemoryError

try:
    from labkit import llama_tools
    GGUF_SPLIT = llama_tools.program("llama-gguf-split")
except Exception:  # noqa: BLE001  (not built here: the split tests skip)
    GGUF_SPLIT = None
needs_split_tool = pytest.mark.skipif(GGUF_SPLIT is None, reason="llama-gguf-split is not built (make setup builds it)")


@pytest.fixture(scope="module")
def split_model(tmp_path_factory, smollm2_path):
    """The bundled model split by llama.cpp's own tool into parts of at most 80 tensors."""
    out = tmp_path_factory.mktemp("split")
    llama_tools.run("llama-gguf-split", "--split", "--split-max-tensors", "80", smollm2_path, out / "smollm2")
    parts = sorted(out.glob("smollm2-*-of-*.gguf"))
    assert len(parts) == 4, parts
    return parts


@needs_split_tool
def test_split_model_reads_as_one_model(split_model, smollm2_path):
    whole = gguf.read_header(smollm2_path)
    for part in split_model:           # any part gives the whole model
        h = gguf.read_header(part)
        assert h.parts == [str(p) for p in split_model]
        assert len(h.tensors) == len(whole.tensors) and h.tensor_bytes == whole.tensor_bytes
        assert h.n_parameters == whole.n_parameters and h.architecture == whole.architecture
    assert models.get(split_model[2]) == split_model[0].resolve()       # engines load from part 1
    import dataclasses
    split_cfg, whole_cfg = memory.from_gguf(split_model[0]), memory.from_gguf(smollm2_path)
    assert dataclasses.replace(split_cfg, source=whole_cfg.source) == whole_cfg      # same facts, another file
    assert split_cfg.kv_cache_bytes(4096) == whole_cfg.kv_cache_bytes(4096)


@needs_split_tool
def test_split_model_runs_in_the_engines(split_model, smollm2_path):
    from llama_cpp import Llama
    kw = {"n_ctx": 256, "n_threads": 2, "verbose": False}
    prompt = "The capital of France is"
    whole = Llama(model_path=str(smollm2_path), **kw).create_completion(prompt, max_tokens=8, temperature=0)
    split = Llama(model_path=str(models.get(split_model[1])), **kw).create_completion(prompt, max_tokens=8, temperature=0)
    assert split["choices"][0]["text"] == whole["choices"][0]["text"]
    with labkit.serve("llama-server", split_model[1]) as srv:       # served under the model's name, not a part's
        assert srv.model == "smollm2" and [m.id for m in srv.openai().models.list().data] == ["smollm2"]
        reply = srv.openai().completions.create(model=srv.model, prompt=prompt, max_tokens=8, temperature=0)
        assert reply.choices[0].text == whole["choices"][0]["text"]


@pytest.mark.full      # a split model end to end, with the split-model chapter runs: make test-full
@needs_split_tool
def test_split_model_dequantizes_to_the_same_file_as_the_whole(split_model, smollm2_path, tmp_path):
    """to_float (the first step of chapter 01's ladder, and of chapter 03's draft model) reads every part:
    the same tensors, the same values, the same metadata as from the unsplit file, and no split keys."""
    from gguf import GGUFReader
    whole = GGUFReader(str(gguf.to_float(smollm2_path, tmp_path / "whole.gguf")))
    split = GGUFReader(str(gguf.to_float(split_model[1], tmp_path / "split.gguf")))
    assert [t.name for t in split.tensors] == [t.name for t in whole.tensors]
    assert all((a.data == b.data).all() for a, b in zip(split.tensors, whole.tensors))
    assert [k for k in split.fields if k.startswith("split.")] == []
    assert {k: v.contents() for k, v in split.fields.items() if not k.startswith("GGUF.")} == \
           {k: v.contents() for k, v in whole.fields.items() if not k.startswith("GGUF.")}


@needs_split_tool
def test_missing_or_foreign_part_is_named(split_model, tmp_path):
    gap = tmp_path / "gap"
    gap.mkdir()
    for p in split_model[:1] + split_model[2:]:          # part 2 of 4 missing
        shutil.copy(p, gap / p.name)
    with pytest.raises(CorruptModelError, match=r"smollm2-00002-of-00004\.gguf is missing") as err:
        models.get(gap / split_model[0].name)
    assert "Download every part" in str(err.value)
    mixed = tmp_path / "mixed"                            # a part renamed into another slot
    mixed.mkdir()
    for i, p in enumerate(split_model):
        shutil.copy(split_model[1] if i == 2 else p, mixed / p.name)
    with pytest.raises(CorruptModelError, match="says it is part 2 of 4, but its name makes it part 3"):
        gguf.read_header(mixed / split_model[0].name)


@pytest.mark.full     # make test-full also runs chapters 00 and 03 from a Japanese folder in make test
def test_paths_with_spaces_and_japanese(tmp_path, smollm2_path):
    from llama_cpp import Llama
    folder = tmp_path / "モデル フォルダ" / "my models"
    folder.mkdir(parents=True)
    path = folder / "スモール LM.gguf"
    shutil.copy(smollm2_path, path)
    assert models.get(path) == path.resolve() and gguf.read_header(path).architecture == "llama"
    llm = Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)
    assert llm.create_completion("Hello, my name is", max_tokens=4)["usage"]["completion_tokens"] > 0
    engines = ["llama.cpp", "ollama"] + (["llama-server"] if GGUF_SPLIT else [])
    for engine in engines:
        with labkit.serve(engine, path) as srv:
            reply = srv.openai().chat.completions.create(model=srv.model, max_tokens=4,
                                                         messages=[{"role": "user", "content": "Hi"}])
            assert reply.usage.completion_tokens > 0, engine


def test_expensive_steps_refuse_a_model_too_big_for_free_memory(monkeypatch, tmp_path, smollm2_path):
    monkeypatch.setattr(hardware, "_memory", lambda: (24.0, 0.1))        # 100 MiB free
    with pytest.raises(InsufficientMemoryError, match=r"needs about 0\.\d GiB of RAM, but only 0\.1 GiB is free"):
        gguf.to_float(smollm2_path, tmp_path / "f16.gguf", "f16")
    assert not list(tmp_path.iterdir())                                 # nothing half-done
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(InsufficientMemoryError, match="dtype='bfloat16'"):
        models.hf_folder(smollm2_path, dtype="float32")


@needs_split_tool
@pytest.mark.notebook
@pytest.mark.full      # chapters 00 and 03 a second time, on a split model: make test-full
@pytest.mark.engine
@pytest.mark.parametrize("number", ["00", "03"])
def test_chapter_runs_on_a_split_model_in_a_japanese_folder(number, split_model, tmp_path):
    """The whole of chapter 00 (hardware, model facts from the file, first chat in-process and through a
    server, what fits) and of chapter 03 (llama.cpp in-process and its native programs: server, bench,
    quantize, perplexity), pointed at part 2 of a split copy whose folder name has Japanese and spaces."""
    from labkit import runner
    folder = tmp_path / "日本語 モデル" / "split parts"
    folder.mkdir(parents=True)
    for part in split_model:
        shutil.copy(part, folder / part.name)
    chapter = next(p for p in runner.discover() if p.stem.startswith(number))
    result = runner.execute(chapter, tier="ci", out_dir=tmp_path / "build", html=False,
                            parameters={"model": str(folder / split_model[1].name)})
    assert result.ok, result.error


@pytest.fixture(scope="module")
def f16_model(tmp_path_factory, smollm2_path):
    """The bundled model dequantized to F16 (the source llama-quantize needs for a fresh preset)."""
    return gguf.ladder(smollm2_path, [], cache=tmp_path_factory.mktemp("f16"))["F16"]


@pytest.mark.full          # a chapter run per preset: make test-full
@pytest.mark.engine
@pytest.mark.notebook
@needs_split_tool          # llama-gguf-split stands for llama.cpp's programs, llama-quantize among them
@pytest.mark.parametrize("preset", ["Q4_K_S", "IQ4_XS", "IQ3_XS", "MXFP4_MOE"])
def test_chapter_00_runs_on_a_preset_without_a_nominal_rule(preset, f16_model, tmp_path):
    """A learner's first download is often Q4_K_S or an IQ file: chapter 00 measures its bits per weight from
    the tensors, shows llama.cpp's published average where there is one ("unknown preset" for MXFP4_MOE), and
    its checks hold."""
    from labkit import runner
    path = llama_tools.quantize(f16_model, tmp_path / f"smollm2-{preset}.gguf", preset)
    assert gguf.file_type_name(path) == preset
    known = memory.preset_average(preset) is not None
    assert known == (preset != "MXFP4_MOE")
    result = runner.execute(runner.discover()[0], tier="ci", out_dir=tmp_path / "build", html=False,
                            parameters={"model": str(path)})
    assert result.ok, result.error
    said = result.output.read_text(encoding="utf-8")
    assert ("llama.cpp's published average" in said) == known and (f"{preset}: unknown preset" in said) != known
