"""Which conversation an API request continues.

An OpenAI request carries the whole conversation every time, never an id of it. A client may name
its session (a header or a body field); otherwise the request continues the idle conversation whose
token ids share the longest prefix with the request's, as prefix caching gives `vllm serve` users
their reuse. Only the common prefix is ever reused: where a request departs from its conversation
(an edited earlier message, a regenerated answer, text that re-tokenizes differently), the
conversation is truncated there and the rest is computed afresh.

Conversations here are not shared: without session ids, two clients whose prompts share a long
prefix take turns with one conversation. `min_share` keeps a new client from taking over another's
conversation for a short common prefix (a shared system prompt): an anonymous request continues a
conversation only if the common prefix is at least one chunk and `min_share` of that conversation.

`PrefixIndex` finds the longest prefix through chained hashes of whole chunks (the fast path);
`longest_prefix_scan` is its brute-force reference, and a test checks that they agree.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def chunk_hashes(ids: Sequence[int], chunk_tokens: int, start: int = 0, previous: int = 0) -> list[int]:
    """Chained hashes of the whole chunks of `ids` from chunk `start`: hash k stands for ids[:(k+1)*chunk]."""
    out = []
    for k in range(start, len(ids) // chunk_tokens):
        previous = hash((previous, tuple(ids[k * chunk_tokens:(k + 1) * chunk_tokens])))
        out.append(previous)
    return out


@dataclass
class Match:
    """The idle conversation sharing the longest prefix with a request, and how long that prefix is."""

    conversation_id: Hashable | None
    common: int


def longest_prefix_scan(conversations: Iterable[tuple[Hashable, Sequence[int]]], ids: Sequence[int],
                        at_least: int = 1) -> Match:
    """Reference: every conversation compared in full; a prefix under `at_least` tokens is no match.
    Ties go to the one listed last (the most recent)."""
    best = Match(None, 0)
    for conversation_id, kept in conversations:
        common = common_prefix(kept, ids)
        if common >= at_least and common >= best.common:
            best = Match(conversation_id, common)
    return best


class PrefixIndex:
    """Idle conversations by the chained hashes of their whole chunks, most recently indexed last."""

    def __init__(self, chunk_tokens: int) -> None:
        self.chunk_tokens = chunk_tokens
        self.ids: OrderedDict[Hashable, list[int]] = OrderedDict()  # idle conversations, oldest first
        self._hashes: dict[Hashable, list[int]] = {}
        self._by_hash: dict[int, set[Hashable]] = {}
        self._stamp: dict[Hashable, int] = {}  # when each was indexed: the tie-break
        self._added = 0

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, conversation_id: Hashable, ids: Sequence[int]) -> None:
        """Index an idle conversation's ids (replacing what was indexed for it)."""
        self.remove(conversation_id)
        self.ids[conversation_id] = list(ids)
        self._stamp[conversation_id] = self._added
        self._added += 1
        hashes = self._hashes[conversation_id] = chunk_hashes(ids, self.chunk_tokens)
        for h in hashes:
            self._by_hash.setdefault(h, set()).add(conversation_id)

    def remove(self, conversation_id: Hashable) -> None:
        if self.ids.pop(conversation_id, None) is None:
            return
        del self._stamp[conversation_id]
        for h in self._hashes.pop(conversation_id):
            holders = self._by_hash[h]
            holders.discard(conversation_id)
            if not holders:
                del self._by_hash[h]

    def oldest(self) -> Hashable | None:
        return next(iter(self.ids), None)

    def longest_prefix(self, ids: Sequence[int]) -> Match:
        """The indexed conversation sharing the longest prefix of at least one whole chunk with `ids`
        (ties: the most recent); `longest_prefix_scan(..., at_least=chunk_tokens)` is the reference.

        A conversation sharing k whole chunks shares fewer than (k+1) x chunk tokens, so the longest
        prefix is among those sharing the most whole chunks; they are compared in full. A hash
        collision (never seen, but possible) falls back to the scan.
        """
        depth, holders = 0, None
        for k, h in enumerate(chunk_hashes(ids, self.chunk_tokens)):
            found = self._by_hash.get(h)
            if not found:
                break
            depth, holders = k + 1, found
        if holders is None:
            return Match(None, 0)
        candidates = sorted(holders, key=self._stamp.__getitem__)  # oldest first: ties go to the last
        best = longest_prefix_scan(((cid, self.ids[cid]) for cid in candidates), ids, self.chunk_tokens)
        if best.common < depth * self.chunk_tokens:  # a collision: be exact
            return longest_prefix_scan(self.ids.items(), ids, self.chunk_tokens)
        return best


