"""Where the hidden ranking puts a paraphrased fact among a long stream's blocks: the offline probe
behind the layer and the dimensions that `memory/hidden.py` keeps (docs/METHOD.md).

    python scripts/hidden_probe.py MODEL.gguf [--tokens 200000] [--layers 6,8] [--dims 64,128,256,0] \\
        [--seeds 1] [--cache DIR] [--threads 2]

Puts the 16 facts of the recall benchmark's `paraphrase` kind at random places in Shakespeare's
text, reads every token's output of each layer through llama.cpp's eval callback (each 512-token
piece decoded in a fresh context after the 256 tokens before it), and the questions' (alone, after
the start token, as `HiddenStates.embed` decodes a prompt). For each layer and number of
dimensions (a Gaussian projection as the memory's, seed 0 its own, `--seeds` more; 0: all of the
layer's, unprojected; int8 codes as the memory keeps them), each fact's
32-token block is ranked by `maxsim` among the blocks of the stream up to 4k, 64k and 200k tokens
after the fact (the stream's first 64 tokens, the attention sink's, left out); prints how many of
the 16 rank in the top 3 (what the default reserve re-reads) and the top 10, the mean over the
projections with several seeds. The layer outputs are
kept in `--cache` (float16, 1.8 KB a token a layer for Qwen2.5-0.5B): a second run only ranks.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_cpp import llama_cpp as llama  # noqa: E402

from infmllm_gguf.data import shakespeare_path  # noqa: E402
from infmllm_gguf.memory.hidden import PREFIX, maxsim, quantize  # noqa: E402
from infmllm_gguf.memory.ranking import block_starts  # noqa: E402
from infmllm_gguf.recall.paraphrases import NUMBERS, PARAPHRASES  # noqa: E402
from infmllm_gguf.runtime import Model, Runtime  # noqa: E402
from infmllm_gguf.runtime.ggml import ggml_backend_tensor_get, ggml_get_name, tensor_shape  # noqa: E402

WINDOW, PIECE, CONTEXT, SINK = 32, 512, 256, 64
AFTER = (4096, 65536, 200_000)


def stream_with_facts(model: Model, n_tokens: int) -> tuple[list[int], list[tuple[int, int]], list[str]]:
    """Shakespeare's first `n_tokens` tokens with the 16 facts put in at random places: (tokens, each
    fact's token range, each fact's question as the recall benchmark asks it)."""
    text = shakespeare_path().read_text(encoding="utf-8")
    filler = model.tokenize(text[:n_tokens * 6], add_special=False)[:n_tokens]
    places = np.sort(np.random.default_rng(1).choice(np.arange(1000, n_tokens - 1000), len(PARAPHRASES), False))
    tokens, facts, questions, last = [], [], [], 0
    for (statement, question, prefix, values), at in zip(PARAPHRASES, places):
        tokens += filler[last:at]
        fact = model.tokenize(" " + statement.format(v="48213" if values == NUMBERS else values[0]) + " ",
                              add_special=False)
        facts.append((len(tokens), len(tokens) + len(fact)))
        questions.append(f"\n\nQuestion: {question}\nAnswer: {prefix}")
        tokens += fact
        last = at
    return tokens + filler[last:], facts, questions


class LayerReader:
    """A side context whose eval callback keeps the outputs of `layers` (the graph stops after the last)."""

    def __init__(self, model: Model, layers: list[int], threads: int):
        self.names = {f"{PREFIX}{il}".encode(): il for il in layers}
        self.last = f"{PREFIX}{max(layers)}".encode()
        self.rows: dict[int, list[np.ndarray]] = {il: [] for il in layers}
        self.callback = llama.ggml_backend_sched_eval_callback(self._see)
        self.runtime = Runtime(model, n_ctx=PIECE + CONTEXT + 1, n_batch=PIECE + CONTEXT + 1, n_threads=threads,
                               eval_callback=self.callback)
        self.start = model.bos_token if model.bos_token >= 0 else model.tokenize("\n", add_special=False)[0]

    def _see(self, tensor: int, ask: bool, _user) -> bool:
        name = ggml_get_name(tensor)
        if name not in self.names:
            return not ask
        if ask:
            return True
        _, ne = tensor_shape(tensor)
        data = np.empty((ne[1], ne[0]), dtype=np.float32)
        ggml_backend_tensor_get(tensor, data.ctypes.data, 0, data.nbytes)
        self.rows[self.names[name]].append(data)
        return name != self.last

    def read(self, tokens: list[int]) -> dict[int, np.ndarray]:
        """Each layer's output for `tokens`, decoded alone after the start token (whose row is dropped)."""
        for rows in self.rows.values():
            rows.clear()
        self.runtime.clear()
        self.runtime.decode([self.start] + tokens, logits="none")
        return {il: np.concatenate(rows)[1:] for il, rows in self.rows.items()}


