"""Incremental detokenization and stop-string handling for one sequence."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

# Prompt tokens kept as left context, so that the first output token decodes with the spacing it
# has in the running text (sentencepiece drops a leading space at the start of a decode).
PROMPT_CONTEXT_TOKENS = 5


def decoder_for(tokenizer, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """ids -> text as `tokenizer.decode` gives it. For a fast (Rust-backed) tokenizer whose decode
    does no clean-up of the text, its backend's decode is called directly: transformers' decode
    spends ~20 us a call converting its argument, which at a few hundred sequences made the
    detokenizing most of an engine step's host time (two decodes per sequence per step)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    clean_up = getattr(tokenizer, "clean_up_tokenization_spaces", True)
    if clean_up and backend is not None and type(backend.model).__name__ == "BPE":  # transformers skips it for BPE
        clean_up = bool(getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output",
                                False))
    if backend is None or clean_up:
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back incomplete characters."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool):
        self._decode = decoder_for(tokenizer, skip_special_tokens)
        self.ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ('' while a character is incomplete)."""
        self.ids.append(token_id)
        return self._advance(hold_incomplete=True)

    def flush(self) -> str:
        """Text still held back (an incomplete character at the very end), for a finished sequence."""
        return self._advance(hold_incomplete=False)

    def _advance(self, hold_incomplete: bool) -> str:
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or (hold_incomplete and new_text.endswith("\ufffd")):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text):]


def find_stop(text: str, num_new_chars: int, stops: tuple[str, ...]) -> Optional[tuple[int, str]]:
    """Earliest stop string that the last `num_new_chars` characters of `text` completed:
    (its start index in text, the string), or None."""
    best: Optional[tuple[int, str]] = None
    for stop in stops:
        index = text.find(stop, max(0, len(text) - num_new_chars - len(stop) + 1))
        if index >= 0 and (best is None or index < best[0]):
            best = (index, stop)
    return best


def held_back_length(text: str, stop: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string. Only prefixes
    that end in text's last character and start with the character as far back are compared."""
    if not text:
        return 0
    longest, last = 0, text[-1]
    for s in stop:
        k = min(len(s) - 1, len(text))  # a prefix s[:k] can match only where s[k - 1] == last
        while k > longest:
            k = s.rfind(last, 0, k) + 1
            if k <= longest:
                break
            if text[-k] == s[0] and text.endswith(s[:k]):
                longest = k
                break
            k -= 1
    return longest


class StreamedText:
    """What was reported of one sequence's text; `next_piece` says what to report now.

    A stop string is cut out of the text once it is complete, so text that might be the start of
    one is held back until it is known not to be; the pieces reported then add up to the final
    text exactly (what `find_stop` cuts starts after every piece reported before it).
    """

    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(stop)
        self.num_chars_sent = 0

    def shown(self, text: str, finished: bool) -> str:
        """What of the cumulative `text` (final when `finished`) may be reported now: all of it
        but a tail that may start a stop string."""
        return text if finished else text[:len(text) - held_back_length(text, self.stop)]

    def next_piece(self, text: str, finished: bool) -> str:
        """The new text to report, given the cumulative `text` (final when `finished`)."""
        end = len(self.shown(text, finished))
        if end <= self.num_chars_sent:
            return ""
        piece = text[self.num_chars_sent:end]
        self.num_chars_sent = end
        return piece
