import pytest

from opsdl.model import load_model


@pytest.fixture(scope="session")
def tiny():
    """A random tiny Llama with the embedded SmolLM2 tokenizer."""
    model, tokenizer = load_model("tiny:llama", seed=0)
    return model, tokenizer
