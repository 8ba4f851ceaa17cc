"""A `Runtime`'s state for a save or a snapshot: llama.cpp's cells as bytes and the last logits.
A part of `Runtime` (its base class), which gives `ctx`, `model`, `n_ctx`, `logits`, `n_cached`
and `clear`."""
from __future__ import annotations

import ctypes

import numpy as np
from llama_cpp import llama_cpp as llama

from . import native

SEQ = 0  # the one sequence a Runtime decodes


class CellState:
    """The state methods of `Runtime`."""

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """The context's state for a save: llama.cpp's cells as bytes, and the last output's logits,
        which llama.cpp's state does not include.

        The cells are then loaded back, which packs them into the slots a restore gives them: where
        a cell lies changes the order of llama.cpp's sums, and this model family turns that rounding
        into logit differences of up to ~1. Packed alike, this context and a restored one continue
        with bit-identical logits."""
        buf = self._get_cells()
        arrays = {"cells": buf}
        if self._has_logits:
            arrays["last_logits"] = self.logits()
        reason = self._set_cells(buf)
        if reason is not None:
            raise RuntimeError(f"llama.cpp could not load back the cells it had just saved ({reason})")
        self._restored_logits = arrays.get("last_logits")
        return {"n_cells": self.n_cached()}, arrays

    def check_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Raise ValueError unless `state()`'s output could be loaded here (the bytes themselves are
        only checked by llama.cpp, in `load_state`)."""
        cells = arrays.get("cells")
        if cells is None or cells.dtype != np.uint8 or cells.ndim != 1:
            raise ValueError("the saved llama.cpp cells are missing or not a byte array")
        if not isinstance(meta.get("n_cells"), int) or not 0 <= meta["n_cells"] <= self.n_ctx:
            raise ValueError(f"the saved state holds {meta.get('n_cells')!r} cells; this context has {self.n_ctx}")
        logits = arrays.get("last_logits")
        if logits is not None and logits.shape != (self.model.n_vocab,):
            raise ValueError(f"saved logits have shape {logits.shape}, this model's vocabulary {self.model.n_vocab}")

    def load_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Load a checked state of a context of the same model and size. If llama.cpp refuses the
        bytes, or they hold another number of cells, the previous cells are put back and
        ValueError says why."""
        backup = self._get_cells()
        reason = self._set_cells(arrays["cells"])
        if reason is None and self.n_cached() != meta["n_cells"]:
            reason = f"they hold {self.n_cached()} cells, the saved state says {meta['n_cells']}"
        if reason is not None:
            self._set_cells(backup)
            raise ValueError(f"llama.cpp could not load the saved cells ({reason}): they were saved from another "
                             "model or context size")
        logits = arrays.get("last_logits")
        self._restored_logits = None if logits is None else logits.astype(np.float32)
        self._has_logits = logits is not None

    def _get_cells(self) -> np.ndarray:
        """llama.cpp's cells as bytes, pending position shifts applied."""
        self.apply_pending_shifts()
        size = llama.llama_state_get_size(self.ctx)
        buf = np.empty(size, dtype=np.uint8)
        written = llama.llama_state_get_data(self.ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size)
        if written != size:
            raise RuntimeError(f"llama_state_get_data wrote {written} of {size} bytes")
        return buf

    def _set_cells(self, data: np.ndarray) -> str | None:
        """Replace the cells with `data`; None, or why llama.cpp refused them."""
        data = np.ascontiguousarray(data, dtype=np.uint8)
        read = llama.llama_state_set_data(self.ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), data.size)
        if read != data.size:
            self.clear()
            return f"{read} of {data.size} bytes read"
        return None

    def sequence_bytes(self) -> int:
        """Bytes of the sequence's saved state (its cells' K and V rows, positions, a header)."""
        return llama.llama_state_seq_get_size(self.ctx, SEQ)

    def apply_pending_shifts(self) -> None:
        """Apply pending position shifts to the keys now. llama.cpp re-rotates shifted keys lazily, at
        the next decode, and its saved state would lose the pending shift."""
        native.llama_attn_capture_apply_shifts(self.ctx)
