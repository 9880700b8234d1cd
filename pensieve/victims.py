"""Victim indexes: which idle chunk of one region of the layout is evicted next, exactly.

Retention order, the order every eviction follows: among the idle conversations' chunks in a
region, chunk at eviction position p of conversation X comes before chunk p' of Y when

    (score(index of p, now - X.last_active), X.released, p)  <  (the same for p' and Y)

that is the policy's score first (lowest evicted first), then the longer-idle conversation
(earlier release), then the earlier eviction position. The manager keeps one index per region:

- `DEVICE_ONLY` [copy_end, chunks): the next chunk to copy out ahead of time, or to evict;
- `CLEAN` [host_end, copy_end): the next device slot to reclaim (its chunk has a host copy);
- `HOST_ONLY` [drop_end, host_end): the next host chunk to drop.

The manager calls `update(conv)` after every change to a conversation's boundaries or activity
(acquire, release, copy, reclaim, drop), so an index holds exactly the idle conversations with
chunks in its region, filed under their current head: nothing in it can go stale, and `take`
never revalidates. `take(now, count)` answers the next `count` victims without changing
anything; the caller moves them and then updates the conversations it touched.

Every policy must score a conversation's chunks in nondecreasing order along its eviction
order (checked at bind, see `EvictionPolicy.bind`), so a conversation's lowest chunk in a
region is its head (the region's first position), and the next victim is the lowest head. The
indexes differ in how they find it:

- `RecencyIndex`: scores that depend on idle time alone and never rise with it (the LRU
  family): release order *is* retention order, one sorted list;
- `RetentionIndex`: scores that never rise with idle time at a fixed chunk index (Pensieve's
  Cost(l)/T): members are grouped by their head's chunk index; within a group the earliest
  release scores lowest, so only group heads are scored, and a k-way merge over them yields
  victims in order;
- `ScanIndex`: any other policy: every member's head is scored (exact, O(members) per call);
  the only one for policies that score per conversation (`per_conversation`), whose scores may
  change with the policy's own state between calls.
"""
from __future__ import annotations

import bisect
import heapq
from operator import attrgetter
from typing import Callable

from .layout import EvictionOrder
from .request import Conversation


class Region:
    """A run of the layout in eviction order, [first(conv), end(conv))."""

    def __init__(self, name: str, first: Callable[[Conversation], int], end: Callable[[Conversation], int]) -> None:
        self.name, self.first, self.end = name, first, end

    def __repr__(self) -> str:
        return f"Region({self.name})"


DEVICE_ONLY = Region("device-only", attrgetter("copy_end"), lambda conv: len(conv.dev))
CLEAN = Region("clean", attrgetter("host_end"), attrgetter("copy_end"))
HOST_ONLY = Region("host-only", attrgetter("drop_end"), attrgetter("host_end"))


