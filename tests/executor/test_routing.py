"""Which conversation an API request continues: the chunk-hash index against its brute-force scan,
sessions, the share rule, the idle limit; and text handed out as tokens arrive."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from executor.serving.detokenize import IncrementalText
from executor.serving.routing import ConversationRouter, PrefixIndex, longest_prefix_scan
from executor.tokenizer import ByteTokenizer

CT = 4

# Conversations over a tiny alphabet share long prefixes often, which is what the index must get right.
ids_lists = st.lists(st.integers(0, 2), min_size=0, max_size=24)


@settings(max_examples=300, deadline=None)
@given(st.lists(ids_lists, min_size=0, max_size=8), ids_lists, st.lists(st.integers(0, 7), max_size=4))
def test_the_index_finds_what_the_scan_finds(conversations, request_ids, removed) -> None:
    index = PrefixIndex(CT)
    for i, ids in enumerate(conversations):
        index.add(f"c{i}", ids)
    for i in removed:
        index.remove(f"c{i}")
    for i in removed[:1]:  # re-added: now the most recent
        if i < len(conversations):
            index.add(f"c{i}", conversations[i])
    expected = longest_prefix_scan(index.ids.items(), request_ids, at_least=CT)
    assert index.longest_prefix(request_ids) == expected


def test_a_session_keeps_its_conversation_and_waits_for_its_turn() -> None:
    router = ConversationRouter(CT)
    first = router.route([1, 2, 3, 4, 5], session="a")
    assert first.conversation_id == "session:a" and first.keep == 0
    assert router.route([1, 2, 3, 4, 5, 6], session="a") is None  # its first turn is in flight
    router.finished("session:a", [1, 2, 3, 4, 5, 9, 9])
    again = router.route([1, 2, 3, 4, 5, 9, 9, 7], session="a")
    assert again.conversation_id == "session:a" and again.keep == 7
    router.finished("session:a", [1, 2, 3, 4, 5, 9, 9, 7, 8])
    assert router.route([1, 2, 3, 0], session="a").keep == 3  # an edit: the common prefix only
    router.finished("session:a", [1, 2, 3, 0, 5])
    # Anonymous requests never take a session's conversation.
    assert router.route([1, 2, 3, 0, 5, 6]).conversation_id.startswith("conversation:")


def test_anonymous_requests_continue_by_prefix_unless_it_is_a_short_shared_start() -> None:
    router = ConversationRouter(CT, min_share=0.5)
    a = router.route(list(range(12)))
    router.finished(a.conversation_id, list(range(16)))
    follow = router.route(list(range(16)) + [99])
    assert follow.conversation_id == a.conversation_id and follow.keep == 16
    router.finished(a.conversation_id, list(range(20)))
    # 5 of its 20 tokens in common: a new conversation, the old one left alone
    other = router.route(list(range(5)) + [50] * 10)
    assert other.conversation_id != a.conversation_id and other.keep == 0
    router.finished(other.conversation_id, list(range(5)) + [50] * 12)
    # 12 of 20 in common: an edit of that conversation
    edit = router.route(list(range(12)) + [60] * 4)
    assert edit.conversation_id == a.conversation_id and edit.keep == 12
    # a request equal to a kept history still computes its last token
    router.finished(a.conversation_id, list(range(12)) + [60] * 4)
    same = router.route(list(range(12)) + [60] * 4)
    assert same.conversation_id == a.conversation_id and same.keep == 15


def test_idle_conversations_past_the_limit_are_forgotten_oldest_first() -> None:
    router = ConversationRouter(CT, max_idle=2)
    forgotten = []
    for i in range(4):
        route = router.route([i] * 8, session=f"s{i}" if i % 2 else None)
        forgotten += router.finished(route.conversation_id, [i] * 9)
    assert forgotten == ["conversation:0", "session:s1"]


def test_text_is_handed_out_when_final_and_never_past_a_stop_string() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("héllo wörld, and more")
    text = IncrementalText(tok, stop=["ld,"])
    pieces = [text.add(t) for t in ids]
    assert text.stopped and "".join(pieces) == "héllo wör"
    assert text.finish() == ""
    # a character split over two tokens waits for its second byte
    plain = IncrementalText(tok)
    first, second = tok.encode("é")
    assert plain.add(first) == "" and plain.add(second) == "é"
    # held-back text that turned out not to be a stop string comes out at the end
    held = IncrementalText(tok, stop=["xyz"])
    out = "".join(held.add(t) for t in tok.encode("abcx"))
    assert out + held.finish() == "abcx" and not held.stopped
