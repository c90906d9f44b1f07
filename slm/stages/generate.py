"""`slm generate`: text from a checkpoint, streamed token by token, with a KV cache (slm.inference.generate).

The one stage that writes no directory: its result is the text, on stdout, as it is generated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from slm.inference import generate as inference


@dataclass
class GenerateConfig:
    checkpoint: Path
    prompt: str
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    seed: int = 1234
    device: str = "auto"
    stop_at_eos: bool = True
    chat: list[dict] | None = None
    """A conversation (messages) to answer: rendered with the checkpoint's chat template, generation stops at
    its end of turn. PROMPT is then unused."""

    def sampling(self) -> inference.Sampling:
        return inference.Sampling(self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.seed)


def generate(cfg: GenerateConfig) -> Iterator[str]:
    """Yield the text of each new token as it is generated."""
    return inference.generate(cfg.checkpoint, cfg.prompt, cfg.chat, cfg.sampling(), cfg.device, cfg.stop_at_eos)


def generate_ids(cfg: GenerateConfig) -> list[int]:
    """The generated token ids (for tests and programs)."""
    return list(inference.token_ids(cfg.checkpoint, cfg.prompt, cfg.chat, cfg.sampling(), cfg.device,
                                    cfg.stop_at_eos))
