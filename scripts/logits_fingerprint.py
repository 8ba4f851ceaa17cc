"""Print a fingerprint of the default model's logits with whatever libllama is loaded, capture off.

Recorded once with the unpatched llama-cpp-python 0.3.36 build into tests/data/logits_fingerprint.json
(`LLAMA_CPP_LIB_PATH=<unpatched build>/bin python scripts/logits_fingerprint.py > tests/data/...`), and
recomputed the same way whenever the pinned version moves; tests/test_fingerprint.py compares.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from conftest import PROMPT  # noqa: E402
from llama_cpp import llama_cpp as llama  # noqa: E402

from infmllm_gguf.model_files import default_model_path  # noqa: E402
from infmllm_gguf.runtime import Runtime  # noqa: E402

TOP = 50


def fingerprint() -> dict:
    with Runtime(default_model_path(), n_ctx=512, flash_attn=False, n_gpu_layers=0) as rt:
        tokens = rt.model.tokenize(PROMPT)
        rt.decode(tokens, range(len(tokens)), logits="all")
        rows = {i: rt.logits(i) for i in (0, len(tokens) // 2, len(tokens) - 1)}
    out = {"library": Path(llama._lib._name).name, "n_tokens": len(tokens), "rows": {}}
    for i, row in rows.items():
        top = np.argsort(-row)[:TOP]
        out["rows"][str(i)] = {"ids": top.tolist(), "logits": [float(row[t]) for t in top],
                               "sum": float(row.astype(np.float64).sum())}
    return out


if __name__ == "__main__":
    json.dump(fingerprint(), sys.stdout, indent=1)
    print()
