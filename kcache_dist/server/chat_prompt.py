"""Chat messages -> prompt token ids through the tokenizer's chat template, exactly as
`LLM.chat` does (render with the generation prompt, then encode without extra special tokens).

The builder owns its own tokenizer: Hugging Face fast tokenizers must not be used by two threads
at once, and the engine's tokenizer belongs to the engine thread. Rendering runs on one worker
thread, off the event loop.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from transformers import AutoTokenizer

from .errors import bad_request


class ChatPromptBuilder:
    def __init__(self, tokenizer_dir: str):
        self._tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chat-template")

    async def token_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt token ids of the conversation; APIError(400) if the template cannot render it."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._render, messages)

    def _render(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self._tokenizer, "chat_template", None):
            raise bad_request("this model's tokenizer has no chat template: use /v1/completions", param="messages")
        try:
            text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # jinja2 errors (e.g. a template's raise_exception on role order)
            raise bad_request(f"the chat template cannot render these messages: {e}", param="messages") from None
        return self._tokenizer.encode(text, add_special_tokens=False)

    def close(self) -> None:
        self._executor.shutdown(wait=False)
