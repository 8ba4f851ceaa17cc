"""The patched build with capture off computes what the unpatched pinned build computed.

tests/data/logits_fingerprint.json was recorded with an unpatched llama-cpp-python 0.3.36 build
(scripts/logits_fingerprint.py explains how to recompute it when the pin moves). On the machine
where it was recorded, the patched build reproduced it bit for bit; the tolerance below only
allows for a different CPU's SIMD rounding.
"""
import json
from pathlib import Path

import numpy as np
import pytest

FINGERPRINT = Path(__file__).parent / "data" / "logits_fingerprint.json"


@pytest.mark.usefixtures("default_model")
def test_logits_match_unpatched_fingerprint():
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from logits_fingerprint import fingerprint

    expected = json.loads(FINGERPRINT.read_text())
    got = fingerprint()
    assert got["n_tokens"] == expected["n_tokens"]
    for row, exp in expected["rows"].items():
        cur = got["rows"][row]
        assert cur["ids"][:10] == exp["ids"][:10], row
        np.testing.assert_allclose(cur["logits"], exp["logits"], atol=2e-3, err_msg=f"row {row}")
