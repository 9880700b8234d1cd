"""The field's trace and conversation formats, read into workloads.

- `mooncake`: Mooncake's JSONL, one request per line: `timestamp` (ms), `input_length`, `output_length` and
  `hash_ids` (one id per 512-token block of the input). Conversations are implicit: a request whose
  leading hash ids are every full block of an earlier request continues that request's conversation.
- `bailian`: the Qwen-Bailian traces, one request per line: `chat_id`, `parent_chat_id` (-1 for a
  conversation's first turn), `timestamp` (s), `input_length`, `output_length`, `turn`.
- `vllm-multiturn`: vLLM's multi-turn benchmark conversations, a JSON list of
  `{"id", "messages": [{"role": "user" | "assistant", "content"}]}`.
- `wildchat`: chat logs with per-message timestamps (WildChat-style), a JSON list (or JSONL) of
  `{"conversation_hash", "conversation": [{"role", "content", "timestamp", "turn_identifier"}]}`; think
  times are measured (a user message's time after the previous answer's) instead of drawn.

In the two request traces a request's input holds the whole history, so a turn's new prompt is its input
less the previous request's input and output. Their gaps between a conversation's requests become think
times: a turn is sent that long after the simulated answer to the previous one (closed loop), so the gap
also holds the original service time. A malformed line or entry is an error naming the file, its position
and the field, as ShareGPT's are.
"""
from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import numpy as np

from .workload import (Conversation, Turn, Workload, WorkloadError, cap_context, count_tokens, draw_arrivals,
                       read_workload_text)

MOONCAKE_BLOCK_TOKENS = 512
FORMATS = ("mooncake", "bailian", "vllm-multiturn", "wildchat")


