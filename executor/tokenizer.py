"""Text to token ids for chat: a byte-level tokenizer for random-weight models, and one turn's prompt ids.

A conversation's history is kept as token ids, never re-tokenized, so a new turn appends only
the ids that close the previous answer and open the new user message and the assistant's reply.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Stands for the previous answer when rendering a chat template: what follows it is the new turn's text.
_ANSWER_MARK = "\u2063PENSIEVE-ANSWER\u2063"


class ByteTokenizer:
    """UTF-8 bytes as ids 3..258 after pad 0, bos 1 and eos 2 (the random presets' special ids).

    Random-weight models ship no tokenizer; this gives them text in and (meaningless) text out.
    """

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    eos_token = None  # no text spells EOS, so no template text ever stands for it
    chat_template = None  # chats are rendered as plain "role: content" lines
    _OFFSET = 3
    vocab_size = _OFFSET + 256

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [b + self._OFFSET for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Bytes back to text; ids beyond the byte range (a random model samples them) read as U+FFFD."""
        out = bytearray()
        for i in ids:
            if self._OFFSET <= i < self.vocab_size:
                out.append(i - self._OFFSET)
            elif i >= self.vocab_size or not skip_special_tokens:
                out += "\ufffd".encode()
        return out.decode("utf-8", errors="replace")


def text_tokenizer(loaded: Any) -> Any:
    """The model's tokenizer, or bytes for random-weight models (which ship none); ValueError when the
    model's vocabulary is too small for bytes."""
    if loaded.tokenizer is not None:
        return loaded.tokenizer
    tokenizer = ByteTokenizer()
    if loaded.dims["vocab_size"] < tokenizer.vocab_size:
        raise ValueError(f"model {loaded.name} has no tokenizer and a vocabulary of {loaded.dims['vocab_size']}, "
                         f"too small for byte-level text ({tokenizer.vocab_size})")
    return tokenizer


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The tokenizer's chat template, or plain "role: content" lines for tokenizers without one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]], history_ids: Sequence[int],
                    eos_token_ids: frozenset[int]) -> list[int]:
    """Ids that append the last message of `messages` (the new user turn) to a conversation whose ids are `history_ids`.

    `messages` alternate user and assistant, ending with the new user message. After the first turn
    the template is rendered with a mark for the previous answer, and only the text after the mark
    is tokenized: the answer's ids stay exactly as sampled. An answer that ended with EOS has its
    end-of-message text already in the history.
    """
    if not history_ids:
        return tokenizer.encode(render_chat(tokenizer, messages, True), add_special_tokens=False)
    assert len(messages) >= 3 and messages[-2]["role"] == "assistant", "a later turn follows an answer"
    marked = [*messages[:-2], {"role": "assistant", "content": _ANSWER_MARK}, messages[-1]]
    rendered = render_chat(tokenizer, marked, True)
    text = rendered[rendered.rindex(_ANSWER_MARK) + len(_ANSWER_MARK):]
    eos = tokenizer.eos_token
    if history_ids[-1] in eos_token_ids and eos and text.startswith(eos):
        text = text[len(eos):]
    return tokenizer.encode(text, add_special_tokens=False)
