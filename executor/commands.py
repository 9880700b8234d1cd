"""Handlers of the `pensieve compare` and `pensieve chat` verbs (the parser is pensieve/cli.py)."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from executor.conversations import sample_conversations
from executor.models import LoadedModel
from executor.server import PensieveServer, create_server

# What `chat --mode compare` runs, as `compare`'s own defaults (chat's parser has no such options).
COMPARE_DEFAULTS = {"num_conversations": 5, "turns": 5}
WARMUP_SESSION = "warm-up"


def _server(args: argparse.Namespace, mode: str, model: str | LoadedModel | None,
            stop_at_eos: bool = True) -> PensieveServer:
    return create_server(
        mode=mode, model=model, gpu_cache_gb=args.gpu_cache, cpu_cache_gb=args.cpu_cache, device=args.device,
        max_new_tokens=args.max_new_tokens, policy=args.policy, dtype=args.dtype, temperature=args.temperature,
        top_p=args.top_p, chunk_tokens=args.chunk_tokens, stop_at_eos=stop_at_eos,
    )


def compare(args: argparse.Namespace) -> int:
    """Serve the same conversations statefully and statelessly; print per-turn prefill times and hit rates.

    Every turn generates exactly --max-new-tokens (EOS ignored), so both modes do the same work.
    Conversations advance turn by turn, interleaved, so they compete for the cache as chat users do.
    """
    conversations = sample_conversations(args.num_conversations, args.turns)
    stateful = _server(args, "pensieve", args.model, stop_at_eos=False)
    servers = {  # one copy of the weights serves both modes
        "pensieve": stateful, "stateless": _server(args, "stateless", stateful.engine.loaded, stop_at_eos=False),
    }
    total = len(conversations) * args.turns
    for mode, server in servers.items():
        server.process_request(WARMUP_SESSION, "Hello!")  # first-call costs (allocation, kernels) stay out
        server.end_session(WARMUP_SESSION)
        server.reset_statistics()
        with tqdm(total=total, desc=f"{mode:>9}", unit="turn", file=sys.stderr) as bar:
            for turn in range(args.turns):
                for c, messages in enumerate(conversations):
                    server.process_request(f"conversation-{c}", messages[turn])
                    bar.update()
    print(_compare_table(servers["pensieve"], servers["stateless"], args.turns))
    print()
    for server in servers.values():
        print(server.get_statistics_str())
        print()
    return 0


def _compare_table(stateful: PensieveServer, stateless: PensieveServer, turns: int) -> str:
    """Per turn: mean history, mean prefill of each mode, the speedup, and the stateful mode's hit rates."""
    rows = [f"{'turn':>4} {'history':>8} {'pensieve ms':>12} {'stateless ms':>13} {'speedup':>8} "
            f"{'gpu hit':>8} {'cpu hit':>8} {'miss':>6}"]

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else 0.0

    for turn in range(turns + 1):
        a = [t for t in stateful.turns if t.turn == turn] if turn < turns else stateful.turns
        b = [t for t in stateless.turns if t.turn == turn] if turn < turns else stateless.turns
        history = sum(t.history_tokens for t in a)
        pensieve_ms, stateless_ms = 1e3 * mean([t.prefill_s for t in a]), 1e3 * mean([t.prefill_s for t in b])
        rates = [sum(getattr(t, f) for t in a) / history if history else 0.0
                 for f in ("gpu_hit_tokens", "cpu_hit_tokens", "recomputed_tokens")]
        label = str(turn + 1) if turn < turns else "all"
        rows.append(f"{label:>4} {history / len(a):>8.0f} {pensieve_ms:>12.1f} {stateless_ms:>13.1f} "
                    f"{stateless_ms / pensieve_ms:>7.2f}x {rates[0]:>8.1%} {rates[1]:>8.1%} {rates[2]:>6.1%}")
    return "\n".join(rows)


def chat(args: argparse.Namespace) -> int:
    """Interactive chat on stdin: one line per user turn; '/stats' prints statistics, '/quit' or EOF ends."""
    if args.mode == "compare":
        for key, value in COMPARE_DEFAULTS.items():
            setattr(args, key, getattr(args, key, value))
        return compare(args)
    server = _server(args, args.mode, args.model)
    interactive = sys.stdin.isatty()
    print(f"{server.engine.loaded.name} on {server.engine.loaded.device}, mode {server.mode}; "
          "type a message, /stats for statistics, /quit to leave", flush=True)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/stats":
            print(server.get_statistics_str(), flush=True)
            continue
        try:
            answer = server.process_request(args.session, text)
        except ValueError as exc:  # e.g. a message over the context: the session goes on without it
            print(f"error: {exc}", file=sys.stderr, flush=True)
            continue
        print(f"assistant> {answer}")
        print(status_line(server), flush=True)


def status_line(server: PensieveServer) -> str:
    """One line of live statistics: this turn's prefill, cumulative hit rates, memory per tier."""
    s, last = server.get_statistics(), server.turns[-1]
    return (f"[prefill {last.prefill_s * 1e3:.0f} ms | history {last.history_tokens} tok | "
            f"hits: device {s['gpu_hit_rate']:.0%} host {s['cpu_hit_rate']:.0%} miss {s['miss_rate']:.0%} | "
            f"device {s['device_cache_used_gb']:.3f}/{s['device_cache_gb']:.2f} GB | "
            f"host {s['host_cache_used_gb']:.3f}/{s['host_cache_gb']:.2f} GB]")
