"""The KV cache manager: conversations' chunks on a device tier and a host tier.

It owns both tiers' slots and every conversation's chunk layout (`pensieve.layout`), and records
the copies a backend must carry out (swap out device -> host, swap in host -> device) for the
step being planned. Which idle chunk goes next is retention order, answered exactly by the
victim indexes (`pensieve.victims`); the mechanics are here:
- eviction from the device tier copies a chunk to the host tier (swap-out) and frees its device
  slot; with no host room, or no host tier, the chunk is dropped;
- ahead-of-time swap-out copies chunks while the device tier is still fairly free and keeps the
  device copy until the slot is actually needed (lazy reclaim, in retention order), so eviction
  itself is free;
- the host tier, when full, drops chunks by the same policy;
- chunks of active conversations (an admitted request) are never touched.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .layout import computed_tokens, order_of
from .policies import EvictionPolicy
from .request import Conversation
from .tiers import SlotPool
from .victims import CLEAN, DEVICE_ONLY, HOST_ONLY, VictimIndex, check_index, index_for

# Ahead-of-time swap-out copies a fraction of the device tier past its shortfall (the scenario's
# scheduler.swap_out_batch, default below), and at least MIN_SWAP_OUT_BATCH chunks: a small device
# tier would otherwise run a swap-out pass at nearly every step.
SWAP_OUT_BATCH = 0.01
MIN_SWAP_OUT_BATCH = 64


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
    """Per-conversation chunk layout over two slot pools, driven by an eviction policy.

    `victim_index` is the class of the three victim indexes (device-only, clean, host-only
    chunks; see `pensieve.victims`); by default the one the policy's score shape allows.
    """

    def __init__(self, device_slots: int, host_slots: int, chunk_tokens: int, policy: EvictionPolicy,
                 max_context: int, bytes_per_chunk: int = 0, swap_out_batch: float = SWAP_OUT_BATCH,
                 victim_index: type[VictimIndex] | None = None) -> None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        if not 0 <= swap_out_batch < 1:
            raise ValueError(f"swap_out_batch must be a fraction in [0, 1), got {swap_out_batch}")
        self.chunk_tokens = chunk_tokens
        self.policy = policy
        self.max_chunks = -(-max_context // chunk_tokens)
        policy.bind(chunk_tokens, self.max_chunks)  # refuses a policy that breaks the contract
        self.device = SlotPool("device", device_slots)
        self.host = SlotPool("host", host_slots if policy.uses_host_tier else 0)
        self.bytes_per_chunk = bytes_per_chunk
        self.order = order_of(policy)
        self.whole_conversation = policy.unit == "conversation"
        self._notify = policy.per_conversation  # only such policies keep state the notifications feed
        self.conversations: dict[object, Conversation] = {}
        index = victim_index or index_for(policy)
        check_index(policy, index)
        self.device_victims = index(policy, self.order, DEVICE_ONLY)
        self.clean_victims = index(policy, self.order, CLEAN)
        self.host_victims = index(policy, self.order, HOST_ONLY)
        self._indexes = (self.device_victims, self.clean_victims, self.host_victims)
        self._releases = 0  # releases so far: the next one's number (retention order's tie-break)
        self.active_slots = 0  # device slots pinned by active conversations
        self.clean_count = 0  # device chunks that also have a host copy (reclaimable for free)
        # Ahead-of-time swap-out copies this many chunks past its shortfall, so that it runs every
        # few steps rather than at every step (0: one chunk past it).
        self.swap_out_batch = 1 if swap_out_batch == 0 else max(MIN_SWAP_OUT_BATCH, int(swap_out_batch * device_slots))
        # Host slots freed by this step's swap-ins stay unusable until the step ends, so a
        # swap-out planned in the same step never overwrites data a swap-in still has to read.
        self._host_limbo: list[int] = []
        self.stats = CacheStats()
        self.begin_step()

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
        return conv.host_end + new_chunks

    def can_acquire(self, conv: Conversation) -> bool:
        """Whether every chunk of `conv` fits on the device tier without touching active ones."""
        resident = conv.chunks - conv.host_end
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
        drop_end, host_end, copy_end = conv.drop_end, conv.host_end, conv.copy_end
        dev, host, order = conv.dev, conv.host, self.order
        conv.active = True
        for index in self._indexes:  # it leaves every index: nothing of it is evictable now
            index.update(conv)
        if self._notify:
            self.policy.on_admit(conv, now, n - drop_end)
        # Chunks on both tiers first: their device copy is used and the host copy freed.
        if copy_end > host_end:
            self.host.free += order.take(host, host_end, copy_end - host_end)
            self.clean_count -= copy_end - host_end
        # Every slot at once, from the same chunks one-by-one requests would evict: taking them changes
        # nothing that this conversation's own moves below depend on.
        needed = host_end + -(-conv.tokens // ct) - n
        slots = self._obtain_device_slots(needed, now)
        assert len(slots) == needed, "feasibility was checked"
        if host_end > drop_end:
            copied = order.take(host, drop_end, host_end - drop_end)
            self.swap_in_ops.extend(zip(copied, slots[drop_end:host_end]))
            self._host_limbo.extend(copied)
        order.put(dev, 0, slots[:host_end])  # dropped and host-only chunks get their device slots
        new = slots[host_end:]
        dev.extend(new)
        host.extend([-1] * len(new))
        self.active_slots += n - host_end + needed
        conv.drop_end = conv.host_end = conv.copy_end = 0
        dropped = order.indices(n, 0, drop_end)
        recomputed = computed_tokens(dropped, ct, kv)
        cpu = computed_tokens(order.indices(n, drop_end, host_end), ct, kv)
        self.stats.swap_in_chunks += host_end - drop_end
        spans = _merge_spans([(dropped.start * ct, recomputed), (kv, conv.tokens - kv)])
        return Restore(spans, kv - recomputed - cpu, cpu, recomputed, conv.tokens - kv, host_end - drop_end)

    def grow(self, conv: Conversation, now: float) -> bool:
        """Make room for the KV of position `kv_tokens` (a decode); False when nothing can be evicted."""
        return self.grow_all([conv], now) == 1

    def grow_all(self, convs: list[Conversation], now: float) -> int:
        """`grow` each of `convs` in turn until one fails; how many succeeded. The slots are taken
        in one go, from exactly the chunks one `grow` after another would evict."""
        ct = self.chunk_tokens
        needing = [conv for conv in convs if conv.kv_tokens >= conv.chunks * ct]
        slots = self._obtain_device_slots(len(needing), now) if needing else []
        for conv, slot in zip(needing, slots):
            conv.dev.append(slot)
            conv.host.append(-1)
        self.active_slots += len(slots)
        if len(slots) == len(needing):
            return len(convs)
        return convs.index(needing[len(slots)])  # the first that got no slot

    def release(self, conv: Conversation, now: float) -> None:
        """A request finished or was suspended: its conversation's chunks become evictable."""
        assert conv.active, conv.id
        conv.active = False
        conv.last_active = now
        conv.released = self._releases
        self._releases += 1
        if self._notify:
            self.policy.on_release(conv, now)
        self.active_slots -= conv.chunks
        # A decode suspended in the step that allocated its next chunk leaves that chunk empty.
        while conv.chunks * self.chunk_tokens - self.chunk_tokens >= conv.kv_tokens and conv.chunks:
            self.device.release(conv.dev.pop())
            conv.host.pop()
        if not self.policy.retains_history:
            self._drop_everything(conv, count=True)
        elif conv.chunks:
            self.device_victims.update(conv)  # all its chunks are on the device only

    def touch(self, conv: Conversation, now: float) -> None:
        """A turn of idle `conv` arrived and waits to be admitted: its idle time restarts at `now`, so that
        conversations nobody is waiting on are evicted ahead of it (queue-aware look-ahead)."""
        if conv.active:
            return
        self._unindex(conv)  # out of every index under its old release number ...
        conv.last_active = now
        conv.released = self._releases
        self._releases += 1
        for index in self._indexes:  # ... and back under the new one
            index.update(conv)

    def forget(self, conversation_id) -> None:
        """A conversation that will never return: free all its chunks."""
        conv = self.conversations.pop(conversation_id, None)
        if conv is None:
            return
        assert not conv.active, conversation_id
        self._drop_everything(conv, count=False)
        if self._notify:
            self.policy.on_forget(conv)

    def truncate(self, conversation_id, tokens: int) -> int:
        """An idle conversation goes on from its first `tokens` tokens only (a client edited or
        regenerated a later message): the KV of the chunks past them is freed on both tiers, the
        rest keeps its place. Returns the tokens whose KV is kept (computed or dropped-to-recompute);
        the tokens after them are computed with the next prompt.

        The kept chunks are a prefix in position order, hence a prefix (leading-first) or a suffix
        (trailing-first) of the eviction order, so the layout stays monotone and its three
        boundaries are the counts of dropped, host-only and both-tier chunks that remain.
        """
        conv = self.conversations.get(conversation_id)
        if conv is None:
            if tokens:
                raise ValueError(f"conversation {conversation_id!r} has no tokens to keep")
            return 0
        if conv.active:
            raise ValueError(f"conversation {conversation_id!r} has a request in flight; it cannot be truncated")
        if not 0 <= tokens <= conv.tokens:
            raise ValueError(f"conversation {conversation_id!r} has {conv.tokens} tokens; cannot keep {tokens}")
        kept_tokens = min(conv.kv_tokens, tokens)
        keep = -(-kept_tokens // self.chunk_tokens)
        n = conv.chunks
        if keep < n:
            had_chunks = conv.drop_end < n
            self._unindex(conv)  # out of every index while its layout changes
            for i in range(keep, n):
                self._free_chunk(conv.dev[i], conv.host[i])
            del conv.dev[keep:], conv.host[keep:]
            dropped = sum(1 for d, h in zip(conv.dev, conv.host) if d < 0 and h < 0)
            host_only = sum(1 for d, h in zip(conv.dev, conv.host) if d < 0 <= h)
            both = sum(1 for d, h in zip(conv.dev, conv.host) if d >= 0 and h >= 0)
            conv.drop_end, conv.host_end, conv.copy_end = dropped, dropped + host_only, dropped + host_only + both
            for index in self._indexes:
                index.update(conv)
            if self._notify and had_chunks and conv.drop_end == keep:
                self.policy.on_lost(conv)  # nothing of it is kept any more
        conv.tokens = tokens
        conv.kv_tokens = kept_tokens
        return kept_tokens

    # ------------------------------------------------------------------ ahead-of-time swap-out
    def swap_out_ahead(self, now: float, threshold: float) -> None:
        """Copy idle chunks to the host tier while fewer than `threshold` of device slots are free.

        Free here counts slots whose chunk already has a host copy: reclaiming them costs nothing.
        Chunks are copied in retention order, each into a free host slot or one freed by dropping
        the host's next victim. Copies never touch host-only chunks and drops never touch
        device-only ones, so taking the copies' victims and the drops' victims as two batches
        moves exactly what alternating one by one would.
        """
        if self.swap_out_idle(threshold):
            return
        short = threshold * self.device.capacity - (len(self.device.free) + self.clean_count)
        want = int(short) + self.swap_out_batch
        if self.whole_conversation:
            while want > 0:
                runs = self.device_victims.take(now, 1)
                if not runs:
                    return
                moved = self._swap_out_run(runs[0][0], runs[0][1], now)
                if not moved:
                    return
                want -= moved
            return
        victims = self.device_victims.take(now, want)
        found = sum(count for _, count in victims)
        room = self._host_room(found, now, exclude=None)
        if room < found:  # the first `room` victims, by retention order
            victims = self.device_victims.take(now, room)
        moved = 0
        for conv, count in victims:
            self._copy_to_host(conv, count)
            moved += count
        self.clean_count += moved
        self.stats.swap_out_chunks += moved
        self.stats.evictions_by_tier["device"] += moved

    def swap_out_idle(self, threshold: float, after_taking: int = 0) -> bool:
        """Whether `swap_out_ahead` would do nothing now (or once `after_taking` free or clean slots
        are taken): no host tier, enough room, or nothing idle to copy out (every device chunk is
        pinned). Taking a clean slot leaves its chunk's conversation idle, so only room changes."""
        if not self.host.capacity:
            return True
        short = threshold * self.device.capacity - (len(self.device.free) + self.clean_count - after_taking)
        return short <= 0 or not len(self.device_victims)

    # ------------------------------------------------------------------ slot acquisition
    def _obtain_device_slots(self, count: int, now: float) -> list[int]:
        """`count` device slots (fewer only if the tier runs out): free ones first, then the slots
        of clean chunks (their host copy stays), then by evicting device-only chunks, each source
        in its victims' retention order: exactly the chunks `count` requests of one slot would free
        (the slots come grouped by conversation, in the order of each one's first victim)."""
        free = self.device.free
        slots: list[int] = []
        while len(slots) < count:
            want = count - len(slots)
            if free:
                take = min(want, len(free))
                slots += free[:-take - 1:-1]  # what `take` pops would give, in their order
                del free[-take:]
            elif self.clean_count:
                self._reclaim(want, now, slots)
            elif not self._evict_device(want, now, slots):
                break
        return slots

    def _reclaim(self, most: int, now: float, slots: list[int]) -> None:
        """Append to `slots` the device slots of up to `most` clean chunks, in retention order."""
        taken = 0
        order = self.order
        for conv, count in self.clean_victims.take(now, most):
            count = min(count, most - taken)  # a whole-conversation policy's run may be longer
            host_end = conv.host_end
            slots += order.take(conv.dev, host_end, count)
            conv.host_end = host_end + count
            taken += count
            self.clean_victims.update(conv)
            if conv.drop_end == host_end:  # it had no host-only chunks: now it has
                self.host_victims.update(conv)
        self.clean_count -= taken
        self.stats.reclaimed_chunks += taken

    def _evict_device(self, want: int, now: float, slots: list[int]) -> bool:
        """Free device slots (there are no free or clean ones) by evicting the next device-only victims:
        copied to the host and reclaimed, or dropped with no host room. False if none is left.

        With a host tier, one victim at a time: each copy may need a host drop, and the chunk it
        copies is host-only once reclaimed, so the next drop may take it.
        """
        if not self.host.capacity:
            victims = self.device_victims.take(now, want)
            for conv, count in victims:
                if self.whole_conversation:
                    self.device.free += self._drop_device_run(conv, count)  # popped last-first, as before
                else:
                    slots += self._drop_device_run(conv, count)
            return bool(victims)
        victims = self.device_victims.take(now, 1)
        if not victims:
            return False
        [(conv, count)] = victims
        if self._swap_out_run(conv, count, now):
            self._reclaim(1, now, slots)
            return True
        # No host room for it: drop it. Its host-only chunks come earlier in eviction order, so
        # they are dropped first and the dropped chunks stay one run. (No chunk is on both tiers:
        # there was nothing clean to reclaim.)
        assert conv.host_end == conv.copy_end, "reclaim runs before eviction"
        if conv.drop_end < conv.host_end:
            self._drop_host_run(conv, conv.host_end - conv.drop_end)
        taken = self._drop_device_run(conv, count)
        if self.whole_conversation:
            self.device.free += taken
        else:
            slots += taken
        return True

    def _swap_out_run(self, conv: Conversation, count: int, now: float) -> int:
        """Copy up to `count` of the conversation's next device-only chunks to the host (a
        whole-conversation policy: all of them, as far as host room allows); the device copies
        stay until reclaimed. How many were copied."""
        if self.whole_conversation:
            count = len(conv.dev) - conv.copy_end
        count = min(count, self._host_room(count, now, exclude=conv))
        if count <= 0:
            return 0
        self._copy_to_host(conv, count)
        self.clean_count += count
        self.stats.swap_out_chunks += count
        self.stats.evictions_by_tier["device"] += count
        return count

    def _copy_to_host(self, conv: Conversation, count: int) -> None:
        """Record copies of the conversation's next `count` device-only chunks into free host slots;
        the device copies stay (clean) until their slots are reclaimed. The caller counts them."""
        assert count > 0, count  # del free[-0:] would empty the free list
        free = self.host.free
        slots = free[:-count - 1:-1]  # what `count` pops would give, in their order
        del free[-count:]
        order, copy_end = self.order, conv.copy_end
        self.swap_out_ops.extend(zip(order.read(conv.dev, copy_end, count), slots))
        order.put(conv.host, copy_end, slots)
        conv.copy_end = copy_end + count
        self.device_victims.update(conv)
        if conv.host_end == copy_end:  # it had no clean chunks: now it has
            self.clean_victims.update(conv)

    def _host_room(self, count: int, now: float, exclude: Conversation | None) -> int:
        """Free up to `count` host slots by dropping host-only chunks in retention order; how many are free.

        A whole-conversation policy never drops the conversation it makes room for (`exclude`):
        dropping its own host chunks to make room for the rest of it would only trade one part
        for another.
        """
        if not self.host.capacity:
            return 0
        free = self.host.free
        need = count - len(free)
        if need > 0:
            order = self.order
            dropped = 0
            for conv, drop in self.host_victims.take(now, need):
                if conv is exclude and self.whole_conversation:
                    break
                free += order.take(conv.host, conv.drop_end, drop)
                conv.drop_end += drop
                dropped += drop
                self.host_victims.update(conv)
                self._check_lost(conv)
            self._count_drops("host", dropped)
        return min(count, len(free))

    # ------------------------------------------------------------------ layout moves
    def _drop_host_run(self, conv: Conversation, count: int) -> None:
        self.host.free += self.order.take(conv.host, conv.drop_end, count)
        conv.drop_end += count
        self.host_victims.update(conv)
        self._count_drops("host", count)
        self._check_lost(conv)

    def _drop_device_run(self, conv: Conversation, count: int) -> list[int]:
        """Drop the next `count` device-only chunks (a whole-conversation policy: all of them), which
        must follow no host copies; their device slots, in eviction order."""
        if self.whole_conversation:
            count = len(conv.dev) - conv.copy_end
        taken = self.order.take(conv.dev, conv.copy_end, count)
        conv.drop_end = conv.host_end = conv.copy_end = conv.copy_end + count
        self.device_victims.update(conv)
        self._count_drops("device", count)
        self._check_lost(conv)
        return taken

    def _drop_everything(self, conv: Conversation, count: bool) -> None:
        """Free every chunk of a conversation on both tiers (`count`: as evictions, in the stats)."""
        for i in range(conv.chunks):
            held = self._free_chunk(conv.dev[i], conv.host[i])
            if count and held:
                self.stats.dropped_chunks += 1
                self.dropped_this_step += 1
            conv.dev[i] = conv.host[i] = -1
        conv.drop_end = conv.host_end = conv.copy_end = conv.chunks
        for index in self._indexes:
            index.update(conv)
        self._check_lost(conv)

    def _free_chunk(self, dev: int, host: int) -> bool:
        """Release one chunk's slots on both tiers (-1: none there); whether it held any."""
        if dev >= 0:
            self.device.release(dev)
        if host >= 0:
            self.host.release(host)
        if dev >= 0 and host >= 0:
            self.clean_count -= 1
        return dev >= 0 or host >= 0

    def _unindex(self, conv: Conversation) -> None:
        """Take an idle conversation out of every victim index (an active one is in none); the caller
        changes it and files it again with `index.update`."""
        conv.active = True
        for index in self._indexes:
            index.update(conv)
        conv.active = False

    def _check_lost(self, conv: Conversation) -> None:
        """Tell a policy that keeps per-conversation state when a conversation's last kept chunk goes."""
        if self._notify and conv.drop_end == len(conv.dev) and conv.dev:
            self.policy.on_lost(conv)

    def _count_drops(self, tier: str, count: int) -> None:
        if count:
            self.stats.dropped_chunks += count
            self.stats.evictions_by_tier[tier] += count
            self.dropped_this_step += count

    # ------------------------------------------------------------------ checks
    def check_invariants(self) -> None:
        """Recount everything from scratch, the victim indexes included; AssertionError on any
        inconsistency (tests)."""
        ct = self.chunk_tokens
        dev_seen: set[int] = set()
        host_seen: set[int] = set()
        clean = active = 0
        for conv in self.conversations.values():
            n = conv.chunks
            assert len(conv.host) == n
            drop_end, host_end, copy_end = conv.drop_end, conv.host_end, conv.copy_end
            assert 0 <= drop_end <= host_end <= copy_end <= n, (conv.id, drop_end, host_end, copy_end, n)
            assert conv.kv_tokens <= conv.tokens
            # every computed token is covered by a chunk: on a tier, or dropped (never lost)
            assert n == -(-conv.kv_tokens // ct) or (conv.active and n * ct >= conv.kv_tokens), conv.id
            for k in range(n):
                i = self.order.index(n, k)
                on_dev, on_host = conv.dev[i] >= 0, conv.host[i] >= 0
                expected = (False, False) if k < drop_end else (False, True) if k < host_end else \
                    (True, True) if k < copy_end else (True, False)
                assert (on_dev, on_host) == expected, (conv.id, k, on_dev, on_host, drop_end, host_end, copy_end)
                if on_dev:
                    assert conv.dev[i] not in dev_seen, "device slot used twice"
                    dev_seen.add(conv.dev[i])
                if on_host:
                    assert conv.host[i] not in host_seen, "host slot used twice"
                    host_seen.add(conv.host[i])
                clean += on_dev and on_host
            if conv.active:
                assert drop_end == host_end == copy_end == 0, "an active conversation is entirely on the device"
                active += n
            else:
                assert conv.released >= 0 or n == 0, conv.id
        for index in self._indexes:
            index.check(self.conversations)
        assert clean == self.clean_count, (clean, self.clean_count)
        assert active == self.active_slots, (active, self.active_slots)
        assert len(dev_seen) + len(self.device.free) == self.device.capacity, "device tier over capacity"
        assert not dev_seen & set(self.device.free)
        limbo = set(self._host_limbo)
        assert len(host_seen) + len(self.host.free) + len(limbo) == self.host.capacity, "host tier over capacity"
        assert not host_seen & (set(self.host.free) | limbo)


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
