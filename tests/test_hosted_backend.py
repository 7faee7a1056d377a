"""Chapter 09's optional hosted backend: read from the environment, skipped when no key is set."""
import pytest

from labkit.router import Backend


def test_no_key_means_no_hosted_backend():
    assert Backend.hosted({}) is None
    assert Backend.hosted({"OPENAI_API_KEY": "  ", "OPENAI_BASE_URL": "https://example.com/v1"}) is None


def test_defaults_are_openai_and_the_backend_is_remote():
    b = Backend.hosted({"OPENAI_API_KEY": "sk-test"})
    assert (b.name, b.base_url, b.model, b.api_key) == ("hosted", "https://api.openai.com", "gpt-4o-mini", "sk-test")
    assert b.remote and b.health_path == "/v1/models"


def test_another_provider_from_its_base_url_and_model():
    b = Backend.hosted({"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "https://api.example.org/openai/v1/",
                        "OPENAI_MODEL": "llama-3.1-8b"}, name="provider", timeout=5)
    assert (b.name, b.base_url, b.model, b.timeout) == ("provider", "https://api.example.org/openai", "llama-3.1-8b", 5)


@pytest.mark.parametrize("url", ["https://api.example.org/v1beta/openai", "api.openai.com/v1", "ftp://h/v1"])
def test_a_base_url_the_router_cannot_use_is_refused_with_what_to_do(url):
    with pytest.raises(ValueError, match="ending in /v1"):
        Backend.hosted({"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": url})