@dataclass
class Route:
    """Where a request goes: its conversation, and how many of that conversation's tokens it keeps
    (the rest, if any, is truncated away before the request's own tokens follow)."""

    conversation_id: Hashable
    keep: int


class ConversationRouter:
    """Conversations by session id or by longest kept prefix; a conversation serves one request at a time.

    `max_idle`: idle conversations kept (their token ids and KV); past it the least recently used
    is forgotten. Each conversation's KV is evicted by the cache's policy long before that; this
    bounds the ids kept for recomputation.
    """

    def __init__(self, chunk_tokens: int, min_share: float = 0.5, max_idle: int = 10_000) -> None:
        if not 0 <= min_share <= 1:
            raise ValueError(f"min_share must be in [0, 1], got {min_share}")
        if max_idle < 1:
            raise ValueError(f"max_idle must be at least 1, got {max_idle}")
        self.chunk_tokens = chunk_tokens
        self.min_share = min_share
        self.max_idle = max_idle
        self.anonymous = PrefixIndex(chunk_tokens)  # idle conversations without a session id
        self.sessions: dict[str, list[int]] = {}  # idle session conversations' ids
        self.busy: set[Hashable] = set()
        self._idle: OrderedDict[str, None] = OrderedDict()  # every idle conversation, least recently used first
        self._created = 0

    @staticmethod
    def session_conversation(session: str) -> str:
        return f"session:{session}"

    def route(self, ids: Sequence[int], session: str | None = None) -> Route | None:
        """The conversation `ids` continue (None: its session has a request in flight; ask again after it).

        At least the last token of `ids` is always computed: its logits give the first new token.
        """
        if not ids:
            raise ValueError("a request needs at least one token")
        if session is not None:
            cid = self.session_conversation(session)
            if cid in self.busy:
                return None
            kept = self.sessions.pop(cid, None)
            self._idle.pop(cid, None)
            common = common_prefix(kept, ids) if kept else 0
        else:
            match = self.anonymous.longest_prefix(ids)
            cid, common = match.conversation_id, match.common
            if cid is not None:
                kept_tokens = len(self.anonymous.ids[cid])
                if common < kept_tokens and common < self.min_share * kept_tokens:
                    cid = None  # a short shared start (a system prompt): someone else's conversation
            if cid is None:
                cid, common = f"conversation:{self._created}", 0
                self._created += 1
            self.anonymous.remove(cid)
            self._idle.pop(cid, None)
        self.busy.add(cid)
        return Route(cid, min(common, len(ids) - 1))

    def finished(self, conversation_id: Hashable, ids: Sequence[int]) -> list[Hashable]:
        """The conversation is idle again with these ids; the conversations to forget (over `max_idle`)."""
        self.busy.discard(conversation_id)
        if ids:
            if conversation_id.startswith("session:"):
                self.sessions[conversation_id] = list(ids)
            else:
                self.anonymous.add(conversation_id, ids)
            self._idle.pop(conversation_id, None)
            self._idle[conversation_id] = None
        forget = []
        while len(self._idle) > self.max_idle:
            old, _ = self._idle.popitem(last=False)
            self.sessions.pop(old, None)
            self.anonymous.remove(old)
            forget.append(old)
        return forget
