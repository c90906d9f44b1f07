"""slm: train small language models the way StableLM 2 1.6B and SmolLM2 were trained."""

__version__ = "0.1.0"
