"""GGUF files for llama.cpp, written by slm with gguf-py (no dependence on llama.cpp's conversion script).

Architectures (names and keys as llama.cpp's loader reads them, src/llama-arch.cpp and src/models/*.cpp):
    stablelm   StableLM 2: LayerNorm with bias, q/k/v biases, NeoX rotary on rope.dimension_count = partial rotary
               factor x head dim (StableLM 2: 16 of 64), an output matrix of its own (llama.cpp requires it).
    llama      SmolLM2: RMSNorm, grouped-query attention, tied embeddings (no output.weight: llama.cpp reuses
               token_embd). llama.cpp rotates adjacent pairs (2i, 2i+1) where transformers rotates halves (i, i+d/2),
               so q and k rows are permuted within each head (the permutation convert_hf_to_gguf.py applies).
slm's fused q/k/v and gate/up matrices are split into llama.cpp's separate tensors. Norms and biases stay f32 in
every type; a 2-D weight whose rows are not a multiple of the type's block falls back to f16 (counted).

Tokenizer: BPE "gpt2" with the tokens, merges and types of the checkpoint's tokenizer.json (GPT-2 byte-to-unicode
strings), special tokens as CONTROL, ids with no token (placeholders, embedding padding) as UNUSED "[PAD{i}]", the
pre-tokenizer name llama.cpp knows for these rules ("stablelm2": Arcade100k's regex, character for character;
"smollm": digits, then GPT-2's regex), bos / eos / end-of-turn ids, no BOS added, and the chat template.
llama.cpp does not NFC-normalise text as Arcade100k does: feed it NFC text.

Types written here: f32, f16, bf16, q8_0, q4_0, q4_1 (gguf-py's quantizers; q8_0 is bit-exact with ggml's). The
k-quants (q4_k_m, q5_k_m) come from llama.cpp's quantizer through llama-cpp-python, from the f16 file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slm.errors import SlmError
from slm.formats.chat import template_source
from slm.formats.manifest import read_json
from slm.formats.tokenizer import Tokenizer

# slm type name -> (GGMLQuantizationType name for 2-D weights, LlamaFileType name)
PYTHON_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
                "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1")}
# k-quants by llama.cpp: slm name -> llama_cpp.LLAMA_FTYPE_* name
LLAMA_CPP_TYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M"}
PRE_TOKENIZER = {"arcade": "stablelm2", "smollm": "smollm", "gpt2": "gpt-2"}


@dataclass
class Written:
    path: Path
    type: str
    tensors: dict[str, str] = field(default_factory=dict)  # name -> GGML type name
    fallbacks: list[str] = field(default_factory=list)  # 2-D weights kept at f16 (rows not a multiple of the block)


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of each head from transformers' half-split order (i, i + d/2) to llama.cpp's adjacent pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensors_of(state: dict, cfg) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in transformers' (out, in) layout) for every tensor llama.cpp expects."""
    import torch

    def a(t: torch.Tensor) -> np.ndarray:
        return t.detach().to(torch.float32).cpu().numpy()

    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    llama = cfg.family == "llama"
    out = [("token_embd.weight", a(state["embed_tokens.weight"]))]
    for i in range(cfg.num_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        out.append((b + "attn_norm.weight", a(state[p + "input_layernorm.weight"])))
        if not llama:
            out.append((b + "attn_norm.bias", a(state[p + "input_layernorm.bias"])))
        q, k, v = np.split(a(state[p + "self_attn.qkv_proj.weight"]), [h * hd, (h + kv) * hd])
        if llama:
            q, k = _permute_rope(q, h), _permute_rope(k, kv)
        out += [(b + "attn_q.weight", q), (b + "attn_k.weight", k), (b + "attn_v.weight", v)]
        if cfg.qkv_bias:
            qb, kb, vb = np.split(a(state[p + "self_attn.qkv_proj.bias"]), [h * hd, (h + kv) * hd])
            if llama:
                qb, kb = _permute_rope(qb, h), _permute_rope(kb, kv)
            out += [(b + "attn_q.bias", qb), (b + "attn_k.bias", kb), (b + "attn_v.bias", vb)]
        out.append((b + "attn_output.weight", a(state[p + "self_attn.o_proj.weight"])))
        out.append((b + "ffn_norm.weight", a(state[p + "post_attention_layernorm.weight"])))
        if not llama:
            out.append((b + "ffn_norm.bias", a(state[p + "post_attention_layernorm.bias"])))
        gate, up = np.split(a(state[p + "mlp.gate_up_proj.weight"]), 2)
        out += [(b + "ffn_gate.weight", gate), (b + "ffn_up.weight", up),
                (b + "ffn_down.weight", a(state[p + "mlp.down_proj.weight"]))]
    out.append(("output_norm.weight", a(state["norm.weight"])))
    if not llama:
        out.append(("output_norm.bias", a(state["norm.bias"])))
    if not (llama and cfg.tie_embeddings):  # llama.cpp's stablelm requires output.weight even when tied
        out.append(("output.weight", a(state["lm_head.weight"] if "lm_head.weight" in state
                                       else state["embed_tokens.weight"])))
    return out


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos: int
    eos: int
    eot: int | None
    chat_template: str | None


def vocab_of(ckpt_dir: Path, vocab_size: int) -> Vocab:
    """The GGUF vocabulary of a checkpoint: its tokenizer.json's tokens and merges, padded to VOCAB_SIZE rows."""
    import gguf

    ckpt_dir = Path(ckpt_dir)
    spec = Tokenizer(ckpt_dir).spec  # slm's encoding.json, or what a released tokenizer.json says
    tj = read_json(ckpt_dir / "tokenizer.json")
    rules = spec.rules
    if rules not in PRE_TOKENIZER:
        raise SlmError(f"{ckpt_dir / 'tokenizer.json'}: its pre-tokenizer ({rules}) is none llama.cpp knows (slm "
                       f"writes {', '.join(f'{k} as {v!r}' for k, v in PRE_TOKENIZER.items())}): llama.cpp would "
                       "tokenize differently")
    T = gguf.TokenType
    tokens: list[str | None] = [None] * vocab_size
    types = [int(T.UNUSED)] * vocab_size
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise SlmError(f"{ckpt_dir / 'tokenizer.json'}: model.type {model.get('type')!r}: expected BPE")
    for text, i in model["vocab"].items():
        if i >= vocab_size:
            raise SlmError(f"{ckpt_dir}: token id {i} does not fit the model's vocab_size {vocab_size}")
        tokens[i], types[i] = text, int(T.NORMAL)
    placeholders = set(spec.placeholders.values())
    for t in tj.get("added_tokens", []):
        i = t["id"]
        if i >= vocab_size:
            raise SlmError(f"{ckpt_dir}: token id {i} does not fit the model's vocab_size {vocab_size}")
        if i in placeholders:
            continue
        tokens[i], types[i] = t["content"], int(T.CONTROL if t.get("special", True) else T.USER_DEFINED)
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    specials = spec.special_tokens
    template, eot = template_source(ckpt_dir), None
    if template and "<|im_end|>" in template and "<|im_end|>" in specials:
        eot = specials["<|im_end|>"]
    return Vocab(tokens, types, merges, PRE_TOKENIZER[rules], specials[spec.bos_token], specials[spec.eos_token],
                 eot, template)


def write_gguf(ckpt, path: Path, kind: str, name: str | None = None, state: dict | None = None) -> Written:
    """Write checkpoint CKPT (slm.formats.checkpoint.Checkpoint) as a GGUF of type KIND (PYTHON_TYPES) at PATH;
    STATE: its weights when the caller has them already (read from the checkpoint otherwise)."""
    import gguf
    from gguf.quants import QuantError, quantize

    if kind not in PYTHON_TYPES:
        raise SlmError(f"GGUF type {kind!r}: slm writes {', '.join(PYTHON_TYPES)} itself")
    qname, ftype = PYTHON_TYPES[kind]
    qtype = gguf.GGMLQuantizationType[qname]
    cfg = ckpt.model_config
    vocab = vocab_of(ckpt.dir, cfg.vocab_size)
    arch = "llama" if cfg.family == "llama" else "stablelm"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name or ckpt.dir.name)
    w.add_type("model")
    w.add_file_type(int(gguf.LlamaFileType[ftype]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # where the file came from: `slm info` follows it, and a stage given a GGUF and a checkpoint can check they match
    w.add_string("slm.checkpoint", str(Path(ckpt.dir).resolve()))
    if weights := ckpt.recorded_weights_sha256:
        w.add_string("slm.checkpoint_sha256", weights)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_dimension_count(cfg.rotary_dim)
    w.add_rope_freq_base(float(cfg.rope_theta))
    if arch == "llama":
        w.add_layer_norm_rms_eps(float(cfg.norm_eps))
        w.add_vocab_size(cfg.vocab_size)
    else:
        w.add_layer_norm_eps(float(cfg.norm_eps))
        w.add_parallel_residual(False)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    w.add_bos_token_id(vocab.bos)
    w.add_eos_token_id(vocab.eos)
    if vocab.eot is not None:
        w.add_eot_token_id(vocab.eot)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)
    written = Written(Path(path), kind)
    for tname, arr in tensors_of(state if state is not None else ckpt.state_dict(), cfg):
        if arr.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(tname, arr.astype(np.float32))
            written.tensors[tname] = "F32"
            continue
        t = qtype
        try:
            data = quantize(arr, t) if t != gguf.GGMLQuantizationType.F16 else arr.astype(np.float16)
        except QuantError:
            t = gguf.GGMLQuantizationType.F16
            data = arr.astype(np.float16)
            written.fallbacks.append(tname)
        if data.dtype == np.uint8:
            w.add_tensor(tname, data, raw_dtype=t)
        else:
            w.add_tensor(tname, data)
        written.tensors[tname] = t.name
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def read_tensor_types(path: Path) -> dict[str, str]:
    """GGML type of every tensor of a GGUF file (gguf-py's reader)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    return {t.name: t.tensor_type.name for t in r.tensors}


def open_fields(path: Path):
    """(field(key) -> the value or None, the file's tensors), or one line when gguf-py cannot read the file."""
    import gguf

    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - gguf-py raises several kinds on a file that is not GGUF
        raise SlmError(f"{path}: not a GGUF file gguf-py can read ({e})") from None

    def field(key):
        try:
            v = r.fields[key].contents() if key in r.fields else None
        except Exception:  # noqa: BLE001 - a field gguf-py cannot render is as good as absent
            return None
        return v.tolist() if hasattr(v, "tolist") else v

    return field, r.tensors


def check_lineage(path: Path, ckpt) -> None:
    """Refuse, in one line, a GGUF file that is not CKPT's model. A file slm wrote names its checkpoint's weights
    (slm.checkpoint_sha256): they must be CKPT's. A file written elsewhere (llama.cpp's converter) must have CKPT's
    architecture, layers, width and vocabulary."""
    path = Path(path)
    field, tensors = open_fields(path)
    theirs, ours = field("slm.checkpoint_sha256"), ckpt.recorded_weights_sha256
    if theirs and ours:
        if theirs != ours:
            raise SlmError(f"{path}: written from another checkpoint ({field('slm.checkpoint')}, weights "
                           f"{theirs[:12]}), not from {ckpt.dir} (weights {ours[:12]})")
        return
    cfg = ckpt.model_config
    arch = field("general.architecture")
    want = {"general.architecture": "llama" if cfg.family == "llama" else "stablelm",
            f"{arch}.block_count": cfg.num_layers, f"{arch}.embedding_length": cfg.hidden_size,
            f"{arch}.feed_forward_length": cfg.intermediate_size}
    embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
    got = {k: field(k) for k in want}
    if embd is not None:
        want["vocabulary"] = cfg.vocab_size
        got["vocabulary"] = int(max(embd.shape))
    for k, v in want.items():
        if got[k] is not None and got[k] != v:
            raise SlmError(f"{path}: not this checkpoint's model ({k} is {got[k]}, {ckpt.dir} has {v})")
