"""The server's counters and their Prometheus text (/metrics)."""
from __future__ import annotations

import copy
import threading


class Counters:
    """Named counters changed from several threads (the requests', the snapshots') and read by
    others: under a lock. `start`: each counter's name and first value."""

    def __init__(self, **start):
        self.lock = threading.Lock()
        self._values = start

    def add(self, **amounts) -> None:
        with self.lock:
            for name, amount in amounts.items():
                self._values[name] += amount

    def snapshot(self) -> dict:
        with self.lock:
            return copy.deepcopy(self._values)


class Metrics(Counters):
    """The server's counters (/metrics): requests by route, tokens, evictions, refusals, timeouts,
    what the memory tier re-read before prompts."""

    def __init__(self):
        super().__init__(requests={}, tokens_in=0, tokens_out=0, evictions=0, cells_evicted=0, refused=0, timeouts=0,
                         tokens_recalled=0, recall_s=0.0)

    def count(self, route: str) -> None:
        with self.lock:
            self._values["requests"][route] = self._values["requests"].get(route, 0) + 1


def disk_counters() -> Counters:
    """What the journal did, and what durability costs (seconds of the turn log's appends, of the snapshots)."""
    return Counters(saves=0, restores=0, replays=0, logged=0, log_s=0.0, snapshot_s=0.0)


#: each metric after infmllm_ and the value it shows: the server's counters (`Metrics`), then the
#: conversations' (`ConversationStore.stats`); "_total" ones are counters, the others gauges
SERVED = [("requests_refused_total", "refused"), ("requests_timed_out_total", "timeouts"),
          ("tokens_in_total", "tokens_in"), ("tokens_out_total", "tokens_out"), ("evictions_total", "evictions"),
          ("cells_evicted_total", "cells_evicted"), ("memory_tokens_recalled_total", "tokens_recalled"),
          ("memory_recall_seconds_total", "recall_s")]
STORED = [("memory_tokens_stored", "memory_tokens"), ("sessions_live", "sessions_live"),
          ("sessions_on_disk", "sessions_on_disk"), ("cells_cached", "cells_cached"),
          ("session_saves_total", "saves"), ("session_restores_total", "restores"),
          ("requests_replayed_total", "replays"), ("requests_logged_total", "logged"),
          ("request_log_seconds_total", "log_s"), ("snapshot_seconds_total", "snapshot_s")]


def prometheus_text(m: dict, st: dict, rss: float) -> str:
    """/metrics: the counters `m` (`Metrics.snapshot`), the conversations' `st`
    (`ConversationStore.stats`) and the resident MiB."""
    lines = ["# TYPE infmllm_requests_total counter"]
    lines += [f'infmllm_requests_total{{route="{k}"}} {v}' for k, v in sorted(m["requests"].items())]
    values = [(name, m[key] if key != "recall_s" else round(m[key], 6)) for name, key in SERVED]
    values += [(name, round(st.get(key, 0), 6) if key.endswith("_s") else st.get(key, 0)) for name, key in STORED]
    for name, value in values + [("resident_memory_mib", rss)]:
        lines += [f"# TYPE infmllm_{name} {'counter' if name.endswith('_total') else 'gauge'}", f"infmllm_{name} {value}"]
    return "\n".join(lines) + "\n"
