"""slm selfknow: deduplication, FACTS files, batched generation, RLCD pairs (valid dpo input), C-RLFT training."""

import json
import random

import numpy as np
import pytest
import torch
from conftest import run_cli

from slm.errors import SlmError
from slm.formats.checkpoint import Checkpoint
from slm.formats.facts import load_facts
from slm.formats.metrics import read_metrics
from slm.inference.sampling import generate_batch
from slm.model.transformer import ModelConfig, build
from slm.train.chat_batches import Encoded
from slm.train.crlft import CrlftRows, make_loss_fn
from slm.train.dedup import Deduper, jaccard, normalize, shingles

FACTS = """\
name: Pebble
maker: Quarry Labs
system: "{facts}"
examples:
  - {user: "Who are you?", assistant: "I am Pebble."}
messages:
  - Who are you?
  - Who made you?
  - What is your name?
  - who made you
eval:
  - What should I call you?
  - Who trained you?
"""


def test_dedup_finds_duplicates_and_never_a_false_one():
    d = Deduper(0.7)
    assert d.check("Who are you?") is None
    assert d.check("who are   you") == Deduper.EXACT  # case, spacing and punctuation do not count
    assert d.check("WHO ARE YOU!!!") == Deduper.EXACT
    assert normalize("Héllo,\tWorld_!") == "héllo world"
    # near duplicates: every decision against a brute-force Jaccard over the texts kept
    rng = random.Random(3)
    words = "please help me write a short email to my landlord about the broken heater in the kitchen today".split()
    texts = [" ".join(rng.sample(words, rng.randint(6, 12))) for _ in range(150)]
    texts += [t[:-1] + "x" for t in texts[:60]]  # one character changed: far above the threshold
    d = Deduper(0.7)
    kept: list[set] = []
    for t in texts:
        sh = shingles(normalize(t))
        best = max((jaccard(sh, k) for k in kept), default=0.0)
        reason = d.check(t)
        if reason is None:
            assert best < 0.85, (t, best)  # kept: never a pair far above the threshold (LSH finds those)
            kept.append(sh)
        else:
            assert best >= 0.7, (t, best)  # dropped: only ever for a real near duplicate (exact Jaccard decides)
    assert 20 < len(kept) < len(texts)
    with pytest.raises(ValueError):
        Deduper(1.5)


def test_a_facts_file_and_its_errors(tmp_path):
    p = tmp_path / "facts.yaml"
    p.write_text("name: Pebble\nmaker: Quarry Labs\ntraining_data: Python's code\nlimits: [I cannot browse.]\n"
                 "examples:\n  - {user: 'Who are you?', assistant: 'I am Pebble.'}\n")
    f = load_facts(p)
    prompt = f.system_prompt()
    assert prompt.startswith("You are Pebble, an AI assistant made by Quarry Labs. You were trained on Python's "
                             "code. I cannot browse.")
    assert "User: Who are you?\nAssistant: I am Pebble." in prompt
    assert f.mentions("i am pebble, by QUARRY labs") == {"name": True, "maker": True}
    assert f.mentions("Pebbles are stones") == {"name": False, "maker": False}  # whole words only
    bad = {"maker: Q\nexamples: [{user: a, assistant: b}]\n": "name: missing",
           "name: P\nmaker: Q\nexamples: []\n": "examples: expected a list",
           "name: P\nmaker: Q\nexamples: [{user: a}]\n": "examples[0]: expected {user: ..., assistant: ...}",
           "name: P\nmaker: Q\nexamples: [{user: a, assistant: b}]\nmesages: [x]\n": "unknown key 'mesages'",
           "name: P\nmaker: Q\nexamples: [{user: a, assistant: b}]\nsystem: hello\n": "system: expected a string",
           "name: [P\n": ":2: not valid YAML"}
    for text, message in bad.items():
        p.write_text(text)
        with pytest.raises(SlmError, match=None) as e:
            load_facts(p)
        assert str(p) in str(e.value) and message in str(e.value), str(e.value)


