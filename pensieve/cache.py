"""The KV cache manager: conversations' chunks on a device tier and a host tier.

It owns both tiers' slots and every conversation's chunk layout, and records the copies a
backend must carry out (swap out device -> host, swap in host -> device) for the step being
planned. Which idle conversation gives up a chunk is the policy's call; the mechanics are here:
- eviction from the device tier copies a chunk to the host tier (swap-out) and frees its device
  slot; with no host room, or no host tier, the chunk is dropped;
- ahead-of-time swap-out copies chunks while the device tier is still fairly free and keeps the
  device copy until the slot is actually needed (lazy reclaim), so eviction itself is free;
- the host tier, when full, drops chunks by the same policy;
- chunks of active conversations (an admitted request) are never touched.
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque

import numpy as np
from dataclasses import dataclass, field

from .policies import EvictionPolicy
from .request import Conversation
from .tiers import SlotPool


MIN_BATCH = 64
# Below this many candidate conversations a scoring pass merges their chunk sequences in plain
# Python; above it, it scores them with numpy and prunes.
FEW_CANDIDATES = 32
# Conversations read and scored together by a numpy scoring pass.
PICK_BLOCK = 128


@dataclass
class Restore:
    """What admitting a conversation's request found and must compute."""

    spans: list[tuple[int, int]]  # (start position, length) of query tokens, ascending
    gpu_hit_tokens: int
    cpu_hit_tokens: int
    recomputed_tokens: int
    new_tokens: int
    swap_in_chunks: int


@dataclass
class CacheStats:
    swap_out_chunks: int = 0
    swap_in_chunks: int = 0
    dropped_chunks: int = 0
    reclaimed_chunks: int = 0
    evictions_by_tier: dict = field(default_factory=lambda: {"device": 0, "host": 0})


