"""The benchmark workloads, shared by the CPU and GPU scripts and `python -m miniyaie bench`."""
from __future__ import annotations

SYSTEM_PROMPT = (
    "You are Mini-YAIE's help desk assistant, a patient teacher who explains how large language model "
    "inference engines work. You answer in plain English, in at most three short sentences, and you avoid "
    "jargon unless the user asks for it. When a question is about memory, mention the key-value cache; when "
    "it is about speed, mention batching. You never invent numbers: if you do not know a figure, you say so. "
    "You are friendly but brief. You may use one analogy per answer, taken from everyday life, such as a "
    "library, a kitchen or a post office. If a question is unclear, you ask one clarifying question instead "
    "of guessing. You always finish with a complete sentence and never trail off. Formatting: no lists, no "
    "headings, no code unless asked. Safety: refuse harmful requests politely and briefly."
)

QUESTIONS = [
    "What is a KV cache?", "Why does batching make inference faster?", "What is a radix tree?",
    "How does prefix caching save work?", "What is continuous batching?", "What does a tokenizer do?",
    "Why is decoding slower than prefill per token?", "What is paged attention?",
    "What happens when memory runs out?", "What is greedy decoding?", "What does temperature change?",
    "What is top-p sampling?", "Why share a system prompt between users?", "What is time to first token?",
    "What is a block in a paged KV cache?", "How does preemption work in an inference engine?",
]


def chat_burst_prompts(n: int = 16) -> list[list[dict]]:
    """n chats that share one ~200-token system prompt and differ in the question."""
    return [[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
            for i in range(n)]
