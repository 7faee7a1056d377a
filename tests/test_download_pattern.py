"""README's download command: its --include pattern, through the pinned huggingface_hub's own filter
(fnmatchcase: case-sensitive on every platform), picks a Q4_K_M file whichever case its publisher wrote."""
import re
from pathlib import Path

from huggingface_hub.utils import filter_repo_objects

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_include_pattern_matches_both_cases_and_only_q4_k_m():
    pattern = re.search(r'hf download REPO --include "([^"]+)"', README.read_text(encoding="utf-8")).group(1)
    files = ["Mistral-7B-Instruct-v0.3.Q4_K_M.gguf", "qwen2.5-7b-instruct-q4_k_m.gguf",
             "Llama-3.2-3B-Instruct-Q4_K_S.gguf", "qwen2.5-7b-instruct-q5_k_m.gguf", "README.md"]
    assert list(filter_repo_objects(files, allow_patterns=[pattern])) == files[:2]
    assert list(filter_repo_objects(files, allow_patterns=["*Q4_K_M*"])) == files[:1]    # the old pattern
