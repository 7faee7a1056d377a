"""labkit.modelfile: Ollama's Modelfile format (docs/modelfile.mdx), parsed strictly."""
import pytest

from labkit.modelfile import ModelfileError, coerce_parameter, format_parameters, parse, render

FULL = '''# a pirate
from smollm2:135m
Parameter temperature 0.2
PARAMETER num_ctx 2048
PARAMETER stop "<|im_end|>"
PARAMETER stop "User:"
PARAMETER use_mmap true
SYSTEM """You are a pirate.
Answer in one sentence."""
TEMPLATE """{{ if .System }}{{ .System }}{{ end }}
{{ .Prompt }}"""
MESSAGE user Is Toronto in Canada?
MESSAGE assistant "Arr, aye."
LICENSE """
Apache-2.0
"""
'''


def test_full_modelfile():
    mf = parse(FULL)
    assert mf.from_ == "smollm2:135m" and mf.from_line == 2
    assert mf.parameters == {"temperature": 0.2, "num_ctx": 2048, "stop": ["<|im_end|>", "User:"], "use_mmap": True}
    assert mf.system == "You are a pirate.\nAnswer in one sentence."
    assert mf.template == "{{ if .System }}{{ .System }}{{ end }}\n{{ .Prompt }}"
    assert mf.messages == [{"role": "user", "content": "Is Toronto in Canada?"},
                           {"role": "assistant", "content": "Arr, aye."}]
    assert mf.license == ["Apache-2.0\n"]
    req = mf.to_request()
    assert req["from"] == "smollm2:135m" and req["parameters"]["stop"] == ["<|im_end|>", "User:"]


def test_round_trip_through_render():
    mf = parse(FULL)
    again = parse(render(from_=mf.from_, system=mf.system, template=mf.template, parameters=mf.parameters,
                         messages=mf.messages, license=mf.license, header="# generated\n"))
    assert again.to_request() == mf.to_request() and again.messages == mf.messages


def test_paths_quotes_and_escapes():
    mf = parse('FROM ./models/my model.gguf\nSYSTEM "Say \\"hi\\" twice"')
    assert mf.from_ == "./models/my model.gguf" and mf.system == 'Say "hi" twice'
    assert parse('FROM x\nSYSTEM """one line"""').system == "one line"
    assert parse("FROM\tx").from_ == "x"


@pytest.mark.parametrize("text, line, words", [
    ("FROM x\nFORM y", 2, "unknown instruction 'FORM' (did you mean FROM?)"),
    ("FROM x\n\n# c\nPARAMETER temprature 1", 4, "unknown parameter 'temprature' (did you mean temperature?)"),
    ("FROM x\nPARAMETER temperature hot", 2, "temperature expects a number, got 'hot'"),
    ("FROM x\nPARAMETER num_ctx 4k", 2, "num_ctx expects an integer"),
    ("FROM x\nPARAMETER use_mmap maybe", 2, "true or false"),
    ("FROM x\nPARAMETER seed", 2, "has no value"),
    ('FROM x\nSYSTEM """never closed\nmore', 2, 'unterminated """'),
    ('FROM x\nSYSTEM "open', 2, "unterminated quoted string"),
    ("FROM x\nMESSAGE robot hello", 2, "MESSAGE role must be one of"),
    ("FROM x\nFROM y", 2, "a second FROM (the first is on line 1)"),
    ("PARAMETER temperature 1", 0, "no FROM line"),
    ("FROM", 1, "FROM needs a model name"),
])
def test_errors_name_the_line(text, line, words):
    with pytest.raises(ModelfileError) as info:
        parse(text)
    assert info.value.line == line and words in str(info.value)
    if line:
        assert str(info.value).startswith(f"line {line}: ")


def test_coerce_and_format():
    assert coerce_parameter("TOP_K", "40") == 40 and coerce_parameter("top_p", 1) == 1.0
    assert coerce_parameter("stop", "x") == ["x"]
    with pytest.raises(ModelfileError):
        coerce_parameter("temperature", True)
    with pytest.raises(ModelfileError):
        coerce_parameter("num_predict", 1.5)
    text = format_parameters({"stop": ["a", "b"], "temperature": 0.5})
    assert text.splitlines()[0].startswith("stop") and '"a"' in text and "temperature" in text.splitlines()[-1]


def test_not_text():
    with pytest.raises(ModelfileError, match="text"):
        parse(b"FROM x")
