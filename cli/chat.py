"""`infmllm-gguf chat`: a conversation in a KV cache of fixed size, with images and video."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional, TextIO

import typer

from infmllm_gguf.generation import DEFAULTS

from .common import MODEL_ARG, NGL_OPT, POLICY_NAMES, app, fail, with_backend_options, with_memory_options, with_policy_options

HELP = """\
/image PATH                 show the model an image (a user turn of its own)
/video PATH [--fps F] [--max-frames N] [--start S] [--end S]
                            stream a video's frames (or a GIF's, or a directory of images),
                            a timestamp before each, evicting as it goes
/stats                      cache occupancy, evictions, tokens seen
/reset                      forget the conversation
/save PATH                  save the stream and the cache state
/load PATH                  continue a saved session (with the settings it was saved with)
/help                       this list
/quit                       leave (end of input too)
Any other line is your message."""


class CommandError(ValueError):
    """A slash command that cannot run as typed."""


class _VideoArgs(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would exit the whole program
        raise CommandError(f"/video: {message} (usage: /video PATH [--fps F] [--max-frames N] [--start S] [--end S])")


VIDEO_ARGS = _VideoArgs(prog="/video", add_help=False)
VIDEO_ARGS.add_argument("path")
VIDEO_ARGS.add_argument("--fps", type=float, default=1.0)
VIDEO_ARGS.add_argument("--max-frames", type=int)
VIDEO_ARGS.add_argument("--start", type=float)
VIDEO_ARGS.add_argument("--end", type=float)


def cache_figures(session) -> dict:
    return {"budget": session.policy.budget, **asdict(session.stats)}


class Repl:
    """Reads lines, runs slash commands, chats; each input line gives one result object (a turn's
    reply, a command's outcome or an error), printed as text or, with `as_json`, as one JSON line."""

    def __init__(self, session, restore: Callable[[Path], object], *, system: Optional[str], sampling: dict,
                 as_json: bool, out: TextIO, progress: bool):
        self.session, self.restore = session, restore
        self.system, self.sampling = system, sampling
        self.as_json, self.out, self.progress = as_json, out, progress
        self.turn = 0

    def close(self) -> None:
        self.session.close()

    # -- one line ---------------------------------------------------------------------------
    def handle(self, line: str) -> bool:
        """Run one input line; False once the user quits."""
        line = line.strip()
        if not line:
            return True
        try:
            if line.startswith("/"):
                return self.command(line)
            self.message(line)
        except (ValueError, OSError, RuntimeError) as exc:  # a bad file, a full cache: the session goes on
            self.emit({"input": line, "error": str(exc)}, f"error: {exc}", err=True)
        return True

    def emit(self, obj: dict, text: str, *, err: bool = False) -> None:
        if self.as_json:
            self.out.write(json.dumps(obj) + "\n")
        else:
            (sys.stderr if err else self.out).write(text + "\n")
        self.out.flush()

    def message(self, text: str) -> None:
        self.turn += 1
        pieces = self.session.chat_stream(text, system=self.system, **self.sampling)
        if self.as_json:
            reply = "".join(pieces)
            self.emit({"turn": self.turn, "user": text, "reply": reply, "cache": cache_figures(self.session)}, "")
            return
        for piece in pieces:  # streamed as sampled
            self.out.write(piece)
            self.out.flush()
        self.out.write("\n")

    def command(self, line: str) -> bool:
        try:
            name, *args = shlex.split(line)
        except ValueError as exc:
            raise CommandError(f"cannot parse {line!r}: {exc}") from None
        s = self.session
        if name == "/quit":
            return False
        if name == "/help":
            self.emit({"command": "help", "help": HELP}, HELP)
        elif name == "/stats":
            f = cache_figures(s)
            self.emit({"command": "stats", "cache": f},
                      f"cache {f['cells_cached']}/{f['budget']} cells (peak {f['peak_cells']}), "
                      f"{f['tokens_seen']} tokens seen, {f['cells_evicted']} evicted in {f['evictions']} evictions; "
                      f"image tokens: {f['image_tokens_seen']} seen, {f['image_cells_cached']} cached, "
                      f"{f['image_cells_evicted']} evicted")
        elif name == "/reset":
            s.reset()
            self.turn = 0
            self.emit({"command": "reset"}, "conversation forgotten; the cache is empty")
        elif name in ("/image", "/video") and s.projector is None:
            raise CommandError(f"{name} needs a vision projector: start chat with --mmproj PATH")
        elif name in ("/image", "/save", "/load"):
            if len(args) != 1:
                raise CommandError(f"{name} takes one PATH (quote it if it has spaces)")
            getattr(self, name[1:])(Path(args[0]).expanduser())
        elif name == "/video":
            self.video(VIDEO_ARGS.parse_args(args))
        else:
            raise CommandError(f"unknown command {name}; /help lists the commands")
        return True

    # -- commands ---------------------------------------------------------------------------
    def image(self, path: Path) -> None:
        from infmllm_gguf.multimodal import load_image

        n = self.session.chat_media([load_image(path)], system=self.system)
        f = cache_figures(self.session)
        self.emit({"command": "image", "path": str(path), "image_tokens": n, "cache": f},
                  f"[image {path.name}: {n} tokens; cache {f['cells_cached']}/{f['budget']} cells]")

    def video(self, a: argparse.Namespace) -> None:
        parts = self.session.video_parts(a.path, fps=a.fps, max_frames=a.max_frames, start=a.start, end=a.end,
                                   progress=self.progress)
        n = self.session.chat_media(parts, system=self.system)
        f = cache_figures(self.session)
        self.emit({"command": "video", "path": a.path, "frames": parts.frames, "image_tokens": n, "cache": f},
                  f"[video {Path(a.path).name}: {parts.frames} frames, {n} image tokens; cache "
                  f"{f['cells_cached']}/{f['budget']} cells, {f['cells_evicted']} evicted so far]")

    def save(self, path: Path) -> None:
        self.session.save(path)
        self.emit({"command": "save", "path": str(path)}, f"saved to {path}")

    def load(self, path: Path) -> None:
        new = self.restore(path)
        self.session.close()
        self.session = new
        f = cache_figures(new)
        self.emit({"command": "load", "path": str(path), "cache": f},
                  f"loaded {path}: {f['tokens_seen']} tokens seen, cache {f['cells_cached']}/{f['budget']} cells")


def read_lines(interactive: bool):
    """Input lines: prompted with readline editing on a terminal, else one per line of stdin."""
    if not interactive:
        yield from sys.stdin
        return
    import readline  # noqa: F401  (line editing and history for input())

    while True:
        try:
            yield input("> ")
        except EOFError:
            sys.stdout.write("\n")
            return


@app.command()
@with_policy_options(sweep=False)
@with_backend_options
@with_memory_options(default="hidden")
def chat(
    model: Optional[Path] = MODEL_ARG,
    mmproj: Optional[Path] = typer.Option(None, "--mmproj", help="vision projector GGUF (mmproj) for /image and /video"),
    policy: str = typer.Option("inf-mllm", "--policy", help=POLICY_NAMES),
    chunk: int = typer.Option(256, "--chunk", min=1, help="tokens per decode"),
    system: Optional[str] = typer.Option(None, "--system", help="system message"),
    max_tokens: int = typer.Option(DEFAULTS.max_tokens, "--max-tokens", min=1, help="longest reply"),
    temperature: float = typer.Option(DEFAULTS.temperature, "--temperature", min=0.0, help="0: greedy"),
    top_p: float = typer.Option(DEFAULTS.top_p, "--top-p", min=0.0, max=1.0),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per input line on stdout"),
    flash_attn: Optional[bool] = typer.Option(None, "--flash-attn/--no-flash-attn", help="default: llama.cpp's choice"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads (default: all cores)"),
    n_gpu_layers: int = NGL_OPT,
    policy_options: dict = None,
    backend: dict = None,
    memory=None,
) -> None:
    """Chat with a model whose KV cache never exceeds --budget cells. On a terminal: a prompt, replies streamed
    as sampled; otherwise each stdin line is one user turn and each reply is printed. /help lists commands."""
    from infmllm_gguf.model_files import ModelError
    from infmllm_gguf.multimodal import ProjectorError
    from infmllm_gguf.runtime import UnpatchedLlamaError
    from infmllm_gguf.session import StreamSession

    hardware = dict(n_gpu_layers=n_gpu_layers, n_threads=threads, rpc=backend["rpc"])
    try:
        session = StreamSession(model, policy, mmproj=mmproj, chunk=chunk, flash_attn=flash_attn, seed=seed,
                                cache_type_k=backend["cache_type_k"], cache_type_v=backend["cache_type_v"],
                                memory=memory, **hardware, **policy_options)
        session.chat_template()  # a model without one cannot chat: say so before the first turn
    except (ModelError, ProjectorError, UnpatchedLlamaError, ValueError) as exc:
        fail(str(exc))
    interactive = sys.stdin.isatty()
    repl = Repl(session, lambda path: StreamSession.restore(path, model, mmproj=mmproj, **hardware),
                system=system, sampling=dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p),
                as_json=as_json, out=sys.stdout, progress=sys.stderr.isatty())
    if interactive and not as_json:
        typer.echo(f"{session.model.name}, cache of {session.policy.budget} cells ({session.policy.name}); "
                   "/help lists commands")
    try:
        for line in read_lines(interactive):
            if not repl.handle(line):
                break
    except KeyboardInterrupt:
        pass
    finally:
        repl.close()
