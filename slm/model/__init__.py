"""The model: one decoder for StableLM 2 and SmolLM2 (transformer.py), and its map to transformers (hf.py)."""

from slm.model.transformer import KVCache, ModelConfig, Transformer, build

__all__ = ["KVCache", "ModelConfig", "Transformer", "build"]
