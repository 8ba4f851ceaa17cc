"""A stream with the layers on local rpc-servers behind byte-counting relays."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from ..policies import DEFAULT_POLICY, Policy, make_policy
from ..runtime import Model
from ..session import StreamSession
from .common import Rate, stream_tokens
from .stream import run_label


@dataclass(frozen=True)
class RpcBench:
    """A stream with the model's layers on local rpc-servers, through byte-counting relays."""
    model: str
    servers: int
    server_threads: int
    policy: dict
    tokens: int
    chunk: int
    repeats: int
    load_bytes_sent: int           # the weights, sent once when the model loads
    bytes_sent_per_token: Rate     # client to servers while streaming
    bytes_received_per_token: Rate
    local_tokens_per_s: Rate       # the same stream, the same process, no servers
    rpc_tokens_per_s: Rate
    max_abs_logit_diff: float      # last logits, rpc vs local

    def table(self) -> str:
        return "\n".join([
            f"rpc: {self.model}, layers on {self.servers} local rpc-servers ({self.server_threads} thread each), "
            f"{run_label(self.policy)}, {self.tokens} tokens in chunks of {self.chunk}, {self.repeats} repeats",
            f"  weights sent at load: {self.load_bytes_sent / 2**20:.1f} MiB",
            f"  per token streamed: sent {self.bytes_sent_per_token} bytes, received "
            f"{self.bytes_received_per_token} bytes (x {self.chunk} per chunk)",
            f"  tokens/s: local {self.local_tokens_per_s}, rpc {self.rpc_tokens_per_s}",
            f"  last logits, rpc vs local: max |diff| {self.max_abs_logit_diff:.3g}"])

    def to_json(self) -> dict:
        return asdict(self)


def rpc_bench(model=None, *, servers: int = 2, server_threads: int = 1, tokens: int = 2048, chunk: int = 256,
              repeats: int = 3, policy: Policy | None = None, n_threads: int | None = None) -> RpcBench:
    """Stream `tokens` Shakespeare tokens with `policy` (default: the default policy at budget 512)
    with the layers on `servers` rpc-servers started here, each behind a `CountingRelay`, and the
    same stream locally, alternately `repeats` times; bytes each way per streamed token."""
    from .rpc import RpcServers

    policy = policy or make_policy(DEFAULT_POLICY, budget=512)
    with RpcServers(servers, threads=server_threads, count=True) as rs, Model(model) as local:
        ids = stream_tokens(local, tokens, "shakespeare").tolist()
        with Model(model, rpc=rs.endpoints) as remote:
            load_sent = sum(r.counts()[0] for r in rs.relays)
            rates: dict[str, list[float]] = {"local": [], "rpc": [], "sent": [], "received": []}
            logits = {}
            for _ in range(repeats):
                for where, m in (("local", local), ("rpc", remote)):
                    with StreamSession(m, policy, chunk=chunk, n_threads=n_threads, memory=False) as s:
                        before = np.sum([r.counts() for r in rs.relays], axis=0)
                        t0 = time.perf_counter()
                        s.feed_tokens(ids)
                        logits[where] = s.runtime.logits()
                        rates[where].append(tokens / (time.perf_counter() - t0))
                        if where == "rpc":
                            sent, received = np.sum([r.counts() for r in rs.relays], axis=0) - before
                            rates["sent"].append(sent / tokens)
                            rates["received"].append(received / tokens)
            name = local.name
    return RpcBench(name, servers, server_threads, policy.config(), tokens, chunk, repeats, int(load_sent),
                    Rate.of(rates["sent"]), Rate.of(rates["received"]), Rate.of(rates["local"]), Rate.of(rates["rpc"]),
                    float(np.abs(logits["rpc"] - logits["local"]).max()))