@pytest.mark.parametrize("family", ["stablelm", "llama"])
def test_batched_generation_equals_one_prompt_at_a_time(family):
    cfg = ModelConfig(family=family, vocab_size=96, hidden_size=32, num_layers=2, num_heads=4,
                      num_kv_heads=4 if family == "stablelm" else 2, intermediate_size=64, max_seq_len=48,
                      partial_rotary_factor=0.25 if family == "stablelm" else 1.0, qkv_bias=family == "stablelm",
                      tie_embeddings=family == "llama", init_std=0.3)
    model = build(cfg, seed=1).eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(90) for _ in range(n)] for n in (1, 7, 3, 12, 5)]
    free = [ids for ids, _ in generate_batch(model, prompts, 20, 0, 0, 1.0, set(), None, n_vocab=90)]
    # a stop token that some rows generate and others do not: rows finish at different steps
    counts = {t: sum(t in ids for ids in free) for ids in free for t in ids}
    stops = {min((t for t in counts if 0 < counts[t] < len(prompts)), key=lambda t: (counts[t], t))}
    batched = generate_batch(model, prompts, 20, 0, 0, 1.0, stops, None, n_vocab=90)
    for p, (ids, stopped) in zip(prompts, batched):
        # the reference: a full forward over the whole sequence for every new token (no cache, no padding)
        seq, want = list(p), []
        with torch.no_grad():
            for _ in range(20):
                logits = model(torch.tensor([seq]))[0, -1]
                logits[90:] = float("-inf")
                t = int(logits.argmax())
                if t in stops:
                    break
                want.append(t)
                seq.append(t)
        assert ids == want
        assert stopped == (len(want) < 20)
    assert any(s for _, s in batched) and not all(s for _, s in batched)  # rows finished early (the cache shrank)


