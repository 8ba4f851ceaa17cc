"""The server's counters and their Prometheus text (/metrics)."""
from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field, fields


@dataclass
class Metrics:
    """The server's counters, changed from request threads and read by /metrics: under a lock."""
    requests: dict = field(default_factory=dict)
    tokens_in: int = 0
    tokens_out: int = 0
    evictions: int = 0
    cells_evicted: int = 0
    refused: int = 0
    timeouts: int = 0
    tokens_recalled: int = 0   # re-read from the memory tier before prompts
    recall_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, route: str) -> None:
        with self.lock:
            self.requests[route] = self.requests.get(route, 0) + 1

    def add(self, **amounts) -> None:
        with self.lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def snapshot(self) -> dict:
        with self.lock:
            return {f.name: copy.copy(getattr(self, f.name)) for f in fields(self) if f.name != "lock"}


def prometheus_text(m: dict, st: dict, rss: float) -> str:
    """/metrics: the counters `m` (`Metrics.snapshot`), the conversations' `st`
    (`ConversationStore.stats`) and the resident MiB."""
    lines = ["# TYPE infmllm_requests_total counter"]
    lines += [f'infmllm_requests_total{{route="{k}"}} {v}' for k, v in sorted(m["requests"].items())]
    for name, kind, value in [
            ("infmllm_requests_refused_total", "counter", m["refused"]),
            ("infmllm_requests_timed_out_total", "counter", m["timeouts"]),
            ("infmllm_tokens_in_total", "counter", m["tokens_in"]),
            ("infmllm_tokens_out_total", "counter", m["tokens_out"]),
            ("infmllm_evictions_total", "counter", m["evictions"]),
            ("infmllm_cells_evicted_total", "counter", m["cells_evicted"]),
            ("infmllm_memory_tokens_recalled_total", "counter", m["tokens_recalled"]),
            ("infmllm_memory_recall_seconds_total", "counter", round(m["recall_s"], 6)),
            ("infmllm_memory_tokens_stored", "gauge", st.get("memory_tokens", 0)),
            ("infmllm_sessions_live", "gauge", st["sessions_live"]),
            ("infmllm_sessions_on_disk", "gauge", st["sessions_on_disk"]),
            ("infmllm_cells_cached", "gauge", st["cells_cached"]),
            ("infmllm_session_saves_total", "counter", st["saves"]),
            ("infmllm_session_restores_total", "counter", st["restores"]),
            ("infmllm_requests_replayed_total", "counter", st["replays"]),
            ("infmllm_requests_logged_total", "counter", st["logged"]),
            ("infmllm_request_log_seconds_total", "counter", round(st["log_s"], 6)),
            ("infmllm_snapshot_seconds_total", "counter", round(st["snapshot_s"], 6)),
            ("infmllm_resident_memory_mib", "gauge", rss)]:
        lines += [f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines) + "\n"
