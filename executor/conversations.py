"""Built-in multi-turn conversations for `pensieve compare`: short, realistic user messages per turn."""

from __future__ import annotations

CONVERSATIONS: list[list[str]] = [
    [
        "I'm planning a three-day trip to Lisbon in spring. What should I see?",
        "Which of those places are best on a rainy day?",
        "How do I get from the airport to the city centre?",
        "Can you suggest a typical Portuguese dish to try for dinner?",
        "What is a polite way to ask for the bill in Portuguese?",
        "Summarise the plan for day one in three bullet points.",
    ],
    [
        "Explain what a hash table is in simple terms.",
        "Why do collisions happen, and how are they handled?",
        "What is the average time complexity of a lookup?",
        "Show me a tiny Python example that counts words with a dict.",
        "How would I make that example ignore upper and lower case?",
        "When would a sorted list be a better choice than a hash table?",
    ],
    [
        "I want to start running. How often should a beginner run each week?",
        "My knees hurt after running. What could be the cause?",
        "What should I eat before a morning run?",
        "How long should a warm-up take?",
        "Can you write a four-week plan to reach five kilometres?",
        "How do I stay motivated when the weather is bad?",
    ],
    [
        "Help me write a short email asking my manager for a day off next Friday.",
        "Make it a bit more formal.",
        "Now add a sentence saying my tasks will be covered by a colleague.",
        "Suggest a subject line for the email.",
        "How should I follow up if I get no answer in two days?",
        "Thanks! Can you shorten the whole email to three sentences?",
    ],
    [
        "What causes the seasons on Earth?",
        "So why is it not warmest when Earth is closest to the Sun?",
        "How does the length of a day change over the year?",
        "What happens at the equinoxes?",
        "Are the seasons reversed in the southern hemisphere?",
        "Explain it all again for a ten-year-old in two sentences.",
    ],
]

FOLLOW_UPS = ["Can you give an example?", "Why is that?", "Tell me more.", "Can you say that more simply?"]


def sample_conversations(count: int, turns: int) -> list[list[str]]:
    """`count` conversations of `turns` user messages, cycling the built-in ones and generic follow-ups."""
    if count < 1 or turns < 1:
        raise ValueError(f"need at least one conversation and one turn, got {count} and {turns}")
    out = []
    for c in range(count):
        base = CONVERSATIONS[c % len(CONVERSATIONS)]
        extra = [FOLLOW_UPS[t % len(FOLLOW_UPS)] for t in range(max(0, turns - len(base)))]
        out.append((base + extra)[:turns])
    return out
