"""Generated text as tokens you can inspect: each token is a span coloured by the probability the
sampler gave it, carrying its top-k candidates (after temperature / top-k / top-p) as data that
``assets/app.js`` shows in a popup on hover or click. Pure functions, HTML out."""
from __future__ import annotations

import json
import math
from html import escape
from typing import Optional, Sequence

from miniyaie.request import TokenChoice
from ui.colors import PROBABILITY_LEGEND, probability_color


def chosen_probability(choice: TokenChoice) -> float:
    """Probability of the sampled token: from the top-k list when it is there (exact), else from
    its logprob (it was drawn from the tail)."""
    for token_id, _, p in choice.top:
        if token_id == choice.token_id:
            return p
    return math.exp(choice.logprob) if math.isfinite(choice.logprob) else 0.0


def distribution(choice: TokenChoice) -> list[dict]:
    """The popup's rows: top candidates, chosen one marked, plus the chosen one if it was outside."""
    rows = [{"t": text, "p": round(p, 4), "c": token_id == choice.token_id} for token_id, text, p in choice.top]
    if not any(r["c"] for r in rows):
        rows.append({"t": choice.text, "p": round(chosen_probability(choice), 4), "c": True})
    return rows


def _visible(text: str) -> str:
    return escape(text).replace("\n", "↵<br>")


def tokens_html(choices: Sequence[TokenChoice], eos_ids: Optional[set[int]] = None, final_text: Optional[str] = None) -> str:
    """One span per generated token. ``final_text`` (the detokenized text) is used as a tooltip-free
    fallback when there are no choices to show (e.g. an error)."""
    if not choices:
        return f'<span class="tok-plain">{escape(final_text or "")}</span>'
    parts = []
    for i, choice in enumerate(choices):
        p = chosen_probability(choice)
        special = eos_ids is not None and choice.token_id in eos_ids
        label = "⏹" if special else _visible(choice.text) or "∅"
        data = escape(json.dumps(distribution(choice), ensure_ascii=False), quote=True)
        parts.append(
            f'<span class="tok{" tok-special" if special else ""}" tabindex="0" data-i="{i}" '
            f'data-p="{p:.4f}" data-top="{data}" style="background:{probability_color(p)}">{label}</span>')
    return "".join(parts)


def probability_legend_html() -> str:
    cells = "".join(f'<span class="legend-chip" style="background:{c}">{label}</span>' for label, c in PROBABILITY_LEGEND)
    return (f'<div class="prob-legend">Token colour = probability the sampler gave the chosen token: {cells}'
            f' · hover or click a token to see its top candidates.</div>')