class VictimIndex:
    """The idle conversations holding chunks in one region, ordered for eviction (see the module doc)."""

    def __init__(self, policy, order: EvictionOrder, region: Region) -> None:
        self.policy = policy
        self.order = order
        self.region = region
        # A whole-conversation policy moves a conversation's whole region at once: a victim
        # is the conversation, and `take` answers whole regions.
        self.whole = policy.unit == "conversation"

    def update(self, conv: Conversation) -> None:
        """File `conv` as it is now: a member under its head if idle with chunks in the region, else not."""
        raise NotImplementedError

    def take(self, now: float, count: int) -> list[list]:
        """The next `count` victims at `now` (fewer if the region runs out; a whole-conversation
        policy's last run may overshoot), as one run `[conversation, chunks]` per conversation,
        its victims from its head on, the runs in the order of their first victims. Changes nothing.

        A conversation's victims are always a run from its head (its chunks score in eviction
        order), so the caller can move each run in one go and file the conversation once."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def member_ids(self) -> set:
        raise NotImplementedError

    def check(self, conversations: dict) -> None:
        """Recount membership from the conversations (tests); AssertionError if anything is off."""
        first, end = self.region.first, self.region.end
        expected = {c.id for c in conversations.values() if not c.active and first(c) < end(c)}
        assert self.member_ids() == expected, (self.region, self.member_ids() ^ expected)
        assert len(self) == len(expected), (self.region, len(self), len(expected))

    def _merge(self, heads: list[tuple], now: float, count: int, groups: dict | None = None,
               convs: dict | None = None) -> list[list]:
        """Pop `count` victims from a heap of heads `(score, release number, conversation, idle time,
        position, group key, place)`. After a pop, the conversation's next chunk joins the heap (its
        score is at least the popped one's), and a group's head (place >= 0 in `groups[key]`, release
        numbers resolved by `convs`) brings in the group's next member. The release number is unique
        among entries, so comparisons never reach the conversation."""
        index, first, end = self.order.index, self.region.first, self.region.end
        whole = self.whole
        per_conversation = self.policy.per_conversation
        score = self.policy.score_conversation if per_conversation else self.policy.score
        heapq.heapify(heads)
        heappush, heapreplace, heappop = heapq.heappush, heapq.heapreplace, heapq.heappop
        runs: dict[int, list] = {}  # release number -> [conversation, victims so far]
        while count > 0 and heads:
            _, released, conv, idle, position, key, place = heads[0]
            run = runs.get(released)
            if run is not None:
                run[1] += 1
                count -= 1
            elif whole:
                taken = end(conv) - position
                runs[released] = [conv, taken]
                count -= taken
            else:
                runs[released] = [conv, 1]
                count -= 1
            following = position + 1
            if not whole and following < end(conv):
                chunk = index(len(conv.dev), following)
                following_score = score(conv, chunk, idle) if per_conversation else score(chunk, idle)
                heapreplace(heads, (following_score, released, conv, idle, following, key, -1))
            else:
                heappop(heads)
            if place >= 0:
                group = groups[key]
                place += 1
                if place < len(group):
                    released = group[place]
                    conv = convs[released]
                    idle = now - conv.last_active
                    heappush(heads, (score(key, idle), released, conv, idle, first(conv), key, place))
        return list(runs.values())


class RecencyIndex(VictimIndex):
    """For scores that depend on idle time alone and never rise with it: the earliest release goes
    first, and a conversation's chunks all score alike, so it gives its whole region in order."""

    def __init__(self, policy, order: EvictionOrder, region: Region) -> None:
        super().__init__(policy, order, region)
        self._released: list[int] = []  # members' release numbers, ascending
        self._convs: dict[int, Conversation] = {}  # release number -> member

    def update(self, conv: Conversation) -> None:
        region = self.region
        key = conv.released
        present = self._convs.get(key) is conv
        if not conv.active and region.first(conv) < region.end(conv):
            if not present:
                self._convs[key] = conv
                released = self._released
                if not released or released[-1] < key:
                    released.append(key)  # the common case: a conversation just released
                else:
                    bisect.insort(released, key)
        elif present:
            del self._convs[key]
            released = self._released
            del released[bisect.bisect_left(released, key)]

    def take(self, now: float, count: int) -> list[list]:
        first, end = self.region.first, self.region.end
        convs = self._convs
        whole = self.whole
        runs: list[list] = []
        for key in self._released:
            if count <= 0:
                break
            conv = convs[key]
            available = end(conv) - first(conv)
            taken = available if whole else min(available, count)
            runs.append([conv, taken])
            count -= taken
        return runs

    def __len__(self) -> int:
        return len(self._released)

    def member_ids(self) -> set:
        return {c.id for c in self._convs.values()}

    def check(self, conversations: dict) -> None:
        super().check(conversations)
        assert self._released == sorted(self._convs), self.region
        assert all(conv.released == key for key, conv in self._convs.items()), self.region


