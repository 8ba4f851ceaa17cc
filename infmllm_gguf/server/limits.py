"""What one request may ask of the server: its defaults are `serve`'s (kept apart from the request
bodies so that the command reads them without importing the web stack)."""
from __future__ import annotations

from dataclasses import dataclass

from ..generation import DEFAULTS

DEFAULT_MAX_TOKENS = DEFAULTS.max_tokens  # a reply's length when the request names none


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 4096               # tokens one reply may generate
    max_body_bytes: int = 16 * 2 ** 20   # a request's body, images (base64) included
    max_prompt_tokens: int = 16384       # tokens of new messages one request may feed
    timeout_s: float = 600.0             # seconds of work (a slot held) before the request is stopped
