"""The map between slm's model and transformers' StableLmForCausalLM / LlamaForCausalLM: config.json and weights.

slm fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`; transformers keeps them apart. Everything else has
the same name. Checkpoints are written with transformers' names, so `AutoModelForCausalLM.from_pretrained` opens
them as they are, and slm reads transformers checkpoints the same way.
"""

from __future__ import annotations

import torch

from slm.model.transformer import ModelConfig

ARCHITECTURES = {"stablelm": "StableLmForCausalLM", "llama": "LlamaForCausalLM"}


def to_hf_config(cfg: ModelConfig, bos_token_id: int | None, eos_token_id: int | None,
                 dtype: str = "float32") -> dict:
    """config.json for transformers (legacy top-level rope keys: read by transformers 4.4x and 5.x)."""
    common = {
        "architectures": [ARCHITECTURES[cfg.family]], "model_type": cfg.family, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
        "torch_dtype": dtype, "use_cache": True, "attention_dropout": 0.0,
    }
    if cfg.family == "stablelm":
        return {**common, "layer_norm_eps": cfg.norm_eps, "partial_rotary_factor": cfg.partial_rotary_factor,
                "use_qkv_bias": cfg.qkv_bias, "qk_layernorm": False, "use_parallel_residual": False,
                "hidden_dropout": 0.0}
    return {**common, "rms_norm_eps": cfg.norm_eps, "attention_bias": cfg.qkv_bias, "mlp_bias": False,
            "head_dim": cfg.head_dim, "pretraining_tp": 1, "rope_scaling": None}


def from_hf_config(d: dict, where: str = "config.json") -> ModelConfig:
    """A transformers config.json (stablelm or llama) -> ModelConfig; anything slm cannot reproduce is refused."""
    family = d.get("model_type")
    if family not in ARCHITECTURES:
        raise ValueError(f"{where}: model_type {family!r} is not one slm trains (stablelm, llama)")
    rope = d.get("rope_parameters") or {}
    theta = rope.get("rope_theta", d.get("rope_theta", 10_000.0))
    scaling = d.get("rope_scaling") or ({k: v for k, v in rope.items() if k == "rope_type" and v != "default"} or None)
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        raise ValueError(f"{where}: rope scaling {scaling} is not supported")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {d.get('hidden_act')!r} is not supported (silu)")
    heads = d["num_attention_heads"]
    if family == "stablelm":
        if d.get("use_parallel_residual") or d.get("qk_layernorm"):
            raise ValueError(f"{where}: parallel residual / qk layernorm are not the StableLM 2 architecture")
        return ModelConfig(
            family="stablelm", vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            num_layers=d["num_hidden_layers"], num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
            intermediate_size=d["intermediate_size"], max_seq_len=d.get("max_position_embeddings", 4096),
            rope_theta=theta, partial_rotary_factor=rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.25)),
            norm_eps=d.get("layer_norm_eps", 1e-5), qkv_bias=d.get("use_qkv_bias", False),
            tie_embeddings=d.get("tie_word_embeddings", False), init_std=d.get("initializer_range", 0.02))
    if d.get("mlp_bias"):
        raise ValueError(f"{where}: mlp_bias is not supported")
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    if head_dim * heads != d["hidden_size"]:
        raise ValueError(f"{where}: head_dim * num_attention_heads must equal hidden_size")
    return ModelConfig(
        family="llama", vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
        num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads, intermediate_size=d["intermediate_size"],
        max_seq_len=d.get("max_position_embeddings", 2048), rope_theta=theta, partial_rotary_factor=1.0,
        norm_eps=d.get("rms_norm_eps", 1e-5), qkv_bias=d.get("attention_bias", False),
        tie_embeddings=d.get("tie_word_embeddings", True), init_std=d.get("initializer_range", 0.02))


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """slm names -> transformers names (tied output weights are left out, as transformers saves them)."""
    q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out = {}
    for name, t in state.items():
        hf = name if name.startswith("lm_head") else "model." + name
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if ".qkv_proj." in name:
            q, k, v = t.split([q_size, kv_size, kv_size], dim=0)
            for part, tensor in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[hf.replace("qkv_proj", part)] = tensor.contiguous()
        elif ".gate_up_proj." in name:
            gate, up = t.chunk(2, dim=0)
            out[hf.replace("gate_up_proj", "gate_proj")] = gate.contiguous()
            out[hf.replace("gate_up_proj", "up_proj")] = up.contiguous()
        elif name.startswith("rotary."):
            continue
        else:
            out[hf] = t
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers names -> slm names; missing or unexpected weights are an error."""
    out, used = {}, set()

    def take(key: str) -> torch.Tensor:
        if key not in hf:
            raise KeyError(f"checkpoint has no weight {key!r}")
        used.add(key)
        return hf[key]

    out["embed_tokens.weight"] = take("model.embed_tokens.weight")
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        s = f"layers.{i}."
        for part in ("weight",) + (("bias",) if cfg.qkv_bias else ()):
            out[s + f"self_attn.qkv_proj.{part}"] = torch.cat(
                [take(p + f"self_attn.{x}_proj.{part}") for x in ("q", "k", "v")], dim=0)
        out[s + "self_attn.o_proj.weight"] = take(p + "self_attn.o_proj.weight")
        out[s + "mlp.gate_up_proj.weight"] = torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")], 0)
        out[s + "mlp.down_proj.weight"] = take(p + "mlp.down_proj.weight")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[s + f"{norm}.weight"] = take(p + f"{norm}.weight")
            if cfg.family == "stablelm":
                out[s + f"{norm}.bias"] = take(p + f"{norm}.bias")
    out["norm.weight"] = take("model.norm.weight")
    if cfg.family == "stablelm":
        out["norm.bias"] = take("model.norm.bias")
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
        used.add("lm_head.weight")
    else:
        out["lm_head.weight"] = take("lm_head.weight")
    extra = sorted(set(hf) - used - {k for k in hf if k.endswith("rotary_emb.inv_freq")})
    if extra:
        raise KeyError(f"checkpoint has weights slm does not know: {extra[:3]}")
    return out
