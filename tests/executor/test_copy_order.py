"""The order a step's copies are issued in: per layer, the swap-outs whose slots the step refills, then
the swap-ins, then the layer's event; ahead-of-time copies after every layer. Checked on the pure
order, on the CPU's copies, on the CUDA issuing code through a recording stand-in, and on the
core's plans (which swap-outs are which)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from executor import kv_store
from executor.kv_store import CopyOp, PagedKVStore, copy_order
from tests.pensieve.helpers import Driver, make_core


def test_each_layer_waits_only_for_its_own_copies_and_ahead_of_time_copies_come_last() -> None:
    order = copy_order(3, [(5, 2, 1)], [(7, 5, 1), (8, 9, 2)], [(11, 4, 1)])
    position = {(op.kind, op.layer): i for i, op in enumerate(order)}
    for layer in range(3):
        assert position["out", layer] < position["in", layer] < position["event", layer]
        if layer:
            assert position["event", layer - 1] < position["out", layer]
    assert [op.kind for op in order[-2:]] == ["ahead", "event"] and order[-2].layer is None
    assert copy_order(2, [], [], [(1, 1, 1)]) == [CopyOp("ahead", None, ((1, 1, 1),)), CopyOp("event", None)]
    assert copy_order(2, [], [], []) == []


def store(device_slots: int = 12, host_slots: int = 8) -> PagedKVStore:
    s = PagedKVStore(device_slots, host_slots, layers=2, kv_heads=1, head_dim=2, chunk_tokens=2,
                     dtype=torch.float32, device="cpu")
    s.device_pool.copy_(torch.arange(s.device_pool.numel(), dtype=torch.float32).view_as(s.device_pool))
    s.host_pool.copy_(-torch.arange(s.host_pool.numel(), dtype=torch.float32).view_as(s.host_pool))
    return s


def test_a_slot_swapped_out_and_refilled_in_one_step_keeps_both_chunks() -> None:
    s = store()
    before_dev, before_host = s.device_pool.clone(), s.host_pool.clone()
    s.copy_step(urgent_out=[(5, 2)], swap_in=[(7, 5)], ahead_out=[(9, 3)])
    assert torch.equal(s.host_pool[:, 2], before_dev[:, 5])  # out first ...
    assert torch.equal(s.device_pool[:, 5], before_host[:, 7])  # ... then the slot refilled
    assert torch.equal(s.host_pool[:, 3], before_dev[:, 9]) and torch.equal(s.device_pool[:, 9], before_dev[:, 9])


class Recorder:
    """Stands in for torch.cuda's streams and events: what the store issues, in order."""

    def __init__(self) -> None:
        self.log: list[tuple] = []

    def event(self):
        recorder = self

        class Event:
            def record(self, stream) -> None:
                recorder.log.append(("event", id(self)))
        return Event()


def test_the_cuda_path_issues_copies_and_events_in_copy_order(monkeypatch: pytest.MonkeyPatch) -> None:
    s = store()
    rec = Recorder()

    class Stream:
        def wait_stream(self, other) -> None:
            rec.log.append(("copy stream waits for compute",))

    class Compute:
        def wait_event(self, event) -> None:
            rec.log.append(("compute waits", id(event)))

    compute = Compute()
    monkeypatch.setattr(torch.cuda, "Event", rec.event)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    original = torch._foreach_copy_

    def recording_copy(targets, sources, non_blocking=False):
        host = s.host_pool
        for target in targets:
            inside = host.data_ptr() <= target.data_ptr() < host.data_ptr() + host.numel() * host.element_size()
            rec.log.append(("copy to", "host" if inside else "device", len(targets)))
        return original(targets, sources, non_blocking=False)

    s._copy_stream = Stream()
    monkeypatch.setattr(torch, "_foreach_copy_", recording_copy)
    events = s.copy_step(urgent_out=[(5, 2)], swap_in=[(7, 5)], ahead_out=[(9, 3)])
    monkeypatch.setattr(torch, "_foreach_copy_", original)
    kinds = [entry[0] if entry[0] != "copy to" else f"to {entry[1]}" for entry in rec.log]
    assert all(entry[2] == 1 for entry in rec.log if entry[0] == "copy to")  # one call per layer and direction
    assert kinds == ["copy stream waits for compute",
                     "to host", "to device", "event",  # layer 0: refilled slot out, swap-in, event
                     "to host", "to device", "event",  # layer 1
                     "to host", "event"]  # ahead of time, all layers at once
    assert len(events) == 2 and s._layer_events == events and s._ahead_done is not None
    rec.log.clear()
    s.copy_step([], [], [])  # the next step: its forward must not write a slot those copies still read
    assert rec.log == [("compute waits", rec_id := rec.log[0][1])] and rec_id
    assert s._ahead_done is None


@pytest.mark.parametrize("policy", ["pensieve", "lru", "trailing-lru", "conversation-lru"])
def test_plans_tell_refilled_slots_swap_outs_from_ahead_of_time_copies(policy) -> None:
    d = Driver(make_core(policy, 24, 16, threshold=0.4))
    urgent = ahead = 0
    for i in range(35):
        d.add(f"c{i % 7}", i // 7, float(i), 5 + (i % 3) * 2, 3)
        for _ in range(6):
            plan, _ = d.step(float(i) + 0.01 * _)
            cache = d.sched.cache
            active = {slot for conv in cache.conversations.values() if conv.active for slot in conv.dev}
            refilled = {dst for _, dst in plan.swap_in} | active
            # A slot this step writes (a swap-in's or one of its own chunks) that was copied out first
            # must have been copied among the urgent ones (a whole-conversation policy also copies its
            # other chunks then: urgent but harmless).
            urgent_slots = {dev for dev, _host in plan.urgent_swap_out}
            for dev, _host in plan.swap_out:
                if dev in refilled:
                    assert dev in urgent_slots
            for dev, _host in plan.ahead_swap_out:
                assert dev not in refilled  # an idle chunk's copy: nothing this step writes there
            urgent += len(plan.urgent_swap_out)
            ahead += len(plan.ahead_swap_out)
            if plan.empty:
                break
        d.sched.cache.check_invariants()
    assert urgent and ahead  # both kinds happened


def test_a_layer_s_copies_in_one_direction_are_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    s = store(device_slots=20, host_slots=12)
    calls = []
    original = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda t, src, non_blocking=False: calls.append(len(t)) or
                        original(t, src, non_blocking=non_blocking))
    before = s.device_pool.clone()
    scattered = [(1, 0), (4, 3), (9, 7), (15, 11)]  # four runs: no two slots are neighbours on both sides
    s.copy_step(urgent_out=scattered, swap_in=[])
    assert calls == [4, 4]  # one call per layer (2 layers), each copying the 4 runs
    assert torch.equal(s.host.gather([0, 3, 7, 11]), before[:, [1, 4, 9, 15]])