def _jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a line that is not a JSON object is an error."""
    rows = []
    for number, line in enumerate(read_workload_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise WorkloadError(f"{path}:{number}: a line is a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    if not rows:
        raise WorkloadError(f"{path}: the trace has no requests")
    return rows


def _field(path: Path, number: int, row: dict, key: str, kind: str, least: float = 0):
    """One typed field of a trace line: `int` (a whole number >= least) or `number` (finite, >= least)."""
    if key not in row:
        raise WorkloadError(f"{path}:{number}: missing field {key!r}")
    value = row[key]
    ok = (isinstance(value, int) if kind == "int" else isinstance(value, (int, float))) and not isinstance(value, bool)
    if not ok or (kind == "number" and not math.isfinite(value)) or value < least:
        expected = f"an integer >= {least:g}" if kind == "int" else f"a finite number >= {least:g}"
        raise WorkloadError(f"{path}:{number}: field {key!r} must be {expected}, got {value!r}")
    return value


def _new_prompt(history: int, input_length: int) -> int:
    """New prompt tokens of a continuing request: its input less the history it repeats (at least 1)."""
    return max(input_length - history, 1)


def _finish(convs: list[Conversation], notes: list[str], max_context: int, path: Path, shift: bool = False) -> Workload:
    """Cap each conversation at max_context (counted in the notes); with `shift`, a trace's clock is moved to
    start at 0."""
    capped = 0
    kept = []
    for conv in convs:
        turns = cap_context(conv.turns, max_context)
        capped += len(conv.turns) - len(turns)
        if turns:
            conv.turns = turns
            kept.append(conv)
    if capped:
        notes.append(f"{path}: {capped} turns pass workload.max_context ({max_context} tokens) and were left out, "
                     "with the rest of their conversations")
    if not kept:
        raise WorkloadError(f"{path}: no usable conversation")
    first = min(c.start_s for c in kept) if shift else 0.0
    for conv in kept:
        conv.start_s -= first
    kept.sort(key=lambda c: c.start_s)
    return Workload(kept, notes)


def load_mooncake(path: Path, max_context: int, limit: int | None = None) -> Workload:
    """Mooncake JSONL requests, chained into conversations by their leading hash ids (module docstring)."""
    requests = []
    for number, row in _jsonl(path):
        stamp = _field(path, number, row, "timestamp", "number") / 1000.0
        input_length = _field(path, number, row, "input_length", "int", 1)
        output_length = _field(path, number, row, "output_length", "int", 1)
        hashes = row.get("hash_ids")
        if not isinstance(hashes, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in hashes):
            raise WorkloadError(f"{path}:{number}: field 'hash_ids' must be a list of integers, got {hashes!r}"[:300])
        requests.append((stamp, number, input_length, output_length, tuple(hashes)))
    requests.sort()
    open_ends: dict[tuple, tuple[Conversation, int, float]] = {}  # full-block prefix -> conv, history, time
    convs: list[Conversation] = []
    for stamp, number, input_length, output_length, hashes in requests:
        parent = None
        for cut in range(len(hashes), 0, -1):  # the longest earlier request whose full blocks this one repeats
            candidate = open_ends.get(hashes[:cut])
            if candidate and candidate[1] < input_length:  # and whose history (input + output) it holds
                parent = open_ends.pop(hashes[:cut])
                break
        if parent:
            conv, history, last = parent
            conv.turns.append(Turn(_new_prompt(history, input_length), output_length, stamp - last))
        else:
            if limit is not None and len(convs) >= limit:
                continue
            conv = Conversation(f"mooncake-{number}", stamp, [Turn(input_length, output_length)])
            convs.append(conv)
        full = input_length // MOONCAKE_BLOCK_TOKENS
        if full:
            open_ends[hashes[:full]] = (conv, input_length + output_length, stamp)
    return _finish(convs, [], max_context, path, shift=True)


def load_bailian(path: Path, max_context: int, limit: int | None = None) -> Workload:
    """Qwen-Bailian requests, chained by parent_chat_id (-1: a conversation's first turn)."""
    by_id: dict = {}
    rows = []
    for number, row in _jsonl(path):
        for key in ("chat_id", "parent_chat_id"):
            if key not in row or isinstance(row[key], (bool, float, list, dict)) or row[key] is None:
                raise WorkloadError(f"{path}:{number}: field {key!r} must be an id (integer or string), got "
                                    f"{row.get(key)!r}")
        stamp = _field(path, number, row, "timestamp", "number")
        input_length = _field(path, number, row, "input_length", "int", 1)
        output_length = _field(path, number, row, "output_length", "int", 1)
        _field(path, number, row, "turn", "int", 0)
        if row["chat_id"] in by_id:
            raise WorkloadError(f"{path}:{number}: chat_id {row['chat_id']!r} is already on line "
                                f"{by_id[row['chat_id']][0]}")
        by_id[row["chat_id"]] = (number, row)
        rows.append((stamp, number, row, input_length, output_length))
    rows.sort(key=lambda r: (r[0], r[1]))
    state: dict = {}  # chat_id -> (conversation, history tokens, timestamp)
    convs: list[Conversation] = []
    for stamp, number, row, input_length, output_length in rows:
        parent = row["parent_chat_id"]
        if parent in (-1, "-1"):
            if limit is not None and len(convs) >= limit:
                continue
            conv = Conversation(f"bailian-{row['chat_id']}", stamp, [Turn(input_length, output_length)])
            convs.append(conv)
        elif parent in state:
            conv, history, last = state.pop(parent)
            conv.turns.append(Turn(_new_prompt(history, input_length), output_length, max(stamp - last, 0.0)))
        elif parent in by_id:
            continue  # its conversation was left out (the limit) or its parent came later: nothing to continue
        else:
            raise WorkloadError(f"{path}:{number}: parent_chat_id {parent!r} is no chat_id of this trace")
        state[row["chat_id"]] = (conv, input_length + output_length, stamp)
    return _finish(convs, [], max_context, path, shift=True)


def _json_list(path: Path) -> list:
    """A JSON list of entries, or JSONL with one entry per line."""
    text = read_workload_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return [row for _, row in _jsonl(path)]
    if not isinstance(data, list):
        raise WorkloadError(f"{path}: expected a JSON list of conversations, got {type(data).__name__}")
    return data


def _message_turns(messages, tokenizer, where: str) -> list[tuple[int, int, int, int]]:
    """(prompt tokens, output tokens, user message index, answer index) per user message answered."""
    if not isinstance(messages, list):
        raise ValueError(f"{where} is not a list of messages")
    turns, pending, start = [], None, None
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            raise ValueError(f"message {i} lacks 'role' or a text 'content'")
        role = message["role"]
        if role == "user":
            pending = message["content"] if pending is None else pending + "\n" + message["content"]
            start = i if start is None else start
        elif role == "assistant":
            if pending is not None:
                turns.append((count_tokens(pending, tokenizer), max(count_tokens(message["content"], tokenizer), 1),
                              start, i))
                pending, start = None, None
        elif role not in ("system", "tool"):
            raise ValueError(f"message {i} has unknown role {role!r} (user, assistant, system)")
    if not turns:
        raise ValueError("no user message followed by an answer")
    return turns


def _conversations(path: Path, on_error: str, limit: int | None, read) -> tuple[list[Conversation], list[str]]:
    """Conversations from a list of entries, `read(position, entry)` each; a malformed entry (ValueError) is
    noted with its position and skipped, or refused (`on_error: refuse`)."""
    convs, notes = [], []
    for position, entry in enumerate(_json_list(path)):
        if limit is not None and len(convs) >= limit:
            break
        try:
            convs.append(read(position, entry))
        except ValueError as exc:
            if on_error == "refuse":
                raise WorkloadError(f"{path}: entry {position}: {exc}") from None
            notes.append(f"{path}: entry {position}: {exc}")
    return convs, notes


def load_vllm_multiturn(path: Path, rng: np.random.Generator, rate: float, think: str, think_mean_s: float,
                        max_context: int, on_error: str = "skip", limit: int | None = None,
                        tokenizer=None) -> Workload:
    """vLLM's multi-turn benchmark conversations; arrivals and think times drawn as for ShareGPT."""
    def read(position: int, entry) -> Conversation:
        if not isinstance(entry, dict):
            raise ValueError("not an object with 'id' and 'messages'")
        turns = _message_turns(entry.get("messages"), tokenizer, "'messages'")
        return Conversation(str(entry.get("id", position)), 0.0, [Turn(p, o) for p, o, _, _ in turns])

    convs, notes = _conversations(path, on_error, limit, read)
    draw_arrivals(convs, rng, rate, think, think_mean_s)
    return _finish(convs, notes, max_context, path)


def _timestamp(value, where: str) -> float:
    """Seconds from an ISO 8601 string (a trailing Z allowed) or a number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)).timestamp()
    raise ValueError(f"{where}: 'timestamp' must be an ISO 8601 time or seconds, got {value!r}")


def load_wildchat(path: Path, rng: np.random.Generator, rate: float, max_context: int, on_error: str = "skip",
                  limit: int | None = None, tokenizer=None) -> Workload:
    """WildChat-style logs: conversations arrive as a Poisson process at `rate`; think times are the logs'
    own (a user message's timestamp after the previous answer's), never negative."""
    def read(position: int, entry) -> Conversation:
        if not isinstance(entry, dict):
            raise ValueError("not an object with 'conversation_hash' and 'conversation'")
        messages = entry.get("conversation")
        turns = _message_turns(messages, tokenizer, "'conversation'")
        stamps = [_timestamp(m.get("timestamp"), f"message {i}") for i, m in enumerate(messages)]
        out = [Turn(prompt, output, 0.0 if k == 0 else max(stamps[user] - stamps[turns[k - 1][3]], 0.0))
               for k, (prompt, output, user, _) in enumerate(turns)]
        return Conversation(str(entry.get("conversation_hash", position)), 0.0, out)

    convs, notes = _conversations(path, on_error, limit, read)
    draw_arrivals(convs, rng, rate, None, 0.0)
    return _finish(convs, notes, max_context, path)