class KVCacheManager:
    """Per-conversation chunk layout over two slot pools, driven by an eviction policy."""

    def __init__(self, device_slots: int, host_slots: int, chunk_tokens: int, policy: EvictionPolicy,
                 max_context: int, bytes_per_chunk: int = 0, eviction_batch: float = 0.01) -> None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        if not 0 <= eviction_batch < 1:
            raise ValueError(f"eviction_batch must be a fraction in [0, 1), got {eviction_batch}")
        self.chunk_tokens = chunk_tokens
        self.policy = policy
        self.max_chunks = -(-max_context // chunk_tokens)
        policy.bind(chunk_tokens, self.max_chunks)
        self.device = SlotPool("device", device_slots)
        self.host = SlotPool("host", host_slots if policy.uses_host_tier else 0)
        self.bytes_per_chunk = bytes_per_chunk
        self.trailing = policy.order == "trailing"
        self.whole_conversation = policy.unit == "conversation"
        self.conversations: dict[object, Conversation] = {}
        # Idle conversations that hold at least one chunk on some tier, and those of them that
        # still have device-only chunks: the eviction candidates of each tier. Both are ordered
        # by release time, that is longest idle first.
        self.idle: dict[object, Conversation] = {}
        self.idle_device: dict[object, Conversation] = {}
        self.active_slots = 0  # device slots pinned by active conversations
        self.clean_count = 0  # device chunks that also have a host copy (reclaimable for free)
        # Chunks copied to the host whose device copy is still there, in copy order (the reclaim
        # order), as runs (conversation, first position, count). `_clean_queued` counts the chunks
        # the runs hold, stale ones included.
        self._clean: deque[tuple[Conversation, int, int]] = deque()
        self._clean_queued = 0
        # Victims are selected in batches (one scoring pass over idle conversations yields many
        # victims in retention order) because scoring every conversation per evicted chunk is
        # O(conversations); a batch of 1 is exact at every eviction.
        self._device_batch = self._batch_size(eviction_batch, device_slots)
        self._host_batch = self._batch_size(eviction_batch, self.host.capacity)
        self._device_victims: deque[tuple[Conversation, int]] = deque()
        self._host_victims: deque[tuple[Conversation, int]] = deque()
        # Host slots freed by this step's swap-ins stay unusable until the step ends, so a
        # swap-out planned in the same step never overwrites data a swap-in still has to read.
        self._host_limbo: list[int] = []
        self.stats = CacheStats()
        self.begin_step()

    @staticmethod
    def _batch_size(fraction: float, slots: int) -> int:
        """Victims per scoring pass: 0 means exact (one at a time); otherwise a fraction of the
        tier, but at least MIN_BATCH so that a small tier is not rescored at every eviction."""
        return 1 if fraction == 0 else max(MIN_BATCH, int(fraction * slots))

    # ------------------------------------------------------------------ step boundary
    def begin_step(self) -> None:
        """Start recording the copies of a new step."""
        self.swap_out_ops: list[tuple[int, int]] = []  # (device slot, host slot)
        self.swap_in_ops: list[tuple[int, int]] = []  # (host slot, device slot)
        self.dropped_this_step = 0

    def end_step(self) -> None:
        """The backend has carried out the step's copies: host slots read by swap-ins are free."""
        if self._host_limbo:
            self.host.free.extend(self._host_limbo)
            self._host_limbo.clear()

    # ------------------------------------------------------------------ conversations
    def conversation(self, conversation_id, now: float) -> Conversation:
        conv = self.conversations.get(conversation_id)
        if conv is None:
            conv = self.conversations[conversation_id] = Conversation(conversation_id, now)
        return conv

    def slots_needed(self, conv: Conversation) -> int:
        """Device slots admitting `conv` takes beyond its chunks already on the device tier."""
        new_chunks = -(-conv.tokens // self.chunk_tokens) - conv.chunks
        return conv.h + new_chunks

    def can_acquire(self, conv: Conversation) -> bool:
        """Whether every chunk of `conv` fits on the device tier without touching active ones."""
        resident = conv.chunks - conv.h
        return self.active_slots + resident + self.slots_needed(conv) <= self.device.capacity

    def acquire(self, conv: Conversation, now: float) -> Restore | None:
        """Pin `conv` on the device tier for a request: swap in, re-place dropped chunks, add new ones.

        Returns None (and changes nothing) when the device tier cannot hold it.
        """
        assert not conv.active, conv.id
        if not self.can_acquire(conv):
            return None
        ct = self.chunk_tokens
        n, kv = conv.chunks, conv.kv_tokens
        d, h, b = conv.d, conv.h, conv.b
        dev, host = conv.dev, conv.host
        trailing = self.trailing
        conv.active = True
        self.idle.pop(conv.id, None)
        self.idle_device.pop(conv.id, None)
        # Each run of the layout ([0, d) dropped, [d, h) host, [h, b) both) moves as a slice of
        # chunk indices; for a trailing-first policy a slice runs against eviction order, so
        # what is listed in eviction order (host slots freed, copies) is reversed first.
        # Chunks on both tiers first: their device copy is used and the host copy freed, so no
        # reclaim below can count them as clean while they are pinned.
        if b > h:
            self.host.free += self._take_run(host, h, b - h)
            self.clean_count -= b - h
        # Every slot at once, in the order one-by-one requests would get them: taking them changes
        # nothing that this conversation's own moves below depend on.
        needed = h + -(-conv.tokens // ct) - n
        slots = self._obtain_device_slots(needed, now)
        assert len(slots) == needed, "feasibility was checked"
        if h > d:
            copied = self._take_run(host, d, h - d)
            self.swap_in_ops.extend(zip(copied, slots[d:h]))
            self._host_limbo.extend(copied)
        placed = slots[:h]
        if trailing:
            placed.reverse()
        dev[self._indices(n, 0, h)] = placed
        new = slots[h:]
        dev.extend(new)
        host.extend([-1] * len(new))
        self.active_slots += n - h + needed
        conv.d = conv.h = conv.b = 0
        dropped = self._indices(n, 0, d)
        recomputed = _tokens_in(dropped, ct, kv)
        cpu = _tokens_in(self._indices(n, d, h), ct, kv)
        self.stats.swap_in_chunks += h - d
        spans = _merge_spans([(dropped.start * ct, recomputed), (kv, conv.tokens - kv)])
        return Restore(spans, kv - recomputed - cpu, cpu, recomputed, conv.tokens - kv, h - d)

    def _indices(self, n: int, first: int, end: int) -> slice:
        """The chunk indices of eviction positions [first, end) in a conversation of n chunks."""
        return slice(n - end, n - first) if self.trailing else slice(first, end)

    def grow(self, conv: Conversation, now: float) -> bool:
        """Make room for the KV of position `kv_tokens` (a decode); False when nothing can be evicted."""
        if conv.kv_tokens < conv.chunks * self.chunk_tokens:
            return True
        slot = self._obtain_device_slot(now)
        if slot < 0:
            return False
        conv.dev.append(slot)
        conv.host.append(-1)
        self.active_slots += 1
        return True

    def release(self, conv: Conversation, now: float) -> None:
        """A request finished or was suspended: its conversation's chunks become evictable."""
        assert conv.active, conv.id
        conv.active = False
        conv.last_active = now
        self.active_slots -= conv.chunks
        # A decode suspended in the step that allocated its next chunk leaves that chunk empty.
        while conv.chunks * self.chunk_tokens - self.chunk_tokens >= conv.kv_tokens and conv.chunks:
            self.device.release(conv.dev.pop())
            conv.host.pop()
        if not self.policy.retains_history:
            self._drop_everything(conv, count=True)
        elif conv.chunks:
            self.idle[conv.id] = conv
            self.idle_device[conv.id] = conv

    def forget(self, conversation_id) -> None:
        """A conversation that will never return: free all its chunks."""
        conv = self.conversations.pop(conversation_id, None)
        if conv is None:
            return
        assert not conv.active, conversation_id
        self._drop_everything(conv, count=False)

    # ------------------------------------------------------------------ ahead-of-time swap-out
    def swap_out_ahead(self, now: float, threshold: float) -> None:
        """Copy idle chunks to the host tier while fewer than `threshold` of device slots are free.

        Free here counts slots whose chunk already has a host copy: reclaiming them costs nothing.
        """
        if self.swap_out_idle(threshold):
            return
        short = threshold * self.device.capacity - (len(self.device.free) + self.clean_count)
        want = int(short) + self._device_batch  # overshoot by a batch so this runs every few steps
        queue = self._device_victims
        if self.whole_conversation:
            while want > 0:
                run = self._next_victim(queue, now, device=True)
                if run is None:
                    return
                moved = self._swap_out_run(run[0], run[1], now)
                if not moved:
                    return
                want -= moved
            return
        # Chunk-level policies: the common case, one call per victim run. Host room is made
        # a few dozen chunks at a time so a shortage of device victims drops little for nothing.
        free = self.host.free
        moved_total = 0
        while want > 0:
            if not free and not self._host_room(min(want, 64), now, exclude=None):
                break
            if not queue and not self._refill(queue, now, device=True):
                break
            conv, k, count = queue.popleft()
            if conv.active or conv.b != k:  # stale: restored, or evicted since it was scored
                continue
            take = min(count, len(conv.dev) - k, want, len(free))
            self._copy_to_host(conv, take)
            if take < count and conv.b < len(conv.dev):
                queue.appendleft((conv, conv.b, count - take))
            want -= take
            moved_total += take
        self.clean_count += moved_total
        self.stats.swap_out_chunks += moved_total
        self.stats.evictions_by_tier["device"] += moved_total
        self._compact_clean()

    def swap_out_idle(self, threshold: float, after_taking: int = 0) -> bool:
        """Whether `swap_out_ahead` would do nothing now (or once `after_taking` free or clean slots
        are taken): no host tier, enough room, or nothing idle to copy out (every device chunk is
        pinned). Taking a clean slot leaves its chunk's conversation idle, so only room changes."""
        if not self.host.capacity:
            return True
        short = threshold * self.device.capacity - (len(self.device.free) + self.clean_count - after_taking)
        return short <= 0 or not (self.idle_device or self._device_victims)

    # ------------------------------------------------------------------ slot acquisition
    def _obtain_device_slot(self, now: float) -> int:
        if self.device.free:
            return self.device.free.pop()
        slot = self._reclaim_clean()
        if slot >= 0:
            return slot
        return self._evict_device_chunk(now)

    def _obtain_device_slots(self, count: int, now: float) -> list[int]:
        """`count` device slots (fewer only if the tier runs out), exactly as `count` calls of
        `_obtain_device_slot` would give them, taken a run at a time."""
        free = self.device.free
        slots: list[int] = []
        while len(slots) < count:
            want = count - len(slots)
            if free:
                take = min(want, len(free))
                slots += free[:-take - 1:-1]  # what `take` pops would give, in their order
                del free[-take:]
            elif not self._reclaim_clean_slots(want, slots):
                slot = self._evict_device_chunk(now)
                if slot < 0:
                    break
                slots.append(slot)
        return slots

    def _reclaim_clean(self) -> int:
        """The device slot of the oldest swapped-out chunk still there, or -1."""
        slots: list[int] = []
        return slots[0] if self._reclaim_clean_slots(1, slots) else -1

    def _reclaim_clean_slots(self, most: int, slots: list[int]) -> int:
        """Append to `slots` the device slots of up to `most` of the oldest swapped-out chunks still
        there, in reclaim order; how many (0: none left).

        A queued chunk at position j is still reclaimable if its conversation is idle and j == h < b
        (the next chunk on both tiers); a run's chunks before h went already, and if h lies outside
        the run, or the conversation was restored, the whole run is stale.
        """
        clean = self._clean
        taken = 0
        while clean and taken < most:
            conv, k, count = clean[0]
            j = conv.h
            if conv.active or not k <= j < k + count or j >= conv.b:
                clean.popleft()
                self._clean_queued -= count
                continue
            take = min(most - taken, k + count - j, conv.b - j)
            slots += self._take_run(conv.dev, j, take)
            conv.h = j + take
            left = k + count - conv.h
            if left:
                clean[0] = (conv, conv.h, left)
            else:
                clean.popleft()
            self._clean_queued -= count - left
            taken += take
        self.clean_count -= taken
        self.stats.reclaimed_chunks += taken
        assert clean or self.clean_count == 0, self.clean_count
        return taken

    def _evict_device_chunk(self, now: float) -> int:
        """Evict one device-only chunk of an idle conversation (swap out, or drop); its slot or -1."""
        queue = self._device_victims
        while True:
            run = self._next_victim(queue, now, device=True)
            if run is None:
                return -1
            conv, count = run
            if self._swap_out_run(conv, 1, now):
                slot = self._reclaim_clean()
            else:
                # No host room for it: drop it. Its host-only chunks come earlier in eviction
                # order, so they are dropped first and the dropped chunks stay one run.
                # (No chunk is on both tiers here: the clean queue was empty.)
                assert conv.h == conv.b, "reclaim runs before eviction"
                if conv.d < conv.h:
                    self._drop_host_run(conv, conv.h - conv.d)
                slot = self._drop_device_run(conv, 1)
            if conv.b < len(conv.dev) and count > 1 and not self.whole_conversation:
                queue.appendleft((conv, conv.b, count - 1))
            return slot

    def _swap_out_run(self, conv: Conversation, count: int, now: float) -> int:
        """Copy up to `count` of the conversation's next device-only chunks to the host (a
        whole-conversation policy: all of them); the device copies stay until reclaimed."""
        n = len(conv.dev)
        if self.whole_conversation:
            count = n - conv.b
        count = min(count, self._host_room(count, now, exclude=conv))
        if count <= 0:
            return 0
        self._copy_to_host(conv, count)
        self.clean_count += count
        self.stats.swap_out_chunks += count
        self.stats.evictions_by_tier["device"] += count
        self._compact_clean()
        return count

    def _copy_to_host(self, conv: Conversation, count: int) -> None:
        """Record copies of the conversation's next `count` device-only chunks into free host slots;
        the device copies stay (clean) until their slots are reclaimed. The caller counts them."""
        n, dev, host, b = len(conv.dev), conv.dev, conv.host, conv.b
        free = self.host.free
        slots = free[:-count - 1:-1]  # what `count` pops would give, in their order
        del free[-count:]
        if self.trailing:  # the slices run against eviction order
            copied = dev[n - b - count:n - b]
            copied.reverse()
            host[n - b - count:n - b] = slots[::-1]
        else:
            copied = dev[b:b + count]
            host[b:b + count] = slots
        self.swap_out_ops.extend(zip(copied, slots))
        self._clean.append((conv, b, count))
        self._clean_queued += count
        conv.b += count
        if conv.b == n:
            del self.idle_device[conv.id]

    def _compact_clean(self) -> None:
        """Drop reclaim entries of conversations restored since they were queued, now and then."""
        if self._clean_queued > 4 * self.clean_count + 1024:
            kept = deque()
            for conv, k, count in self._clean:  # each run's chunks in [h, b) of an idle conversation
                if not conv.active:
                    first, end = max(k, conv.h), min(k + count, conv.b)
                    if first < end:
                        kept.append((conv, first, end - first))
            self._clean = kept
            self._clean_queued = sum(count for _, _, count in kept)

    def _host_room(self, count: int, now: float, exclude: Conversation | None) -> int:
        """Free up to `count` host slots by dropping host-only chunks by policy; how many are free."""
        free = self.host.free
        queue = self._host_victims
        if not self.host.capacity:
            return 0
        dropped = 0
        while len(free) < count:
            if not queue and not self._refill(queue, now, device=False):
                break
            conv, k, n_run = queue.popleft()
            if conv.active or conv.d != k:  # stale: restored, or dropped since it was scored
                continue
            n_run = min(n_run, conv.h - k)
            if n_run <= 0:
                continue
            if self.whole_conversation:
                # A conversation moves as one: dropping its own host chunks to make room for
                # the rest of it would only trade one part for another.
                if conv is exclude:
                    break
                self._drop_host_run(conv, n_run)
                continue
            # _drop_host_run, with the counting done once after the loop: this is the host
            # tier's hot path under pressure
            drop = min(n_run, count - len(free))
            free += self._take_run(conv.host, k, drop)
            n = len(conv.dev)
            conv.d = k + drop
            dropped += drop
            if conv.d == n:
                self.idle.pop(conv.id, None)
            elif drop < n_run:
                queue.appendleft((conv, conv.d, n_run - drop))
        if dropped:
            self.stats.dropped_chunks += dropped
            self.stats.evictions_by_tier["host"] += dropped
            self.dropped_this_step += dropped
        return min(count, len(free))

    # ------------------------------------------------------------------ layout moves
    def _drop_host_run(self, conv: Conversation, count: int) -> None:
        self.host.free += self._take_run(conv.host, conv.d, count)
        conv.d += count
        self._count_drops(conv, "host", count)

    def _take_run(self, slots: list[int], first: int, count: int) -> list[int]:
        """Take the slots of a conversation's chunks at eviction positions [first, first + count) out
        of its `dev` or `host` list (leaving -1 there), in eviction order."""
        if self.trailing:  # the slice runs against eviction order
            n = len(slots)
            taken = slots[n - first - count:n - first]
            taken.reverse()
            slots[n - first - count:n - first] = [-1] * count
        else:
            taken = slots[first:first + count]
            slots[first:first + count] = [-1] * count
        return taken

    def _drop_device_run(self, conv: Conversation, count: int) -> int:
        """Drop the next `count` device-only chunks (a whole-conversation policy: all); one freed slot."""
        n = len(conv.dev)
        if self.whole_conversation:
            count = n - conv.b
        slot = -1
        for k in range(conv.b, conv.b + count):
            i = n - 1 - k if self.trailing else k
            if slot >= 0:
                self.device.release(slot)
            slot = conv.dev[i]
            conv.dev[i] = -1
        conv.b += count
        conv.d = conv.h = conv.b
        if conv.b == n:
            del self.idle_device[conv.id]
        self._count_drops(conv, "device", count)
        return slot

    def _drop_everything(self, conv: Conversation, count: bool) -> None:
        """Free every chunk of a conversation on both tiers (`count`: as evictions, in the stats)."""
        for i in range(conv.chunks):
            dev, host = conv.dev[i], conv.host[i]
            if dev >= 0:
                self.device.release(dev)
            if host >= 0:
                self.host.release(host)
            if dev >= 0 and host >= 0:
                self.clean_count -= 1
            if count and (dev >= 0 or host >= 0):
                self.stats.dropped_chunks += 1
                self.dropped_this_step += 1
            conv.dev[i] = conv.host[i] = -1
        conv.d = conv.h = conv.b = conv.chunks
        self.idle.pop(conv.id, None)
        self.idle_device.pop(conv.id, None)

    def _count_drops(self, conv: Conversation, tier: str, count: int) -> None:
        self.stats.dropped_chunks += count
        self.stats.evictions_by_tier[tier] += count
        self.dropped_this_step += count
        if conv.d == conv.chunks:
            self.idle.pop(conv.id, None)

    # ------------------------------------------------------------------ victim selection
    def _next_victim(self, queue: deque, now: float, device: bool) -> tuple[Conversation, int] | None:
        """The next run of victim chunks on a tier, (conversation, count), refilling when empty.

        Queued runs are checked against the layout now, since conversations may have become
        active or lost chunks since the batch was scored.
        """
        for attempt in range(2):
            while queue:
                conv, k, count = queue.popleft()
                if conv.active:
                    continue
                if device:
                    if conv.b != k:
                        continue
                    count = min(count, len(conv.dev) - k)
                else:
                    if conv.d != k:
                        continue
                    count = min(count, conv.h - k)
                if count > 0:
                    return conv, count
            if attempt == 0 and not self._refill(queue, now, device):
                return None
        return None

    def _refill(self, queue: deque, now: float, device: bool) -> bool:
        """Queue the tier's `batch` lowest-scoring chunks as runs (one per conversation, by its lowest
        score); False if none.

        Ties go to the longer-idle conversation, then to the earlier chunk in eviction order.
        """
        budget = self._device_batch if device else self._host_batch
        candidates = (self.idle_device if device else self.idle).values()
        if self.whole_conversation:
            picked = self._pick_conversations(candidates, now, device, budget)
        else:
            picked = self._pick_chunks(candidates, now, device, budget)
        if not picked:
            return False
        # One run per conversation: only the first can continue the run at the queue's end.
        conv, k, count = picked[0]
        last = queue[-1] if queue else None
        if last is not None and last[0] is conv and last[1] + last[2] == k:
            queue[-1] = (conv, last[1], last[2] + count)  # extend the run
            queue.extend(itertools.islice(picked, 1, None))
        else:
            queue.extend(picked)
        return True

    def _pick_chunks(self, candidates, now: float, device: bool, budget: int) -> list:
        """The `budget` lowest (score, order, chunk) over the tier's evictable chunks, as one run per
        conversation, runs ascending by their lowest score.

        Conversations are visited longest-idle first, and a conversation's chunks score in
        nondecreasing order along eviction order. So once `budget` chunks are in hand, their
        budget-th smallest score `bound` prunes: a conversation contributes only its chunks that
        score under it, and the pass ends when the policy's score floor for the younger
        conversations left reaches `bound`. Conversations are read a block at a time and scored
        with numpy: a pass that visits hundreds of them spends most of its time on Python's
        per-conversation overhead otherwise. (A block is pruned with the bound it started with:
        looser, so it may collect more, never less; the picks are the same.)
        """
        if len(candidates) <= FEW_CANDIDATES:
            return self._pick_chunks_few(candidates, now, device, budget)
        policy = self.policy
        trailing = self.trailing
        conversations = iter(candidates)
        convs: list[Conversation] = []
        kept_orders, kept_firsts, kept_counts, kept_sizes, kept_idles = [], [], [], [], []
        scored = []  # per block: (values, owner, j) of its collected chunks
        held = 0
        bound = float("inf")
        seen = 0
        while True:
            block = list(itertools.islice(conversations, PICK_BLOCK))
            if not block:
                break
            size = len(block)
            positions = None
            if not device:
                # Many idle conversations hold nothing on the host alone: set them aside before
                # reading the rest (their place in the order still counts).
                positions = [i for i, c in enumerate(block) if c.d < c.h]
                if len(positions) < size:
                    if not positions:
                        seen += size
                        continue
                    block = [block[i] for i in positions]
                else:
                    positions = None
            idle = now - np.fromiter([c.last_active for c in block], float, len(block))
            if held >= budget and policy.score_floor(float(idle[0])) >= bound:
                break  # the longest idle of those left cannot beat the chunks in hand
            sizes = np.fromiter([len(c.dev) for c in block], int, len(block))
            if device:
                firsts = np.fromiter([c.b for c in block], int, len(block))
                span = np.minimum(sizes - firsts, budget)
            else:
                firsts = np.fromiter([c.d for c in block], int, len(block))
                span = np.minimum(np.fromiter([c.h for c in block], int, len(block)) - firsts, budget)
            if held >= budget:
                counts = policy.chunks_below_array(sizes, firsts, firsts + np.maximum(span, 0), idle, bound, trailing)
            else:
                counts = np.maximum(span, 0)
            kept = np.flatnonzero(counts)
            if len(kept):
                orders = (kept if positions is None else np.asarray(positions)[kept]) + seen
                block_args = (orders, firsts[kept], counts[kept], sizes[kept], idle[kept])
                for collected, part in zip((kept_orders, kept_firsts, kept_counts, kept_sizes, kept_idles), block_args):
                    collected.append(part)
                values, owner, j = self._score_chunks(*block_args)
                scored.append((values, owner + len(convs), j))
                convs += [block[i] for i in kept.tolist()]
                held += len(values)
                if held >= budget:
                    everything = np.concatenate([v for v, _, _ in scored]) if len(scored) > 1 else values
                    bound = float(np.partition(everything, budget - 1)[budget - 1])
            seen += size
        if not convs:
            return []
        orders, firsts, counts, sizes, idles = (np.concatenate(a).tolist() for a in (
            kept_orders, kept_firsts, kept_counts, kept_sizes, kept_idles))
        # A conversation's picks are a prefix of its collected chunks (its scores rise along eviction
        # order), so the batch is one run per conversation, queued by its lowest score. Chunk by chunk
        # the runs would interleave; a batch used up before anything changes evicts the same set
        # either way, and long runs cost a fraction of the bookkeeping of single chunks. A batch
        # used in part can take a conversation's later chunks before another's cheaper first ones:
        # the same kind of approximation as scoring in batches at all (a batch of 1 is exact). On
        # the sim-10k scenario at 0.6/s: miss rate 30.5% (runs), 30.6% (interleaved), 30.2% (exact).
        if held <= budget:  # every collected chunk is picked
            score = policy.score
            runs = sorted((score(n - 1 - first if trailing else first, t), order, first, count, conv)
                          for conv, order, first, count, n, t in zip(convs, orders, firsts, counts, sizes, idles))
            return [(conv, first, count) for _, _, first, count, conv in runs]
        values, owner, j = (np.concatenate(parts) for parts in zip(*scored))
        # Only chunks scoring at most the budget-th smallest score can be picked; sort just those.
        near = np.flatnonzero(values <= bound)
        values, owner, j = values[near], owner[near], j[near]
        order_of = np.asarray(orders)[owner]
        chosen_owner = owner[np.lexsort((j, order_of, values))[:budget]]
        owners, first_pick, picked = np.unique(chosen_owner, return_index=True, return_counts=True)
        owners, picked = owners[np.argsort(first_pick)], picked[np.argsort(first_pick)]
        starts = np.asarray(firsts)[owners]
        return list(zip([convs[o] for o in owners.tolist()], starts.tolist(), picked.tolist()))

    def _pick_chunks_few(self, candidates, now: float, device: bool, budget: int) -> list:
        """`_pick_chunks` for a handful of conversations (numpy's fixed costs would dominate): a k-way
        merge of their score-sorted chunk sequences, `budget` pops of a heap of one head per
        conversation. Same picks, same order, same runs."""
        score, trailing = self.policy.score, self.trailing
        heads = []
        for order, conv in enumerate(candidates):
            k, end = (conv.b, len(conv.dev)) if device else (conv.d, conv.h)
            if k < end:
                n, idle_s = len(conv.dev), now - conv.last_active
                heads.append((score(n - 1 - k if trailing else k, idle_s), order, k, end, n, idle_s, conv))
        heapq.heapify(heads)
        runs: dict[int, list] = {}  # order -> [first score, order, conversation, first chunk, count]
        for _ in range(budget):
            if not heads:
                break
            value, order, k, end, n, idle_s, conv = heads[0]
            run = runs.get(order)
            if run is None:
                runs[order] = [value, order, conv, k, 1]
            else:
                run[4] += 1
            if k + 1 < end:
                heapq.heapreplace(heads, (score(n - 2 - k if trailing else k + 1, idle_s), order, k + 1, end, n,
                                          idle_s, conv))
            else:
                heapq.heappop(heads)
        return [(conv, first, count) for _, _, conv, first, count in sorted(runs.values(), key=lambda r: r[:2])]

    def _score_chunks(self, orders, firsts, counts, sizes, idles):
        """Scores of every collected chunk: (values, index of its conversation, eviction-order position)."""
        counts_a = np.asarray(counts)
        owner = np.repeat(np.arange(len(counts)), counts_a)
        starts = np.cumsum(counts_a) - counts_a
        j = np.arange(len(owner)) - starts[owner] + np.asarray(firsts)[owner]
        index = np.asarray(sizes)[owner] - 1 - j if self.trailing else j
        values = self.policy.score_array(index, np.asarray(idles)[owner])
        return values, owner, j

    def _pick_conversations(self, candidates, now: float, device: bool, budget: int) -> list:
        """Whole-conversation policies: the lowest-scoring conversations' runs on the tier, ascending."""
        score, floor = self.policy.score, self.policy.score_floor
        best: list = []  # max-heap: (-score, -order, k, count, conv)
        held = 0  # chunks in `best`
        for order, conv in enumerate(candidates):
            k, end = (conv.b, len(conv.dev)) if device else (conv.d, conv.h)
            if k >= end:
                continue
            idle_s = now - conv.last_active
            if held >= budget and floor(idle_s) >= -best[0][0]:
                break
            value = score(len(conv.dev) - 1 - k if self.trailing else k, idle_s)
            heapq.heappush(best, (-value, -order, k, end - k, conv))
            held += end - k
            while held - best[0][3] >= budget:
                held -= heapq.heappop(best)[3]
        best.sort(reverse=True)
        return [(conv, k, count) for _, _, k, count, conv in best]

    # ------------------------------------------------------------------ checks
    def check_invariants(self) -> None:
        """Recount everything from scratch; raises AssertionError on any inconsistency (tests)."""
        ct = self.chunk_tokens
        dev_seen: set[int] = set()
        host_seen: set[int] = set()
        clean = active = 0
        for conv in self.conversations.values():
            n = conv.chunks
            assert len(conv.host) == n
            assert 0 <= conv.d <= conv.h <= conv.b <= n, (conv.id, conv.d, conv.h, conv.b, n)
            assert conv.kv_tokens <= conv.tokens
            # every computed token is covered by a chunk: on a tier, or dropped (never lost)
            assert n == -(-conv.kv_tokens // ct) or (conv.active and n * ct >= conv.kv_tokens), conv.id
            for k in range(n):
                i = n - 1 - k if self.trailing else k
                on_dev, on_host = conv.dev[i] >= 0, conv.host[i] >= 0
                expected = (False, False) if k < conv.d else (False, True) if k < conv.h else \
                    (True, True) if k < conv.b else (True, False)
                assert (on_dev, on_host) == expected, (conv.id, k, on_dev, on_host, conv.d, conv.h, conv.b)
                if on_dev:
                    assert conv.dev[i] not in dev_seen, "device slot used twice"
                    dev_seen.add(conv.dev[i])
                if on_host:
                    assert conv.host[i] not in host_seen, "host slot used twice"
                    host_seen.add(conv.host[i])
                clean += on_dev and on_host
            if conv.active:
                assert conv.d == conv.h == conv.b == 0, "an active conversation is entirely on the device"
                active += n
            else:
                assert (conv.id in self.idle) == (conv.d < n), conv.id
                assert (conv.id in self.idle_device) == (conv.b < n), conv.id
        assert clean == self.clean_count, (clean, self.clean_count)
        assert active == self.active_slots, (active, self.active_slots)
        assert len(dev_seen) + len(self.device.free) == self.device.capacity, "device tier over capacity"
        assert not dev_seen & set(self.device.free)
        limbo = set(self._host_limbo)
        assert len(host_seen) + len(self.host.free) + len(limbo) == self.host.capacity, "host tier over capacity"
        assert not host_seen & (set(self.host.free) | limbo)


def _tokens_in(chunks: slice, chunk_tokens: int, kv_tokens: int) -> int:
    """Computed tokens in a slice of a conversation's chunks: only its last chunk may be partial."""
    return min(chunks.stop * chunk_tokens, kv_tokens) - min(chunks.start * chunk_tokens, kv_tokens)


def _merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, length in spans:
        if length <= 0:
            continue
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1] = (merged[-1][0], merged[-1][1] + length)
        else:
            merged.append((start, length))
    return merged
