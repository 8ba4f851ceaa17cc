# Vendored from llama-cpp-python 0.3.36 (https://github.com/abetlen/llama-cpp-python, the PyPI sdist
# llama_cpp_python-0.3.36.tar.gz, sha256 832db069...c1a2e), tests/test_llama.py: test_real_llama only.
# Copyright (c) 2023 Andrei Betlen, MIT License (LICENSE-llama-cpp-python.md beside this file).
#
# Changed for infmllm-gguf, each change marked "infmllm-gguf:" where it is:
# - `Llama` is infmllm_gguf's, over a bounded stream; llama_cpp still gives LlamaGrammar and
#   LogitsProcessorList;
# - the model fixture is the project's default model (SmolLM2-135M-Instruct Q4_1, installed by
#   `make setup`), not Qwen3.5-0.8B downloaded from the Hugging Face Hub;
# - one assertion on the exact text that model writes;
# - the imports that the rest of the original file needs (ctypes, itertools, numpy, scipy,
#   huggingface_hub, llama_cpp._internals) are left out with the rest of it.
"""llama-cpp-python's own test of its `Llama`, run against infmllm_gguf's."""
import multiprocessing

import pytest

import llama_cpp

from infmllm_gguf import Llama  # infmllm-gguf: was llama_cpp.Llama
from infmllm_gguf.model_files import default_model_path


@pytest.fixture
def llama_cpp_model_path():
    # infmllm-gguf: the default model on disk (was hf_hub_download("lmstudio-community/Qwen3.5-0.8B-GGUF",
    # "Qwen3.5-0.8B-Q8_0.gguf"))
    path = default_model_path()
    if not path.exists():
        pytest.fail(f"the default model is missing at {path}: run `make setup`")
    return str(path)


def test_real_llama(llama_cpp_model_path):
    model = Llama(  # infmllm-gguf: was llama_cpp.Llama
        llama_cpp_model_path,
        n_ctx=32,
        n_batch=32,
        n_ubatch=32,
        n_threads=multiprocessing.cpu_count(),
        n_threads_batch=multiprocessing.cpu_count(),
        logits_all=False,
        flash_attn=True,
    )

    output = model.create_completion(
        "The quick brown fox jumps over the lazy dog. The quick brown fox",
        max_tokens=6,
        top_k=50,
        top_p=0.9,
        temperature=0.0,
        seed=1337,
    )
    # infmllm-gguf: SmolLM2-135M's greedy text, as llama-cpp-python 0.3.36's own Llama writes it
    # with this model (was " jumps over the lazy dog.", Qwen3.5-0.8B's)
    assert output["choices"][0]["text"] == " is a classic example of a"

    output = model.create_completion(
        "The capital of france is paris, 'true' or 'false'?:\n",
        max_tokens=4,
        top_k=50,
        top_p=0.9,
        temperature=0.8,
        seed=1337,
        grammar=llama_cpp.LlamaGrammar.from_string("""
root ::= "true" | "false"
"""),
    )
    assert output["choices"][0]["text"] == "true"

    suffix = b"rot"
    tokens = model.tokenize(suffix, add_bos=True, special=True)

    def logit_processor_func(input_ids, logits):
        for token in tokens:
            logits[token] *= 1000
        return logits

    logit_processors = llama_cpp.LogitsProcessorList([logit_processor_func])

    output = model.create_completion(
        "The capital of france is par",
        max_tokens=4,
        top_k=50,
        top_p=0.9,
        temperature=0.8,
        seed=1337,
        logits_processor=logit_processors,
    )
    assert output["choices"][0]["text"].lower().startswith("rot")

    model.set_seed(1337)

    state = model.save_state()

    output = model.create_completion(
        "Pick a number from 1 to 10?:\n",
        max_tokens=4,
        top_k=50,
        top_p=0.9,
        temperature=1.0,
        grammar=llama_cpp.LlamaGrammar.from_string("""
root ::= "1" | "2" | "3" | "4" | "5" | "6" | "7" | "8" | "9" | "10"
"""),
    )
    number_1 = output["choices"][0]["text"]

    output = model.create_completion(
        "Pick a number from 1 to 10?:\n",
        max_tokens=4,
        top_k=50,
        top_p=0.9,
        temperature=1.0,
        grammar=llama_cpp.LlamaGrammar.from_string("""
root ::= "1" | "2" | "3" | "4" | "5" | "6" | "7" | "8" | "9" | "10"
"""),
    )
    number_2 = output["choices"][0]["text"]

    model.load_state(state)

    output = model.create_completion(
        "Pick a number from 1 to 10?:\n",
        max_tokens=4,
        top_k=50,
        top_p=0.9,
        temperature=1.0,
        grammar=llama_cpp.LlamaGrammar.from_string("""
root ::= "1" | "2" | "3" | "4" | "5" | "6" | "7" | "8" | "9" | "10"
"""),
    )
    number_3 = output["choices"][0]["text"]

    assert number_1 != number_2
    assert number_1 == number_3
