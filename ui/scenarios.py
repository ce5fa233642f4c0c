"""One-click scenarios: traffic patterns that show what the prefix cache and the scheduler do.

A scenario is plain data: a list of conversations (each one or more user turns). ``ui/runs.py``
sends them to the engine as real requests, all at once.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass(frozen=True)
class Conversation:
    """A user's turns, sent one after another (each turn carries the whole history so far)."""

    label: str
    turns: tuple[str, ...]
    system: Optional[str] = None
    raw: bool = False  # send the text as-is instead of through the chat template


@dataclass(frozen=True)
class ScenarioContext:
    """What a scenario may size itself by."""

    num_blocks: int
    block_size: int
    max_tokens: int  # from the sampling controls
    seed: int = 0


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    explains: str  # what to look for, shown under the buttons
    build: Callable[[ScenarioContext], list[Conversation]]
    max_tokens: Optional[int] = None  # overrides the control (few-shot answers are one word)
    stop: tuple[str, ...] = field(default_factory=tuple)


SYSTEM_PROMPT = (
    "You are Nimbus, the support assistant of Nimbus Cloud Storage. Nimbus offers three plans: Free "
    "(5 GB, one device, community support), Plus (200 GB, five devices, email support within 24 hours, "
    "version history for 30 days) and Pro (2 TB, unlimited devices, priority chat support, version history "
    "for 180 days, shared team folders and admin controls). All plans encrypt files at rest with AES-256 "
    "and in transit with TLS 1.3. Files deleted from any device stay in the trash for 30 days. Upgrades "
    "take effect immediately and are prorated; downgrades take effect at the end of the billing period. "
    "Refunds are available within 14 days of a charge. When you answer: be friendly and brief, answer "
    "in two or three sentences, never invent features, and suggest contacting a human agent for billing "
    "disputes or account recovery."
)
QUESTIONS = (
    "How much storage do I get on Plus?", "Can I share a folder with my team?", "How do I get a refund?",
    "Is my data encrypted?", "What happens when I delete a file?", "Can I use Nimbus on my phone and laptop?",
    "When does a downgrade start?", "I forgot my password and my email changed. What now?",
    "What's the difference between Plus and Pro?", "How long is version history kept?",
    "Do you support two-factor login?", "Will I lose files if I go back to Free?",
    "Is there a student discount?", "How fast is support on Pro?", "Can I restore last month's version?",
    "I was charged twice this month.",
)
FEW_SHOT_PREFIX = (
    "Classify the sentiment of each review as positive, negative or neutral.\n\n"
    "Review: The battery lasts all day and the screen is gorgeous.\nSentiment: positive\n\n"
    "Review: It stopped working after a week and support never answered.\nSentiment: negative\n\n"
    "Review: It arrived on Tuesday in a brown box.\nSentiment: neutral\n\n"
    "Review: Best pizza I've had in years, and the staff were lovely.\nSentiment: positive\n\n"
    "Review: The room smelled of smoke and the bed was broken.\nSentiment: negative\n\n"
    "Review: The meeting was moved to the second floor.\nSentiment: neutral\n\n"
)
NEW_REVIEWS = (
    "I would buy this again in a heartbeat.", "The app crashes every time I open it.",
    "The package contained two cables.", "Absolutely stunning views from the balcony.",
    "Cold food, rude waiter, never again.", "The train leaves at 9 a.m.",
    "My kids love it and so do I.", "Cheap plastic that cracked on day one.",
)
CHATS = (
    ("Plan a three-day trip to Lisbon for a first-time visitor.", "Make day two cheaper.", "Sum it all up in one line."),
    ("Explain what a hash table is.", "Show a tiny example in Python.", "What is its worst case?"),
    ("Suggest a name for a bakery that sells only bread.", "Give three more, a bit funnier.", "Which one is best and why?"),
    ("Write a haiku about autumn.", "Now one about winter.", "Which of the two is sadder?"),
)
WORDS = (
    "apple river stone cloud garden window silver market orange candle forest engine paper tiger "
    "harbor violin meadow pencil rocket castle shadow winter copper island lantern mirror planet "
    "saddle thunder velvet bridge canyon desert falcon glacier hammer jungle kettle ladder marble "
    "needle oyster pepper quartz ribbon spider tunnel umbrella valley walnut yellow zebra anchor "
    "basket cherry dragon feather guitar helmet iceberg jacket kitten lemon magnet noodle orbit "
    "parrot quiver rabbit sunset teapot unicorn volcano wizard xylophone yogurt zipper"
).split()


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _shared_system(ctx: ScenarioContext) -> list[Conversation]:
    return [Conversation(f"user {i + 1}", (q,), system=SYSTEM_PROMPT) for i, q in enumerate(QUESTIONS)]


def _few_shot(ctx: ScenarioContext) -> list[Conversation]:
    return [Conversation(f"review {i + 1}", (f"{FEW_SHOT_PREFIX}Review: {r}\nSentiment:",), raw=True)
            for i, r in enumerate(NEW_REVIEWS)]


def _multi_turn(ctx: ScenarioContext) -> list[Conversation]:
    return [Conversation(f"chat {i + 1}", turns) for i, turns in enumerate(CHATS)]


def _no_sharing(ctx: ScenarioContext) -> list[Conversation]:
    rng = random.Random(ctx.seed)
    # raw text: the chat template would give every prompt the same opening tokens
    return [Conversation(f"random {i + 1}", (f"{rng.randint(100, 999)} {_words(rng, 40)}",), raw=True) for i in range(12)]


def _memory_pressure(ctx: ScenarioContext) -> list[Conversation]:
    """Distinct long prompts whose total is about twice the pool: finished prompts' cached blocks
    must be evicted (and running requests may be preempted) to make room."""
    rng = random.Random(ctx.seed)
    pool_tokens = ctx.num_blocks * ctx.block_size
    n = 8
    tokens_each = max(32, min(1200, pool_tokens // 4))
    words = max(8, int(tokens_each * 0.55))  # random nouns are ~1.5-2 tokens each with the space
    return [Conversation(f"long {i + 1}", (f"Document {rng.randint(1000, 9999)}: {_words(rng, words)}\n\nSummary:",), raw=True)
            for i in range(n)]


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("shared_system", "16 users share one system prompt",
             "16 requests start with the same long system prompt. The first computes it; the rest find it "
             "in the radix tree (one node, many hits) and share its KV blocks (orange, with a reference count).",
             _shared_system),
    Scenario("few_shot", "Few-shot with shared examples",
             "8 classification prompts share six worked examples and differ only in the last review: "
             "almost the whole prompt is a cache hit.",
             _few_shot, max_tokens=4, stop=("\n",)),
    Scenario("multi_turn", "Multi-turn chat growing a conversation",
             "4 chats, 3 turns each. Every turn resends the whole conversation; the previous turns are "
             "already cached, so the tree grows one branch deeper per turn.",
             _multi_turn),
    Scenario("no_sharing", "No sharing (random prompts)",
             "12 unrelated prompts: nothing to reuse, hit rate stays near 0 and the tree fans out.",
             _no_sharing),
    Scenario("memory_pressure", "Memory pressure (forces eviction)",
             "8 long distinct documents that need about twice the KV pool: watch cached branches get evicted "
             "(grey crosses) and the block map fill up.",
             _memory_pressure, max_tokens=16),
)
SCENARIOS_BY_KEY = {s.key: s for s in SCENARIOS}