def test_crlft_batches_weight_each_token_by_its_class():
    """Packed rows give the loss of each conversation alone: sum_t w_c (-log p) + kl_coef * sum_positive k3."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=64,
                      max_seq_len=32, partial_rotary_factor=0.5, qkv_bias=True)
    model = build(cfg, seed=2)
    convs, positive = [], []
    rng = np.random.default_rng(0)
    for n, pos in ((9, True), (6, False), (12, True), (5, False)):
        ids = rng.integers(0, 64, n)
        mask = np.zeros(n, dtype=bool)
        mask[n // 2:] = True
        convs.append(Encoded(ids, mask))
        positive.append(pos)
    ref = [rng.normal(-3, 0.5, len(c.ids)) for c in convs]
    rows = CrlftRows(convs, [[0, 1], [2, 3]], 24, 0, 0, positive, (1.0, 0.1), ref)
    mb = rows.micro_batch([0, 1], torch.device("cpu"))
    kl_coef = 0.3
    got, stats = make_loss_fn(kl_coef)(model, mb)
    want, weight = 0.0, 0.0
    for c, pos, r in zip(convs, positive, ref):
        logp = torch.log_softmax(model(torch.tensor(c.ids[None]))[0], -1)
        w = 1.0 if pos else 0.1
        for j in range(1, len(c.ids)):
            if not c.mask[j]:
                continue
            lp = logp[j - 1, c.ids[j]]
            want = want - w * lp
            weight += w
            if pos:
                d = torch.tensor(r[j], dtype=lp.dtype) - lp
                want = want + kl_coef * (torch.exp(d) - 1 - d)
    assert torch.allclose(got, want, rtol=1e-5), (got, want)
    assert mb.n_tokens == pytest.approx(weight)
    assert set(stats) == {"weighted_nll", "kl"}


# --- the stages, end to end on the test model ---------------------------------------------------------------------
SELFKNOW = ["--set", "selfknow.max_length=48", "--set", "selfknow.batch_size=8", "--set",
            "selfknow.micro_batch_size=4", "--set", "selfknow.lr=3e-3", "--set", "train.dtype=fp32"]


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory, base_ckpt):
    from test_post import POST, write_post_data

    from slm.stages.sft import SftConfig, run as sft

    d = tmp_path_factory.mktemp("selfknow")
    data = write_post_data(d)
    chat = sft(SftConfig(model=base_ckpt, data=[str(data / "chat.jsonl")], out=d / "sft",
                         sets=[s for s in POST if s != "--set"], steps=6, device="cpu"))
    (d / "facts.yaml").write_text(FACTS)
    return chat, d / "facts.yaml"


def test_generate_writes_pairs_that_dpo_reads(tmp_path, base_ckpt, chat_ckpt):
    chat, facts = chat_ckpt
    out = tmp_path / "pairs"
    proc = run_cli("selfknow", "generate", "--base", base_ckpt, "--chat", chat, "--facts", facts, "--n", 12,
                   "--max-new-tokens", 8, "--message-max-tokens", 12, "--shots", 3, "--batch-size", 8,
                   "--device", "cpu", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    messages = [json.loads(line) for line in (out / "messages.jsonl").read_text().splitlines()]
    texts = [m["text"] for m in messages]
    # FACTS' messages first, less the duplicate ("who made you"); then distinct ones from the base model
    assert texts[:3] == ["Who are you?", "Who made you?", "What is your name?"]
    assert len({normalize(t) for t in texts}) == len(texts)
    assert not {normalize(q) for q in load_facts(facts).eval} & {normalize(t) for t in texts}
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "selfknow_pairs" and m["facts_sha256"] == load_facts(facts).sha256
    assert [i["role"] for i in m["inputs"]] == ["base", "chat", "facts"]
    assert m["config"]["answer_sampling"] == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 8}
    assert m["counts"]["dropped: duplicate (same words)"] >= 1
    assert (out / "facts.yaml").read_text() == FACTS
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen"][0] == {"role": "user", "content": p["prompt"]} for p in pairs)
    # the pair file is dpo's input as it is
    dpo = run_cli("dpo", "--model", chat, "--data", out / "pairs.jsonl", "--out", tmp_path / "dpo", "--steps", 1,
                  "--set", "dpo.max_length=48", "--set", "dpo.max_prompt_length=24", "--set", "dpo.batch_size=4",
                  "--set", "dpo.micro_batch_size=2", "--device", "cpu")
    assert dpo.returncode == 0, dpo.stderr
    assert "kept" in dpo.stderr


def _pairs_file(path, n=24):
    """Identity pairs: chosen answers state the facts, rejected ones do not."""
    qs = ["Who are you?", "Tell me your name.", "Who built you?", "Introduce yourself.", "What are you called?",
          "Who made you?"]
    rng = random.Random(1)
    with open(path, "w") as f:
        for i in range(n):
            q = qs[i % len(qs)] + " " * (i // len(qs))
            f.write(json.dumps({"prompt": q, "chosen": "I am Pebble, made by Quarry Labs.",
                                "rejected": rng.choice(["I am an assistant.", "3 + 4 = 7."])}) + "\n")
    return path


def test_train_learns_the_name_and_adds_the_negative_token_once(tmp_path, chat_ckpt):
    from slm.stages.selfknow import TrainConfig, run as train

    chat, facts = chat_ckpt
    data = _pairs_file(tmp_path / "pairs.jsonl")
    before_tok = Checkpoint.open(chat).tokenizer()
    assert "<|negative|>" not in before_tok.spec.special_tokens
    last = train(TrainConfig(model=chat, data=[str(data)], out=tmp_path / "sk", facts=facts,
                             sets=[s for s in SELFKNOW if s != "--set"], device="cpu"))
    ckpt = Checkpoint.open(last)
    tok = ckpt.tokenizer()
    assert tok.spec.special_tokens["<|negative|>"] == before_tok.n_vocab  # the next id
    assert ckpt.model_config.vocab_size >= tok.n_vocab
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(last)).convert_tokens_to_ids("<|negative|>") == before_tok.n_vocab
    summary = json.loads((tmp_path / "sk" / "selfknow.json").read_text())
    # seeded learning check: held-out questions' greedy answers state the name after, not before
    assert summary["before"]["name"] == 0.0 and summary["after"]["name"] >= 0.5, summary
    metrics = [r for r in read_metrics(tmp_path / "sk") if "loss" in r]
    assert len(metrics) >= 6 and metrics[-1]["loss"] < metrics[0]["loss"]
    # trained again from its own output: the token is there, nothing is added
    again = train(TrainConfig(model=last, data=[str(data)], out=tmp_path / "sk2", steps=1,
                              sets=[s for s in SELFKNOW if s != "--set"], device="cpu"))
    m = json.loads((tmp_path / "sk2" / "tokenizer" / "manifest.json").read_text())
    assert m["added_special_tokens"] == [] and Checkpoint.open(again).tokenizer().n_vocab == tok.n_vocab


def test_kl_term_uses_cached_reference_logprobs(tmp_path, chat_ckpt):
    from slm.stages.selfknow import TrainConfig, run as train

    chat, _ = chat_ckpt
    data = _pairs_file(tmp_path / "pairs.jsonl", 8)
    sets = [s for s in SELFKNOW if s != "--set"] + ["selfknow.kl_coef=0.5"]
    train(TrainConfig(model=chat, data=[str(data)], out=tmp_path / "kl", steps=2, sets=sets, device="cpu"))
    cache = tmp_path / "kl" / "reference_logprobs"
    m = json.loads((cache / "manifest.json").read_text())
    assert m["kind"] == "reference_logprobs" and m["layout"].startswith("logprobs [tokens]")
    rows = [r for r in read_metrics(tmp_path / "kl") if "loss" in r]
    # the first step's policy is the reference: its KL estimate is 0 (k3 of r = 0), the next one's is not
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-7) and rows[1]["kl"] > 0
    # rerun in a new directory with the cache copied: reused, and the same first steps
    import shutil

    (tmp_path / "kl2").mkdir()
    shutil.copytree(cache, tmp_path / "kl2" / "reference_logprobs")
    train(TrainConfig(model=chat, data=[str(data)], out=tmp_path / "kl2", steps=2, sets=sets, device="cpu"))
    rows2 = [r for r in read_metrics(tmp_path / "kl2") if "loss" in r]
    assert [r["loss"] for r in rows2] == [r["loss"] for r in rows]


def test_cli_errors_name_the_field(tmp_path, chat_ckpt):
    chat, facts = chat_ckpt
    data = _pairs_file(tmp_path / "pairs.jsonl", 4)
    proc = run_cli("selfknow", "train", "--model", chat, "--data", data, "--out", tmp_path / "x",
                   "--class-weights", "pos=1,negative=0.1")
    assert proc.returncode == 2 and "--class-weights 'pos=1,negative=0.1': expected pos=W,neg=W" in proc.stderr
    proc = run_cli("selfknow", "train", "--model", chat, "--data", data, "--out", tmp_path / "x",
                   "--negative-token", "NEG")
    assert proc.returncode == 1 and "selfknow.negative_token" in proc.stderr
    (tmp_path / "f.yaml").write_text("name: P\n")
    proc = run_cli("selfknow", "generate", "--chat", chat, "--facts", tmp_path / "f.yaml", "--n", 0,
                   "--out", tmp_path / "y")
    assert proc.returncode == 1 and "f.yaml: maker: missing" in proc.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.slow
def test_two_processes_train_as_one(tmp_path, chat_ckpt):
    """selfknow train under torchrun with DDP (the KL term on, its reference computed by both processes): the same
    losses as one process."""
    import os
    import subprocess
    import sys

    from test_engine import free_port

    chat, _ = chat_ckpt
    data = _pairs_file(tmp_path / "pairs.jsonl", 16)
    args = ["selfknow", "train", "--model", str(chat), "--data", str(data), "--steps", "3", "--kl-coef", "0.5",
            *map(str, SELFKNOW)]
    one = run_cli(*args, "--out", tmp_path / "one", "--device", "cpu", check=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "slm", *args, "--out", str(tmp_path / "two"), "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == one.stdout.strip().replace("/one/", "/two/")
    a = [(r["loss"], r["kl"]) for r in read_metrics(tmp_path / "one") if "loss" in r]
    b = [(r["loss"], r["kl"]) for r in read_metrics(tmp_path / "two") if "loss" in r]
    np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-7)


def test_chat_data_persona_conversations(tmp_path):
    """chat-data's persona conversations: the system prompt is selfknow's, and the answer takes the identity from it
    (or is generic without one); --facts makes some of them that persona."""
    from slm.formats.facts import parse_facts
    from slm.stages.chat_data import ChatDataConfig, run

    (tmp_path / "facts.yaml").write_text(FACTS)
    out = run(ChatDataConfig(out=tmp_path / "cd", n=200, facts=tmp_path / "facts.yaml"))
    records = [json.loads(line)["messages"] for line in (out / "chat" / "train.jsonl").read_text().splitlines()]
    persona = [m for m in records if m[0]["role"] == "system" and m[0]["content"].startswith("You are ")]
    generic = [m for m in records if m[0]["role"] == "user" and m[1]["content"] == "I am an AI assistant."]
    assert len(persona) > 40 and generic
    ours = [m for m in persona if m[0]["content"] == load_facts(tmp_path / "facts.yaml").system_prompt()]
    assert 0.15 < len(ours) / len(persona) < 0.45
    for m in persona:
        name, maker = m[0]["content"][len("You are "):].split(",")[0], m[0]["content"].split(" made by ")[1]
        maker = maker.split(".")[0]
        f = parse_facts({"name": name, "maker": maker, "examples": [{"user": "a", "assistant": "b"}]}, "x")
        if m[2]["content"].startswith("I am "):  # an identity answer (a task gets its usual answer)
            assert f.mentions(m[2]["content"]) == {"name": True, "maker": True}, m
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["persona_conversations"] == 80


def test_train_resumes_exactly(tmp_path, chat_ckpt):
    """selfknow train stopped after 2 steps and resumed to 4 gives the weights of 4 steps in one go (bit for bit)."""
    import torch

    from slm.stages.selfknow import TrainConfig, run as train

    chat, _ = chat_ckpt
    data = _pairs_file(tmp_path / "pairs.jsonl", 16)
    sets = [s for s in SELFKNOW if s != "--set"] + ["selfknow.kl_coef=0.2", "train.save_every=2"]
    whole = train(TrainConfig(model=chat, data=[str(data)], out=tmp_path / "whole", steps=4, sets=sets, device="cpu"))
    train(TrainConfig(model=chat, data=[str(data)], out=tmp_path / "parts", steps=2, sets=sets, device="cpu"))
    parts = train(TrainConfig(model=chat, data=[str(data)], out=tmp_path / "parts", steps=4, sets=sets, device="cpu"))
    a, b = Checkpoint.open(whole).state_dict(), Checkpoint.open(parts).state_dict()
    assert Checkpoint.open(parts).dir.name == "step-00000004"
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pairs_that_state_the_facts_equally_often_warn(capfd):
    """A chat model that ignores the system prompt answers alike with and without the facts: the pairs teach
    nothing, and `selfknow generate` says so, why, and what to do; a clear gap says nothing."""
    from slm.stages.selfknow_pairs import warn_if_uninformative

    warn_if_uninformative({"chosen_name": 0.0, "rejected_name": 0.0, "chosen_maker": 0.02, "rejected_maker": 0.0})
    err = capfd.readouterr().err
    assert "warning: selfknow: chosen and rejected answers state the facts about as often (the name 0% vs 0%" in err
    assert "does not follow the system prompt" in err and "slm sft" in err
    warn_if_uninformative({"chosen_name": 0.4, "rejected_name": 0.01, "chosen_maker": 0.0, "rejected_maker": 0.0})
    assert capfd.readouterr().err == ""