class RetentionIndex(VictimIndex):
    """For scores that never rise with idle time at a fixed chunk index (Pensieve's Cost(l)/T).

    Members are filed in groups by their head's chunk index, each group in release order. Within
    a group the heads share a chunk index, so the earliest release is idle longest and scores
    lowest (ties going to it as well): only group heads are scored, and `take` merges them.
    """

    def __init__(self, policy, order: EvictionOrder, region: Region) -> None:
        super().__init__(policy, order, region)
        self._groups: dict[int, list[int]] = {}  # head chunk index -> members' release numbers, ascending
        self._convs: dict[int, Conversation] = {}  # release number -> member
        self._filed: dict[object, int] = {}  # conversation id -> the head chunk index it is filed under

    def update(self, conv: Conversation) -> None:
        region = self.region
        filed = self._filed.get(conv.id)
        first = region.first(conv)
        if conv.active or first >= region.end(conv):
            if filed is not None:
                del self._convs[conv.released]
                del self._filed[conv.id]
                self._leave(conv.released, filed)
            return
        key = self.order.index(len(conv.dev), first)
        if filed == key:
            return
        released = conv.released
        if filed is None:
            self._convs[released] = conv
        else:  # its head moved on: from one group to another
            self._leave(released, filed)
        self._filed[conv.id] = key
        group = self._groups.get(key)
        if group is None:
            self._groups[key] = [released]
        elif group[-1] < released:
            group.append(released)
        else:
            bisect.insort(group, released)

    def _leave(self, released: int, key: int) -> None:
        group = self._groups[key]
        if len(group) == 1:
            del self._groups[key]
        elif group[0] == released:
            del group[0]  # the usual case: a victim is its group's head
        else:
            del group[bisect.bisect_left(group, released)]

    def take(self, now: float, count: int) -> list[list]:
        if count <= 0 or not self._groups:
            return []
        score, convs, first = self.policy.score, self._convs, self.region.first
        heads = []
        for key, group in self._groups.items():  # each group's head; the merge brings in the rest
            released = group[0]
            conv = convs[released]
            idle = now - conv.last_active
            heads.append((score(key, idle), released, conv, idle, first(conv), key, 0))
        return self._merge(heads, now, count, self._groups, convs)

    def __len__(self) -> int:
        return len(self._convs)

    def member_ids(self) -> set:
        return set(self._filed)

    def check(self, conversations: dict) -> None:
        super().check(conversations)
        for key, group in self._groups.items():
            assert group and group == sorted(set(group)), (self.region, key)
            for released in group:
                conv = self._convs[released]
                assert conv.released == released and self._filed[conv.id] == key, (self.region, conv.id)
                assert key == self.order.index(len(conv.dev), self.region.first(conv)), (self.region, conv.id)
        assert sum(map(len, self._groups.values())) == len(self._convs)


class ScanIndex(VictimIndex):
    """For any policy that keeps the contract: every member's head is scored at each `take`."""

    def __init__(self, policy, order: EvictionOrder, region: Region) -> None:
        super().__init__(policy, order, region)
        self._members: dict[object, Conversation] = {}

    def update(self, conv: Conversation) -> None:
        region = self.region
        if not conv.active and region.first(conv) < region.end(conv):
            self._members[conv.id] = conv
        else:
            self._members.pop(conv.id, None)

    def take(self, now: float, count: int) -> list[list]:
        # score_conversation is `score` itself for a policy that does not read the conversation
        score, index, first = self.policy.score_conversation, self.order.index, self.region.first
        heads = []
        for conv in self._members.values():
            position, idle = first(conv), now - conv.last_active
            heads.append((score(conv, index(len(conv.dev), position), idle), conv.released, conv, idle, position,
                          None, -1))
        return self._merge(heads, now, count)

    def __len__(self) -> int:
        return len(self._members)

    def member_ids(self) -> set:
        return set(self._members)


INDEXES: dict[str, type[VictimIndex]] = {"recency": RecencyIndex, "retention": RetentionIndex, "scan": ScanIndex}


# The score shapes each index is exact for: a recency score is also a retention one, and the scan
# takes any policy that keeps the contract.
SERVES = {RecencyIndex: {"recency"}, RetentionIndex: {"recency", "retention"}, ScanIndex: {"recency", "retention", "scan"}}


def check_index(policy, index: type[VictimIndex]) -> None:
    """Refuse an index (given to the cache in place of the policy's own) that is not exact for the
    score shape the policy declares."""
    from .policies import PolicyContractError

    if policy.victim_index not in SERVES.get(index, set()):
        raise PolicyContractError(f"{index.__name__} is not exact for policy {policy.name!r}, whose score shape is "
                                  f"{policy.victim_index!r}; use {INDEXES[policy.victim_index].__name__} or ScanIndex")


def index_for(policy) -> type[VictimIndex]:
    """The index a policy's score shape allows (its `victim_index`, checked at bind)."""
    return INDEXES[policy.victim_index]
