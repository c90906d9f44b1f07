"""INT4 for CPU runtimes: an OpenVINO IR with NNCF's int4 weight compression (StableLM 2's "OpenVINO INT4" release).

The checkpoint's model (fp32, slm.model.decode.PastAsInputs) is converted with openvino.convert_model (input_ids ->
logits for every position) and its linear layers' weights are compressed by nncf.compress_weights to 4 bits
(INT4_SYM by default, groups of 128 input channels, data-free). As NNCF does by default, the embedding and the output
matrix stay 8-bit. A group size that does not divide every layer's input (small models) falls back to the largest of
128, 64, 32 that does, else one group per row. The directory holds openvino_model.xml / .bin, the checkpoint's
config.json and tokenizer files, and slm_int4.json (what was done). The IR takes the keys and values so far as inputs
and returns them with the new tokens' (input_ids, past_keys, past_values -> logits, present_keys, present_values;
past_* are [layers, batch, kv heads, past tokens, head dim], empty for a new sequence): generation with a KV cache.
"""

from __future__ import annotations

import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from slm.console import stdout_to_stderr
from slm.errors import SlmError
from slm.formats.manifest import read_json, write_json
from slm.inference.load import load_model
from slm.model.decode import PastAsInputs

TOKENIZER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "encoding.json", "tokenizer.tiktoken", "chat_template.jinja")
# Reproducible numbers on every CPU: fp32 arithmetic, no dynamic activation quantization (the CPU plugin's defaults
# differ between CPUs: bf16 where the CPU has it, 8-bit activations for compressed matmuls).
EXACT_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}


def _imports():
    try:
        import nncf
        import openvino as ov
    except ImportError:
        raise SlmError("--type int4 needs openvino and nncf (pip install 'slm[deploy]')") from None
    return ov, nncf


def group_size_for(cfg, wanted: int) -> int:
    """The largest of WANTED, 64, 32 that divides every linear layer's input width, else -1 (one group per row)."""
    inputs = {cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim}
    for g in dict.fromkeys([wanted, 64, 32]):
        if g > 0 and all(d % g == 0 for d in inputs):
            return g
    return -1


def export_int4(ckpt, out: Path, group_size: int = 128, symmetric: bool = True, all_layers: bool = False) -> dict:
    """Write the INT4 IR of checkpoint CKPT into directory OUT; returns a summary (mode, group size, weights).
    ALL_LAYERS: the embedding and output matrix in 4 bits too (NNCF keeps them 8-bit by default)."""
    ov, nncf = _imports()
    model = load_model(ckpt, torch.device("cpu"))
    g = group_size_for(ckpt.model_config, group_size)
    mode = nncf.CompressWeightsMode.INT4_SYM if symmetric else nncf.CompressWeightsMode.INT4_ASYM
    cfg = ckpt.model_config
    example = {"input_ids": torch.ones(1, 8, dtype=torch.long),
               "past_keys": torch.zeros(cfg.num_layers, 1, cfg.num_kv_heads, 3, cfg.head_dim),
               "past_values": torch.zeros(cfg.num_layers, 1, cfg.num_kv_heads, 3, cfg.head_dim)}
    with torch.no_grad(), warnings.catch_warnings(), stdout_to_stderr():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants: harmless here
        model(example["input_ids"])  # builds the rotary table first: traced twice, the graph must not change
        ovm = ov.convert_model(PastAsInputs(model).eval(), example_input=example)
        for port, name in zip(ovm.outputs, ("logits", "present_keys", "present_values")):
            port.get_tensor().set_names({name})
        # the rotary cos/sin tables are gathered like an embedding: never compress them
        ovm = nncf.compress_weights(ovm, mode=mode, group_size=g, ratio=1.0, all_layers=all_layers,
                                    ignored_scope=nncf.IgnoredScope(patterns=[".*rotary.*"], validate=False))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ov.save_model(ovm, str(out / "openvino_model.xml"), compress_to_fp16=False)
    for name in TOKENIZER_FILES:
        if (ckpt.dir / name).is_file():
            shutil.copyfile(ckpt.dir / name, out / name)
    weights = weight_types(out / "openvino_model.xml")
    summary = {"runtime": "openvino", "mode": "int4_sym" if symmetric else "int4_asym", "group_size": g,
               "all_layers": all_layers,
               "weights": weights, "checkpoint": str(ckpt.dir)}
    write_json(out / "slm_int4.json", summary)
    return summary


def weight_types(xml: Path) -> dict[str, int]:
    """Elements of the IR's constants by element type (i4 / u4: int4 weights, u8: 8-bit, f32 ...)."""
    ov, _ = _imports()
    m = ov.Core().read_model(str(xml))
    count: Counter = Counter()
    for op in m.get_ops():
        if op.get_type_name() == "Constant":
            count[op.get_output_element_type(0).get_type_name()] += int(np.prod(op.get_output_shape(0)))
    return dict(count)


class OpenVinoScorer:
    """Runs an IR: logits of one sequence (no padding), or greedy decoding with its KV cache (keys and values are
    inputs and outputs of the IR)."""

    def __init__(self, directory: Path, n_vocab: int, threads: int | None = None, exact: bool = True):
        ov, _ = _imports()
        xml = Path(directory) / "openvino_model.xml"
        if not xml.is_file():
            raise SlmError(f"{directory}: no openvino_model.xml (an `slm quantize --type int4` directory?)")
        config = dict(EXACT_CONFIG) if exact else {}
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(threads)
        self.compiled = ov.Core().compile_model(str(xml), "CPU", config)
        self.n_vocab = n_vocab
        c = read_json(Path(directory) / "config.json")
        heads = c["num_attention_heads"]
        self.cache_shape = (c["num_hidden_layers"], 1, c.get("num_key_value_heads", heads), 0,
                            c["hidden_size"] // heads)

    def empty_cache(self) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(self.cache_shape, np.float32), np.zeros(self.cache_shape, np.float32)

    def step(self, ids, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Logits of IDS (continuing the sequence the cache holds) and the cache with them."""
        out = self.compiled({"input_ids": np.asarray(ids, dtype=np.int64)[None], "past_keys": keys,
                             "past_values": values})
        return out["logits"][0], out["present_keys"], out["present_values"]

    def logits(self, ids: np.ndarray) -> np.ndarray:
        logits, _, _ = self.step(ids, *self.empty_cache())
        return np.asarray(logits[:, :self.n_vocab], dtype=np.float64)

    def greedy(self, ids: list[int], n: int, stops: set[int]) -> list[int]:
        logits, k, v = self.step(ids, *self.empty_cache())
        new = []
        for _ in range(n):
            t = int(logits[-1, :self.n_vocab].argmax())
            if t in stops:
                break
            new.append(t)
            logits, k, v = self.step([t], k, v)
        return new