def layer_outputs(reader: LayerReader, tokens: list[int], layers: list[int], n_embd: int) -> dict[int, np.ndarray]:
    out = {il: np.zeros((len(tokens), n_embd), np.float16) for il in layers}
    for a in range(0, len(tokens), PIECE):
        lo, b = max(0, a - CONTEXT), min(a + PIECE, len(tokens))
        for il, rows in reader.read(tokens[lo:b]).items():
            out[il][a:b] = rows[a - lo:]
        print(f"\r  layer outputs: {b:,}/{len(tokens):,} tokens", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return out


def rank_of_fact(query: np.ndarray, codes: np.ndarray, scales: np.ndarray, fact: tuple[int, int]) -> int:
    """How many blocks score above the best block that holds the whole fact."""
    starts = block_starts(len(codes), WINDOW)
    score = maxsim(query, codes, scales, starts, WINDOW)
    holding = (starts <= fact[0]) & (starts + WINDOW >= fact[1])
    return int(np.count_nonzero(score > score[holding].max()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--layers", default="6,8")
    parser.add_argument("--dims", default="64,128,256,0")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/infmllm-gguf/hidden-probe")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    layers, dims = [int(x) for x in args.layers.split(",")], [int(x) for x in args.dims.split(",")]
    model = Model(args.model)
    tokens, facts, questions = stream_with_facts(model, args.tokens)
    args.cache.mkdir(parents=True, exist_ok=True)
    paths = {il: args.cache / f"{Path(args.model).stem}-{len(tokens)}-layer{il}.npy" for il in layers}
    reader = LayerReader(model, layers, args.threads)
    missing = [il for il in layers if not paths[il].exists()]
    if missing:
        for il, rows in layer_outputs(reader, tokens, missing, model.n_embd).items():
            np.save(paths[il], rows)
    asked = [reader.read(model.tokenize(q, add_special=False)) for q in questions]
    print(f"{len(tokens):,} tokens, {len(facts)} facts; facts whose block ranks in the top 3 (top 10) among the "
          f"blocks of the stream up to {', '.join(f'{d:,}' for d in AFTER)} tokens after them")
    for il in layers:
        rows = np.load(paths[il]).astype(np.float32)
        rows[:SINK] = 0
        for d in dims:
            counts = np.zeros((args.seeds if d else 1, len(AFTER), 2))
            for seed in range(len(counts)):
                projection = (np.random.default_rng(seed).standard_normal((model.n_embd, d)) / np.sqrt(d)
                              if d else np.eye(model.n_embd)).astype(np.float32)
                codes, scales = quantize(rows @ projection)
                for j, after in enumerate(AFTER):
                    end = [min(b + after, len(codes)) for _, b in facts]
                    ranks = np.array([rank_of_fact(asked[i][il] @ projection, codes[:end[i]], scales[:end[i]], fact)
                                      for i, fact in enumerate(facts)])
                    counts[seed, j] = np.count_nonzero(ranks < 3), np.count_nonzero(ranks < 10)
            width = d or model.n_embd
            cells = "   ".join(f"{top3:4.1f} ({top10:4.1f})" for top3, top10 in counts.mean(axis=0))
            print(f"  layer {il:2d}, {width:3d} dimensions ({width + 2} bytes a token): {cells}", flush=True)


if __name__ == "__main__":
    main()
