"""A lane: one conversation's live text as inspectable tokens, with what the cache saved it."""
from __future__ import annotations

from html import escape
from typing import Optional

from ui.colors import request_color
from ui.runs import ConversationRun
from ui.sampling_view import tokens_html

EMPTY_LANE = '<div class="lane-empty">Type a prompt and press Run, or fire a scenario above.</div>'


def lane_html(run: Optional[ConversationRun], eos_ids: Optional[set[int]] = None) -> str:
    """The lane's current state: header (request, status, cache), the user's turn, the reply."""
    if run is None:
        return EMPTY_LANE
    conv = run.conversation
    handle = run.handle
    turns = len(conv.turns)
    header = [f'<b>{escape(conv.label)}</b>']
    if turns > 1:
        header.append(f"turn {min(run.turn + 1, turns)} of {turns}")
    body = ""
    if handle is not None:
        status = handle.finish_reason or "streaming…"
        color = request_color(handle.request_id)
        header.append(f'<span class="dot" style="background:{color}"></span>{escape(handle.request_id)}')
        header.append(f'<span class="lane-status status-{escape(status.rstrip("…"))}">{escape(status)}</span>')
        header.append(f'<span class="lane-cache">cached {handle.cached_tokens} of {handle.prompt_tokens} prompt tokens</span>')
        header.append(f"{len(handle.choices)} tokens")
        user = conv.turns[min(run.turn, turns - 1)]
        short = user if len(user) <= 160 else user[:80] + " … " + user[-60:]
        body = (f'<div class="lane-user">{escape(short)}</div>'
                f'<div class="lane-text" data-tokens="{len(handle.choices)}">{tokens_html(list(handle.choices), eos_ids)}</div>')
    else:
        header.append('<span class="lane-status">queued…</span>')
    if run.error:
        body += f'<div class="lane-error">{escape(run.error)}</div>'
    return f'<div class="lane-head">{" · ".join(header)}</div>{body}'


def scenario_summary_html(title: str, runs: list[ConversationRun]) -> str:
    """One line for a whole scenario: progress and what the cache served."""
    handles = [r.handle for r in runs if r.handle is not None]
    done = sum(r.finished for r in runs)
    prompt = sum(h.prompt_tokens for h in handles)
    cached = sum(h.cached_tokens for h in handles)
    errors = sum(1 for r in runs if r.error)
    err = f' · <span class="lane-error">{errors} failed</span>' if errors else ""
    return (f'<div class="scenario-summary" id="scenario-summary"><b>{escape(title)}</b>: '
            f'<span id="scenario-done">{done}</span> of {len(runs)} conversations done · '
            f'cached {cached:,} of {prompt:,} prompt tokens so far (current turns){err}. '
            f'The first {min(4, len(runs))} stream in the lanes below.</div>')
