"""`pensieve bench-serve URL SCENARIO`: a scenario's workload replayed against any OpenAI-compatible server.

The same workload as `pensieve run`: conversations start at their arrival times, each next turn is
sent when the previous answer is complete plus the (time-scaled) think time, and every turn's new
prompt is the same synthetic token ids. A turn is a streamed `/v1/completions` request of token ids
(the whole history, then the new prompt) with `ignore_eos` and `max_tokens` equal to the turn's
output length, `temperature` 0. The history carries the answer's own token ids when the server
returns them (`return_token_ids`, as `pensieve serve` and recent vLLM do); a server that does not
gets that many deterministic filler ids instead, which it can reuse only up to the previous prompt.

It writes what `pensieve run` writes: summary.json (mode "serve") and requests.csv, where the
client measures arrival, first token and finish, and takes the cached share from the server's
`usage.prompt_tokens_details.cached_tokens` (and where the KV was, from `usage.pensieve`, when the
server is this one). Copies come from the server's /metrics when it has pensieve's.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .request import Request
from .workload import Conversation, Workload, prompt_ids

SESSION_HEADER = "X-Session-ID"


@dataclass
class Replay:
    """What a replay measured, kept as it goes so that an interrupted one still writes its finished turns."""

    finished: list[Request] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    token_ids_returned: bool = True
    start: float = 0.0
    ended: float = 0.0


class ServerError(RuntimeError):
    pass


async def _turn(client, url: str, body: dict, headers: dict, timeout: float, start: float):
    """One streamed request: (first token time, finish time, generated ids or None, count, usage)."""
    first = None
    ids: list[int] = []
    returned = False
    usage = None
    async with client.stream("POST", url, json=body, headers=headers, timeout=timeout) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode("utf-8", "replace")
            raise ServerError(f"HTTP {response.status_code}: {text[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise ServerError(f"error in stream: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                got = choice.get("token_ids")
                text = choice.get("text") or ""
                if got is not None:
                    returned = True
                    ids += got
                if (got or text) and first is None:
                    first = time.perf_counter() - start
    finish = time.perf_counter() - start
    return first if first is not None else finish, finish, (ids if returned else None), usage


def _record(request: Request, first: float, finish: float, generated: int, usage: dict | None, history: int) -> None:
    request.first_token, request.finish = first, finish
    request.generated = generated
    request.history_tokens = history
    usage = usage or {}
    own = usage.get("pensieve")
    if own:  # this project's server says where the kept history's KV was
        request.history_tokens = own["history_tokens"]
        request.gpu_hit_tokens, request.cpu_hit_tokens = own["device_hit_tokens"], own["host_hit_tokens"]
        request.recomputed_tokens = own["recomputed_tokens"]
    else:  # OpenAI's usage says how many prompt tokens were cached, not on which tier: counted as device hits
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        request.gpu_hit_tokens = min(cached, history)
        request.recomputed_tokens = history - request.gpu_hit_tokens
    request.new_prompt_tokens = request.prompt_tokens


async def _conversation(client, url: str, model: str, conv: Conversation, seed: int, vocab: int, replay: Replay,
                        session: bool, timeout: float, next_id, bar) -> None:
    start = replay.start
    await asyncio.sleep(max(0.0, start + conv.start_s - time.perf_counter()))
    history: list[int] = []
    done_at = 0.0
    for t, turn in enumerate(conv.turns):
        if t:  # the user reads the answer, then writes the next message
            await asyncio.sleep(max(0.0, done_at + turn.think_s - time.perf_counter()))
        new = prompt_ids(seed, conv.id, t, turn.prompt_tokens, vocab)
        body = {"model": model, "prompt": history + new, "max_tokens": turn.output_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                "return_token_ids": True}
        headers = {SESSION_HEADER: conv.id} if session else {}
        request = Request(next_id(), conv.id, t, time.perf_counter() - start, len(new), turn.output_tokens)
        try:
            first, finish, ids, usage = await _turn(client, url, body, headers, timeout, start)
        except Exception as exc:  # noqa: BLE001 (a failed turn ends its conversation, the others go on)
            replay.failures.append(f"{conv.id} turn {t}: {exc}")
            bar.update(len(conv.turns) - t)
            return
        generated = len(ids) if ids is not None else (usage or {}).get("completion_tokens", turn.output_tokens)
        if ids is None:
            replay.token_ids_returned = False
            ids = prompt_ids(seed + 1, conv.id, t, generated, vocab)  # filler: the server never sampled these
        _record(request, first, finish, generated, usage, len(history))
        replay.finished.append(request)
        bar.update(1)
        history = history + new + ids
        done_at = time.perf_counter()


INFO = re.compile(r'^pensieve_info\{(.*)\} ')
LABEL = re.compile(r'(\w+)="([^"]*)"')


def server_metrics(metrics_text: str) -> dict | None:
    """From a pensieve server's /metrics page: swap bytes by direction and its info labels (policy,
    model); None for another server."""
    info = swap = None
    for line in metrics_text.splitlines():
        match = INFO.match(line)
        if match:
            info = dict(LABEL.findall(match.group(1)))
        elif line.startswith("pensieve_swap_bytes_total{"):
            direction = dict(LABEL.findall(line))["direction"]
            swap = (swap or {}) | {direction: float(line.rsplit(" ", 1)[1])}
    if info is None:
        return None
    return {"info": info, "swap_bytes": {"in": 0.0, "out": 0.0} | (swap or {})}


async def _metrics(client, base: str) -> dict | None:
    try:
        response = await client.get(f"{base}/metrics", timeout=10)
    except Exception:  # noqa: BLE001 (another engine may not serve /metrics)
        return None
    return server_metrics(response.text) if response.status_code == 200 else None


async def _model_name(client, base: str) -> str:
    response = await client.get(f"{base}/v1/models", timeout=30)
    if response.status_code != 200:
        raise ServerError(f"{base}/v1/models answered HTTP {response.status_code}; give --model")
    data = response.json().get("data") or []
    if not data:
        raise ServerError(f"{base}/v1/models lists no model; give --model")
    return data[0]["id"]


async def replay_workload(base: str, workload: Workload, seed: int, vocab: int, replay: Replay, *,
                          model: str | None = None, session: bool = True, timeout: float = 600.0,
                          progress: bool = False) -> tuple[str, dict | None]:
    """Replay every conversation concurrently into `replay`; (model name, what a pensieve server's
    /metrics said: its swap bytes during the replay and its info labels; None for other servers)."""
    import httpx
    from tqdm import tqdm

    base = base.rstrip("/")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        model = model or await _model_name(client, base)
        before = await _metrics(client, base)
        counter = iter(range(1 << 62))
        with tqdm(total=workload.requests, desc="bench-serve", unit="req", disable=not progress) as bar:
            replay.start = time.perf_counter()
            try:
                await asyncio.gather(*(
                    _conversation(client, f"{base}/v1/completions", model, conv, seed, vocab, replay, session,
                                  timeout, lambda: next(counter), bar)
                    for conv in workload.conversations))
            finally:
                replay.ended = time.perf_counter()
        after = await _metrics(client, base)
    if before is None or after is None:
        return model, None
    swapped = {k: after["swap_bytes"][k] - before["swap_bytes"][k] for k in ("in", "out")}
    return model, {"swap_bytes": swapped, "info": after["info"]}


def main(args) -> int:
    """The `bench-serve` verb."""
    from .config import load_scenario
    from .core import rng_for
    from .outputs import prepare_folder
    from .results import SUMMARY_COLUMNS, format_table, summarize, summary_row, write_results
    from .workload import build_workload, scale_think_times

    scenario = load_scenario(args.scenario, args.overrides)
    workload = scale_think_times(build_workload(scenario.workload, rng_for(scenario)), scenario.run.time_scale)
    out = prepare_folder(Path(args.out or Path("results") / f"{scenario.name}-serve"), args.force,
                         inputs=(args.scenario,))
    replay = Replay()
    interrupted = False
    model, server = args.model, None
    try:
        model, server = asyncio.run(replay_workload(
            args.url, workload, scenario.seed, scenario.model.vocab_size, replay, model=args.model,
            session=not args.no_session_id, timeout=args.timeout, progress=not args.quiet))
    except KeyboardInterrupt:
        interrupted = True
    except ServerError as exc:
        raise ValueError(f"{args.url}: {exc}") from None
    wall = (replay.ended or time.perf_counter()) - replay.start if replay.start else 0.0
    policy = server["info"].get("policy", "unknown") if server else "unknown"
    summary = summarize(replay.finished, "serve", policy, wall, 0, 0, 0, extra={
        "url": args.url, "model": model, "session_ids_sent": not args.no_session_id,
        "token_ids_returned": replay.token_ids_returned, "failed": replay.failures,
        "unfinished": workload.requests - len(replay.finished), "interrupted": interrupted,
        "cached_share": _cached_share(replay.finished),
    })
    summary["swap_bytes"] = server["swap_bytes"] if server else {"in": None, "out": None}  # None: not reported
    write_results(out, summary, replay.finished, scenario.model_dump())
    print(f"bench-serve: results in {out}/")
    row = summary_row(summary, wall_s=wall, tokens=summary["tokens"]["generated"] + summary["tokens"]["new_prompt"])
    print(format_table([row], [("wall s", "wall_s")] + SUMMARY_COLUMNS))
    for failure in replay.failures[:5]:
        print(f"bench-serve: failed: {failure}", file=sys.stderr)
    if interrupted:
        return 130
    return 1 if replay.failures else 0


def _cached_share(finished: list[Request]) -> float:
    """Of all prompt tokens sent (history included), the share the server did not compute again."""
    sent = sum(r.history_tokens + r.prompt_tokens for r in finished)
    return sum(r.gpu_hit_tokens + r.cpu_hit_tokens for r in finished) / sent if sent else 0.0
