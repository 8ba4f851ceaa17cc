import pytest

from infmllm_gguf.models import default_model_path

PROMPT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age "
          "of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season "
          "of Light, it was the season of Darkness, it was the spring of hope, it was the winter of despair.")


@pytest.fixture(scope="session")
def default_model():
    path = default_model_path()
    if not path.exists():
        pytest.fail(f"the default model is missing at {path}: run `make setup`")
    return path


@pytest.fixture(scope="session")
def synthetic_model(tmp_path_factory):
    """Random-weight GGUF models in the shapes of real ones (`infmllm_gguf.synthetic.SHAPES`), written
    once per session: `synthetic_model("llama-1b", "q4_0")` is the path of a 1.1B llama in Q4_0."""
    from infmllm_gguf.bench import synthetic_model as cached_model

    root = tmp_path_factory.mktemp("synthetic")
    return lambda shape="tiny-llama", dtype="q8_0": cached_model(shape, dtype, root)
