"""Prompt tokens counted at the door, so a prompt that cannot fit is refused before it queues."""

from __future__ import annotations

import asyncio

from equinox_ray.serve.paths import resolve

TOKENIZE_IN_THREAD_CHARS = 4096  # longer prompts are tokenized off the event loop that serves everyone else


class Tokenizer:
    """Counts prompt tokens at the door, so a prompt that cannot fit is refused before it queues."""

    def __init__(self, path: str | None) -> None:
        self.hf = None
        if path is not None:
            from transformers import AutoTokenizer

            self.hf = AutoTokenizer.from_pretrained(resolve(path))

    @property
    def vocab_size(self) -> int | None:
        return len(self.hf) if self.hf is not None else None

    def encode(self, text: str) -> list[int]:
        if self.hf is None:
            return [1] * len(text.split())
        return self.hf.encode(text, add_special_tokens=False)

    def chat(self, messages) -> list[int]:
        if self.hf is not None and getattr(self.hf, "chat_template", None):
            return self.hf.apply_chat_template([m.template_message() for m in messages], add_generation_prompt=True)
        return self.encode("".join(f"{m.role}: {m.text}\n" for m in messages) + "assistant:")

    async def run(self, encode, payload, size: int) -> list[int]:
        if size > TOKENIZE_IN_THREAD_CHARS:
            return await asyncio.to_thread(encode, payload)
        return encode(payload)
