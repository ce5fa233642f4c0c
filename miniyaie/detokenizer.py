"""Incremental detokenization that never emits half a character."""
from __future__ import annotations


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces.

    Byte-level BPE splits multi-byte characters (emoji, CJK) across tokens; decoding such a token
    alone gives U+FFFD. We decode a short window of recent tokens and only emit text once it no
    longer ends in U+FFFD (vLLM's prefix/read offsets). Cost per token: O(window), not O(length).
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        # a little prompt context, so a leading space or merge at the boundary decodes as it will
        self.tokens: list[int] = list(prompt_token_ids[-4:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; return the new text it completes (possibly '')."""
        self.tokens.append(token_id)
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
            self.text += new
            return new
        return ""
