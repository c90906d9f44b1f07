"""sft and dpo: records, chat templates against transformers, masks, filters, packing, the DPO losses against a
hand computation, the reference cache, resuming exactly."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import run_cli

from slm.errors import SlmError
from slm.formats.chat import ChatTemplate, parse_chat, parse_pair
from slm.formats.checkpoint import Checkpoint
from slm.formats.metrics import read_metrics
from slm.formats.records import BadRecord
from slm.formats.tokenizer import Tokenizer, with_special_tokens
from slm.model.loss import linear_token_logprobs
from slm.stages.dpo import DpoConfig, read_pairs, run as dpo
from slm.stages.sft import SftConfig, prepare, run as sft
from slm.train.chat_batches import Rows, encode_chat, pack
from slm.train.preference import dpo_losses

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "2 + 3 = 5."},
        {"role": "user", "content": "Grüße aus München <|im_end|> und   Leerzeichen"},
        {"role": "assistant", "content": "  Hallo!\n\nTschüss 🤗"}]


@pytest.fixture(scope="module", params=["chatml", "zephyr"])
def chat_tok(request, tmp_path_factory, small_tok):
    template = ChatTemplate.load(request.param, "You are a helpful assistant." if request.param == "chatml" else None)
    d = tmp_path_factory.mktemp(request.param) / "tok"
    d.mkdir()
    added, digest = with_special_tokens(Tokenizer(small_tok), d, template.special_tokens, template.source)
    (d / "manifest.json").write_text(json.dumps({"kind": "tokenizer", "format_version": 1, "tokenizer_sha256": digest}))
    return Tokenizer(d), template, added


def test_template_ids_equal_transformers_apply_chat_template(chat_tok):
    from transformers import AutoTokenizer

    tok, template, added = chat_tok
    assert added == ([] if template.name == "chatml" else ["<|system|>", "<|user|>", "<|assistant|>"])
    hf = AutoTokenizer.from_pretrained(str(tok.dir))
    for conv in (CONV, CONV[1:3], CONV[1:]):  # with and without a system message (chatml adds its default)
        e = encode_chat(tok, template, conv)
        assert list(e.ids) == hf.apply_chat_template(conv, tokenize=True, return_dict=False)
    prompt = template.render(CONV[:2], True, tok.spec.bos_token, tok.spec.eos_token)
    assert prompt == hf.apply_chat_template(CONV[:2], tokenize=False, add_generation_prompt=True)
    if template.name == "chatml":
        assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
        assert hf.apply_chat_template(CONV[1:2], tokenize=False).startswith(
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    else:
        assert prompt == "<|system|>\nBe brief.<|endoftext|>\n<|user|>\nWhat is 2+3?<|endoftext|>\n<|assistant|>\n"


def test_the_mask_is_exactly_the_assistant_spans(chat_tok):
    tok, template, _ = chat_tok
    e = encode_chat(tok, template, CONV)
    end = "<|im_end|>\n" if template.name == "chatml" else "<|endoftext|>\n"
    assert tok.decode(e.ids[e.mask]) == "2 + 3 = 5." + end + "  Hallo!\n\nTschüss 🤗" + end
    # the masked tokens are two contiguous runs, and everything else is the prompt side
    runs = np.flatnonzero(np.diff(np.concatenate([[0], e.mask.astype(int), [0]])))
    assert len(runs) == 4
    last = encode_chat(tok, template, CONV, only_last=True)
    assert tok.decode(last.ids[last.mask]) == "  Hallo!\n\nTschüss 🤗" + end


def test_records_and_their_errors(tmp_path):
    assert parse_chat({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, "x") == \
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    cases = [({"text": "a"}, 'f.jsonl:3: no "messages" (or ShareGPT "conversations") field (the record has keys: text)'),
             ({"messages": [{"role": "bot", "content": "a"}]}, "f.jsonl:3: messages[0].role is 'bot', expected one of "
                                                               "system, user, assistant"),
             ({"messages": [{"role": "user", "content": 5}]}, "f.jsonl:3: messages[0].content is int, expected a string"),
             ({"messages": [{"role": "user", "content": "q"}]}, "f.jsonl:3: no assistant message (nothing to learn from)")]
    for record, message in cases:
        with pytest.raises(BadRecord) as e:
            parse_chat(record, "f.jsonl:3")
        assert str(e.value) == message
    uf = {"prompt": "q?", "chosen": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "good"}],
          "rejected": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "bad"}],
          "score_chosen": 9, "score_rejected": 3}
    p = parse_pair(uf, "w")
    assert (p.prompt, p.chosen, p.rejected, p.score_chosen) == ([{"role": "user", "content": "q?"}], "good", "bad", 9.0)
    orca = parse_pair({"system": "sys", "question": "q?", "chosen": "good", "rejected": "bad"}, "w")
    assert orca.prompt == [{"role": "system", "content": "sys"}, {"role": "user", "content": "q?"}]
    with pytest.raises(BadRecord, match="w: chosen does not continue the prompt"):
        parse_pair(dict(uf, chosen=[{"role": "user", "content": "other"}, {"role": "assistant", "content": "x"}]), "w")

    # through the command: a broken line is named with its file and line, exit 1, nothing written
    bad = tmp_path / "chat.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
                   + "\n{broken\n")
    proc = run_cli("sft", "--model", tmp_path, "--data", bad, "--out", tmp_path / "o")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr


def test_filters_count(small_tok, tmp_path):
    template = ChatTemplate.load("chatml")
    d = tmp_path / "tok"
    d.mkdir()
    _, digest = with_special_tokens(Tokenizer(small_tok), d, template.special_tokens, template.source)
    (d / "manifest.json").write_text(json.dumps({"kind": "tokenizer", "format_version": 1, "tokenizer_sha256": digest}))
    tok = Tokenizer(d)
    turn = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    convs = [turn * 2, turn * 3, turn * 9, [{"role": "user", "content": "x " * 400}, turn[1]]]
    counts = {}
    kept = prepare(convs, tok, template, 64, 2, "drop", counts)
    assert counts == {"dropped: more than max_turns": 2, "dropped: longer than max_length": 1, "kept": 1}
    counts = {}
    kept = prepare(convs, tok, template, 64, None, "truncate", counts)
    # truncated at 64 tokens, the long question leaves no assistant token: dropped
    assert counts == {"truncated to max_length": 2, "dropped: no assistant token": 1, "kept": 3}
    assert all(len(e.ids) <= 64 for e in kept)

    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "q1", "chosen": "a", "rejected": "b", "score_chosen": 9, "score_rejected": 2},
            {"prompt": "q1", "chosen": "a", "rejected": "b", "score_chosen": 9, "score_rejected": 2},  # duplicate
            {"prompt": "q2", "chosen": "a", "rejected": "b", "score_chosen": 5, "score_rejected": 5},  # tie
            {"prompt": "q3", "chosen": "a", "rejected": "b", "score_chosen": 7, "score_rejected": 2},  # below 8
            {"prompt": "q4", "chosen": "same", "rejected": "same"},  # identical
            {"question": "q5", "chosen": "a", "rejected": "b"}]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows) + "[1]\n")
    with pytest.raises(BadRecord, match=f"{pairs}:7: expected a JSON object, got list"):
        read_pairs([str(pairs)], False, 8, {})
    counts = {}
    kept = read_pairs([str(pairs)], True, 8, counts)
    assert [p.prompt[-1]["content"] for p in kept] == ["q1", "q5"]
    assert counts == {"read": 7, "dropped: exact duplicate": 1, "dropped: tie (equal scores)": 1,
                      "dropped: chosen score below 8": 1, "dropped: identical answers": 1,
                      "skipped: bad record": 1, "kept": 2}


def test_best_fit_packing_and_packed_rows_train_as_separate_conversations():
    lengths = [5, 9, 3, 7, 1, 4, 8, 2]
    rows = pack(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(8))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == math.ceil(sum(lengths) / 10)  # 39 tokens in 4 rows: best fit leaves no row wasted here

    from slm.model.transformer import ModelConfig, build
    from slm.train.chat_batches import Encoded

    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                      intermediate_size=64, max_seq_len=32)
    model = build(cfg, seed=0)
    rng = np.random.default_rng(0)
    convs = [Encoded(rng.integers(1, 64, n), rng.random(n) < 0.5) for n in (7, 5, 9)]
    packed = Rows(convs, [[0, 1, 2]], 24, 0, 0).micro_batch([0], torch.device("cpu"))
    alone = [Rows(convs, [[i]], 24, 0, 0).micro_batch([0], torch.device("cpu")) for i in range(3)]
    s, n = model(packed.input_ids, segment_ids=packed.segment_ids, targets=packed.targets)
    parts = [model(a.input_ids, segment_ids=a.segment_ids, targets=a.targets) for a in alone]
    torch.testing.assert_close(s, sum(p[0] for p in parts), rtol=1e-5, atol=1e-5)
    assert int(n) == sum(int(p[1]) for p in parts) == sum(int(c.mask[1:].sum()) for c in convs)


def test_token_logprobs_and_their_gradient_equal_log_softmax():
    torch.manual_seed(0)
    h = torch.randn(200, 32, requires_grad=True)
    w = (torch.randn(500, 32) * 0.1).requires_grad_()
    t = torch.randint(0, 500, (200,))
    t[::5] = -100
    go = torch.randn(200)
    lp = linear_token_logprobs(h, w, t, chunk_elements=500 * 40)
    (lp * go).sum().backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.log_softmax(h2 @ w2.T, -1).gather(1, t.clamp(min=0)[:, None]).squeeze(1) * (t != -100)
    (ref * go).sum().backward()
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-5)


def test_dpo_losses_equal_a_hand_computation():
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -5.0]), torch.tensor([-11.5, -2.0])
    beta = 0.5
    h = [(-10 + 11) - (-12 + 11.5), (-4 + 5) - (-3 + 2)]  # [1.5, 2.0]
    want = {"sigmoid": [math.log1p(math.exp(-beta * x)) for x in h],
            "hinge": [max(0.0, 1 - beta * x) for x in h],
            "ipo": [(x - 1 / (2 * beta)) ** 2 for x in h]}
    for kind, expected in want.items():
        losses, rw, rl = dpo_losses(pc, pr, rc, rr, beta, kind)
        torch.testing.assert_close(losses, torch.tensor(expected), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rw, torch.tensor([0.5, 0.5]))
        torch.testing.assert_close(rl, torch.tensor([-0.25, -0.5]))


# -- the stages end to end, on the session's small tokenizer and a tiny model -----------------------------------------

CHAT = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                      {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]} for a in range(12) for b in range(4)]
PAIRS = [{"prompt": f"What is {a} plus {b}?", "chosen": f"{a} plus {b} is {a + b}.",
          "rejected": f"{a} plus {b} is {a + b + 1}.", "score_chosen": 9, "score_rejected": 3}
         for a in range(12) for b in range(4)]
POST = ["--set", "sft.max_length=48", "--set", "sft.batch_size=8", "--set", "sft.micro_batch_size=4",
        "--set", "sft.lr=3e-3", "--set", "train.save_every=3", "--set", "train.dtype=fp32"]


def write_post_data(d):
    (d / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return d


@pytest.fixture(scope="module")
def post_data(tmp_path_factory):
    return write_post_data(tmp_path_factory.mktemp("post"))


def _sft(base, data, out, steps, *extra):
    return sft(SftConfig(model=base, data=[str(data / "chat.jsonl")], out=out, sets=[s for s in POST + list(extra)
                                                                                     if s != "--set"],
                         steps=steps, device="cpu"))


def test_sft_writes_a_chat_checkpoint_and_resumes_exactly(tmp_path, base_ckpt, post_data):
    whole = _sft(base_ckpt, post_data, tmp_path / "whole", 6)
    _sft(base_ckpt, post_data, tmp_path / "parts", 3)
    parts = _sft(base_ckpt, post_data, tmp_path / "parts", 6)
    a, b = Checkpoint.open(whole).state_dict(), Checkpoint.open(parts).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit on a CPU
    losses = [r["loss"] for r in read_metrics(tmp_path / "whole") if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    m = json.loads((whole / "manifest.json").read_text())
    assert m["stage"] == "sft" and m["data_counts"]["kept"] == len(CHAT) and m["template"] == "chatml"
    # transformers opens it, with the template: the chat prompt tokenizes as slm renders it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(whole))
    assert hf_tok.chat_template and "<|im_start|>" in hf_tok.chat_template
    AutoModelForCausalLM.from_pretrained(str(whole))
    gen = json.loads((whole / "generation_config.json").read_text())
    assert hf_tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]

    # slm generate --chat: greedy, the tokens transformers generates from apply_chat_template's prompt
    from slm.inference.generate import GenerateConfig, generate_ids

    messages = [{"role": "user", "content": "What is 3 plus 2?"}]
    ids = generate_ids(GenerateConfig(checkpoint=whole, prompt="", chat=messages, max_new_tokens=12, temperature=0,
                                      device="cpu"))
    hf = AutoModelForCausalLM.from_pretrained(str(whole))
    prompt = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    want = hf.generate(**prompt, max_new_tokens=12, do_sample=False)[0, prompt["input_ids"].shape[1]:].tolist()
    stops = set(gen["eos_token_id"])
    if any(t in stops for t in want):
        want = want[:min(i for i, t in enumerate(want) if t in stops)]
    assert ids == want
    proc = subprocess.run([sys.executable, "-m", "slm", "generate", str(whole), "--chat", "-", "--temperature", "0",
                           "--max-new-tokens", "12", "--device", "cpu"], input=json.dumps({"messages": messages}) + "\n",
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)["messages"][-1]
    assert answer["role"] == "assistant" and answer["content"] == hf_tok.decode(want)


def test_sft_zephyr_adds_its_tokens_to_the_tokenizer_and_the_embedding(tmp_path, base_ckpt, post_data):
    base = Checkpoint.open(base_ckpt)
    out = _sft(base_ckpt, post_data, tmp_path / "z", 1, "--set", "sft.template=zephyr")
    tok = Tokenizer(tmp_path / "z" / "tokenizer")
    new = [tok.spec.special_tokens[t] for t in ("<|system|>", "<|user|>", "<|assistant|>")]
    assert new == list(range(base.tokenizer().n_vocab, base.tokenizer().n_vocab + 3))
    # the rows of the new tokens start at the mean embedding (then move by one step of AdamW at most lr)
    emb0 = base.state_dict()["embed_tokens.weight"]
    emb1 = Checkpoint.open(out).state_dict()["embed_tokens.weight"]
    assert emb1.shape[0] >= max(new) + 1
    mean = emb0[:base.tokenizer().n_vocab].mean(dim=0)
    for i in new:
        assert (emb1[i] - mean).abs().max() < 5e-3
    again = _sft(out, post_data, tmp_path / "z2", 1, "--set", "sft.template=zephyr")  # nothing more to add
    assert Tokenizer(tmp_path / "z2" / "tokenizer").n_vocab == tok.n_vocab
    assert again.exists()


def test_dpo_reference_cache_and_exact_resume(tmp_path, base_ckpt, post_data):
    sft_ckpt = _sft(base_ckpt, post_data, tmp_path / "sft", 3)
    sets = ["dpo.batch_size=8", "dpo.micro_batch_size=2", "dpo.lr=1e-3", "dpo.beta=0.5", "dpo.max_length=48",
            "dpo.max_prompt_length=24", "train.save_every=2", "train.dtype=fp32"]

    def run(out, steps):
        return dpo(DpoConfig(model=sft_ckpt, data=[str(post_data / "pairs.jsonl")], out=out, sets=sets,
                             valid=[str(post_data / "pairs.jsonl")], steps=steps, device="cpu"))

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "parts", 2)
    parts = run(tmp_path / "parts", 4)
    a, b = Checkpoint.open(whole).state_dict(), Checkpoint.open(parts).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [r for r in read_metrics(tmp_path / "whole") if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # the policy starts as the reference
    for key in ("rewards_chosen", "rewards_rejected", "reward_margin", "accuracy", "kl_estimate"):
        assert key in rows[-1]
    valid = [r for r in read_metrics(tmp_path / "whole") if "valid_loss" in r]
    assert valid[-1]["valid_loss"] < math.log(2) and "valid_accuracy" in valid[-1]  # it learns the pairs
    # the cache equals the log-probabilities computed on the fly by the reference
    from safetensors.torch import load_file
    from slm.train.start import load_weights, new_model

    from slm.formats.chat import ChatTemplate
    from slm.stages.dpo import encode_pairs, template_of
    from slm.train.preference import reference_logprobs

    cache = load_file(str(tmp_path / "whole" / "reference_logprobs" / "logprobs.safetensors"))["logprobs"]
    ref = Checkpoint.open(sft_ckpt)
    tok = ref.tokenizer()
    pairs = read_pairs([str(post_data / "pairs.jsonl")], False, None, {})
    enc = encode_pairs(pairs, tok, template_of(ref, None), 48, 24, {})
    model = new_model(ref.model_config, torch.device("cpu"), 0)
    load_weights(model, ref)
    import contextlib

    fresh = reference_logprobs(model, enc[:10], 3, tok.eos_id, 0, 1, torch.device("cpu"), contextlib.nullcontext)
    torch.testing.assert_close(cache[:10], fresh, rtol=1e-6, atol=1e-6)
    assert isinstance(template_of(ref, None), ChatTemplate)
    # a reference with another tokenizer is refused in one line, before any work
    import shutil

    other = tmp_path / "other-ref"
    shutil.copytree(sft_ckpt, other)
    enc_json = json.loads((other / "encoding.json").read_text())
    enc_json["special_tokens"]["<|other|>"] = enc_json["n_vocab"]
    enc_json["n_vocab"] += 1
    (other / "encoding.json").write_text(json.dumps(enc_json))
    proc = run_cli("dpo", "--model", sft_ckpt, "--ref", other, "--data", post_data / "pairs.jsonl", "--out",
                   tmp_path / "bad", "--device", "cpu")
    assert proc.returncode == 1 and "is not the policy's" in proc.stderr and "Traceback" not in proc.stderr
    summary = json.loads((tmp_path / "whole" / "dpo.json").read_text())
    assert 0 <= summary["preference_accuracy_before"] <= 1 and 0 <= summary["preference_accuracy_after"] <= 1


def test_dpo_losses_equal_trls_on_the_same_model_and_pairs(tmp_path, base_ckpt, post_data, monkeypatch):
    """TRL's DPOTrainer (the reference users know) computes the loss slm computes, for the sigmoid and IPO
    losses, with a policy that moved away from its reference."""
    pytest.importorskip("trl")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):  # one process, whatever ran before
        monkeypatch.delenv(var, raising=False)
    import contextlib

    from datasets import Dataset
    from slm.train.start import load_weights, new_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from slm.stages.dpo import encode_pairs, template_of
    from slm.train.preference import reference_logprobs

    ref_ckpt = _sft(base_ckpt, post_data, tmp_path / "sft", 3)
    policy_ckpt = _sft(ref_ckpt, post_data, tmp_path / "more", 2)  # another model with the same tokenizer
    pairs = read_pairs([str(post_data / "pairs.jsonl")], False, None, {})[:6]
    ds = Dataset.from_list([{"prompt": p.prompt, "chosen": [{"role": "assistant", "content": p.chosen}],
                             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs])
    ref = Checkpoint.open(ref_ckpt)
    enc = encode_pairs(pairs, ref.tokenizer(), template_of(ref, None), 10 ** 6, 10 ** 6 - 1, {})

    def logprobs(ckpt):
        model = new_model(Checkpoint.open(ckpt).model_config, torch.device("cpu"), 0)
        load_weights(model, Checkpoint.open(ckpt))
        return reference_logprobs(model, enc, 8, ref.tokenizer().eos_id, 0, 1, torch.device("cpu"),
                                  contextlib.nullcontext)

    p, r = logprobs(policy_ckpt), logprobs(ref_ckpt)
    lengths = torch.tensor([[len(e.chosen) - e.chosen_start, len(e.rejected) - e.rejected_start] for e in enc])
    for kind in ("sigmoid", "ipo"):
        args = DPOConfig(output_dir=str(tmp_path / f"trl-{kind}"), beta=0.5, loss_type=[kind],
                         per_device_train_batch_size=len(pairs), report_to=[], use_cpu=True, max_length=None,
                         bf16=False)
        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(str(policy_ckpt)),
                             ref_model=AutoModelForCausalLM.from_pretrained(str(ref_ckpt)), args=args,
                             train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(str(ref_ckpt)))
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.eval()
        with torch.no_grad():
            want = float(trainer.compute_loss(trainer.model, batch))
        pp, rr = (p, r) if kind == "sigmoid" else (p / lengths, r / lengths)
        losses, _, _ = dpo_losses(pp[:, 0], pp[:, 1], rr[:, 0], rr[:, 1], 0.5, kind)
        assert float(losses.mean()) == pytest.approx(want, rel=1e-5, abs=1e-7)
        assert abs(want - (math.log(2) if kind == "sigmoid" else 1.0)) > 1e-4  # the policy did move


def test_dpo_stopped_by_a_signal_resumes_exactly(tmp_path, base_ckpt, post_data, monkeypatch):
    import os
    import signal

    from slm.errors import Stopped
    from slm.formats.metrics import MetricsLog

    sft_ckpt = _sft(base_ckpt, post_data, tmp_path / "sft", 2)
    sets = ["dpo.batch_size=8", "dpo.micro_batch_size=4", "dpo.lr=1e-3", "dpo.max_length=48",
            "dpo.max_prompt_length=24", "train.save_every=100", "train.dtype=fp32"]

    def run(out):
        return dpo(DpoConfig(model=sft_ckpt, data=[str(post_data / "pairs.jsonl")], out=out, sets=sets, steps=4,
                             device="cpu"))

    run(tmp_path / "whole")
    write, seen = MetricsLog.write, []

    def write_then_signal(self, record):
        write(self, record)
        seen.append(record)
        if len(seen) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsLog, "write", write_then_signal)
    with pytest.raises(Stopped, match="stopped by SIGTERM after step 2"):
        run(tmp_path / "split")
    monkeypatch.setattr(MetricsLog, "write", write)
    last = run(tmp_path / "split")
    a, b = Checkpoint.open(tmp_path / "whole").state_dict(), Checkpoint.open(last).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_metrics(tmp_path / "split")] == [r["loss"] for r in read_metrics(tmp_path / "whole")]


def test_chat_records_from_parquet_a_saved_dataset_and_stdin(tmp_path, monkeypatch):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    from slm.stages.sft import read_conversations

    rows = CHAT[:5]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("".join(json.dumps(r) + "\n" for r in rows).encode())))
    got = read_conversations([str(tmp_path / "chat.parquet"), str(tmp_path / "saved"), "-"], False, {})
    assert got == [r["messages"] for r in rows] * 3


def test_a_jinja_template_file(tmp_path, small_tok):
    from slm.formats.chat import CHATML

    f = tmp_path / "mine.jinja"
    f.write_text(CHATML.replace("default_system", '""'))
    t = ChatTemplate.load(str(f))
    assert t.special_tokens == ["<|im_end|>", "<|im_start|>"] and t.end_of_turn == "<|im_end|>"
    assert t.render(CONV[1:3], False, "", "") == ("<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
                                                   "<|im_start|>assistant\n2 + 3 = 5.<|im_end|>\n")
    with pytest.raises(SlmError, match="--template 'nope': expected chatml, zephyr or a Jinja template file"):
        ChatTemplate.load("nope")
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    with pytest.raises(SlmError, match="not a valid Jinja template"):
        ChatTemplate.load(str(bad))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_two_processes_post_train_as_one(tmp_path, base_ckpt, post_data, stage):
    """sft and dpo under torchrun with DDP: the same losses as one process on the same global batch."""
    import os

    from test_engine import free_port

    sft_ckpt = _sft(base_ckpt, post_data, tmp_path / "sft0", 2)
    if stage == "sft":
        args = ["--model", str(base_ckpt), "--data", str(post_data / "chat.jsonl"), "--steps", "3"] + POST
    else:
        args = ["--model", str(sft_ckpt), "--data", str(post_data / "pairs.jsonl"), "--steps", "3",
                "--set", "dpo.batch_size=8", "--set", "dpo.micro_batch_size=2", "--set", "dpo.lr=1e-3",
                "--set", "dpo.max_length=48", "--set", "dpo.max_prompt_length=24", "--set", "train.dtype=fp32"]
    one = run_cli(stage, *args, "--out", tmp_path / "one", "--device", "cpu", check=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "slm", stage, *args, "--out", str(tmp_path / "two"), "--device",
                           "cpu"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == one.stdout.strip().replace("/one/", "/two/")
    a = [r["loss"] for r in read_metrics(tmp_path / "one") if "loss" in r]
    b = [r["loss"] for r in read_metrics(tmp_path / "two") if "loss" in r]
    np.testing.assert_allclose(b, a, rtol=2e-5)


def test_a_bad_chat_record_stops_sft_before_anything_is_written(tmp_path, base_ckpt):
    bad = tmp_path / "chat.jsonl"
    bad.write_text(json.dumps(CHAT[0]) + "\n" + json.dumps({"messages": [{"role": "user", "content": 3}]}) + "\n")
    proc = run_cli("sft", "--model", base_ckpt, "--data", bad, "--out", tmp_path / "o", "--device", "cpu")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{bad}:2: messages[0].content is int, expected a string" in proc.stderr
    assert not (tmp_path / "o").exists()
