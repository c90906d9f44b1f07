"""slm quantize: GGUF files llama.cpp opens (both architectures, the tokenizer, the logits), quantized tensor types,
the quality report, INT4 (OpenVINO + NNCF), and the errors a user sees."""

import json
import os
import re
import unicodedata

import numpy as np
import pytest
import torch
from conftest import VARIED_TEXT, run_cli

from slm.errors import SlmError
from slm.formats.checkpoint import Checkpoint, write_checkpoint
from slm.formats.gguf import read_tensor_types, write_gguf
from slm.formats.tokenizer import Tokenizer, padded_vocab_size
from slm.model.transformer import ModelConfig, build

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is in the test extra (scripts/setup.sh)")


def make_ckpt(tmp_path, tok_dir, family, hidden=64, inter=128, layers=2, heads=4, kv_heads=4, std=0.2, seed=0):
    """A random model of FAMILY with the tokenizer TOK_DIR, written as an slm checkpoint."""
    tok = Tokenizer(tok_dir)
    llama = family == "llama"
    cfg = ModelConfig(family=family, vocab_size=padded_vocab_size(tok.n_vocab), hidden_size=hidden, num_layers=layers,
                      num_heads=heads, num_kv_heads=kv_heads, intermediate_size=inter, max_seq_len=256,
                      partial_rotary_factor=1.0 if llama else 0.25, qkv_bias=not llama, tie_embeddings=llama,
                      init_std=std)
    model = build(cfg, seed=seed)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("rotary.")}
    return write_checkpoint(tmp_path / f"{family}-run", 1, model_cfg=cfg, state_dict=state, tokenizer_dir=tok_dir,
                            lineage={"stage": "test"}, train_state={"step": 1}, optimizer=None, rng_state=None,
                            keep=1, bos_id=tok.bos_id, eos_id=tok.eos_id)


def llama_logits(path, ids):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_ubatch=256, logits_all=True, n_threads=2,
                          type_k=0, type_v=0, verbose=False)  # an f32 KV cache (llama.cpp's default is f16)
    llm.reset()
    llm.eval(list(ids))
    out = np.array(llm.scores[:len(ids)])
    llm.close()
    return out


def torch_logits(ckpt_dir, ids):
    from slm.inference.load import load_model

    model = load_model(Checkpoint.open(ckpt_dir), torch.device("cpu"))
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


@pytest.mark.parametrize("family", ["stablelm", "llama"])
def test_llama_cpp_runs_slm_gguf_with_the_same_logits(tmp_path, small_tok, family):
    ckpt = make_ckpt(tmp_path, small_tok, family, kv_heads=4 if family == "stablelm" else 2)
    path = tmp_path / "m-f32.gguf"
    write_gguf(Checkpoint.open(ckpt), path, "f32")
    tok = Tokenizer(small_tok)
    ids = tok.encode(VARIED_TEXT[0] + VARIED_TEXT[4])[:200]
    ours, theirs = torch_logits(ckpt, ids), llama_logits(path, ids)
    assert theirs.shape == ours.shape
    assert np.abs(theirs - ours).max() < 1e-3 * np.abs(ours).max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() == 1.0
    types = read_tensor_types(path)
    assert ("output.weight" in types) == (family == "stablelm")  # llama: tied, llama.cpp reuses token_embd
    assert "blk.0.attn_q.bias" in types if family == "stablelm" else "blk.0.attn_q.bias" not in types


def test_llama_cpp_tokenizes_as_slm_arcade100k(tmp_path, arcade_dir):
    """The real Arcade100k (100,289 ids) in a GGUF: llama.cpp's "stablelm2" pre-tokenizer and slm's tokenizer give
    the same ids on varied, multilingual text (NFC, as Arcade100k normalises), special tokens included."""
    ckpt = make_ckpt(tmp_path, arcade_dir, "stablelm", hidden=32, inter=64, layers=1, heads=2, kv_heads=2)
    path = tmp_path / "arcade-f16.gguf"
    write_gguf(Checkpoint.open(ckpt), path, "f16")
    tok = Tokenizer(arcade_dir)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in VARIED_TEXT:
        text = unicodedata.normalize("NFC", text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
    special = "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>"
    assert llm.tokenize(special.encode(), add_bos=False, special=True) == tok.encode(special, allowed_special="all")
    assert llm.token_eos() == tok.eos_id and llm.metadata["tokenizer.ggml.pre"] == "stablelm2"


def test_smollm_rules_tokenize_alike(tmp_path, small_corpus):
    from slm.stages.tokenize import TrainConfig, train_bpe as train

    tok_dir = train(TrainConfig(corpus=[str(small_corpus)], vocab_size=700, out=tmp_path / "smol", rules="smollm"))
    ckpt = make_ckpt(tmp_path, tok_dir, "llama", kv_heads=2)
    path = tmp_path / "smol.gguf"
    write_gguf(Checkpoint.open(ckpt), path, "f32")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    tok = Tokenizer(tok_dir)
    assert llm.metadata["tokenizer.ggml.pre"] == "smollm"
    for text in VARIED_TEXT:
        text = unicodedata.normalize("NFC", text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text


def test_quantized_files_have_their_tensor_types(tmp_path, small_tok):
    # rows of 256: k-quants apply to every matrix
    ckpt = make_ckpt(tmp_path, small_tok, "llama", hidden=256, inter=512, heads=4, kv_heads=2)
    out = tmp_path / "q"
    proc = run_cli("quantize", ckpt, "--type", "f16,bf16,q8_0,q4_0,q4_1,q4_k_m,q5_k_m", "--out", out, "--no-report")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    want = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}
    for kind, t in want.items():
        types = read_tensor_types(out / f"llama-run-{kind}.gguf")
        assert types["blk.0.ffn_down.weight"] == t and types["blk.1.attn_q.weight"] == t
        assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    km = read_tensor_types(out / "llama-run-q4_k_m.gguf")
    assert km["blk.0.attn_q.weight"] == "Q4_K" and "Q6_K" in km.values()  # llama.cpp's _M mix
    assert read_tensor_types(out / "llama-run-q5_k_m.gguf")["blk.0.attn_q.weight"] == "Q5_K"
    report = json.loads((out / "quantize.json").read_text())
    assert report["types"]["q4_k_m"]["fallbacks"] == []
    assert report["types"]["q4_0"]["bits_per_weight"] < report["types"]["q8_0"]["bits_per_weight"] < \
        report["types"]["f16"]["bits_per_weight"]
    assert json.loads((out / "manifest.json").read_text())["kind"] == "quantize"
    # every file opens in llama.cpp
    for kind in list(want) + ["q4_k_m", "q5_k_m"]:
        llama_cpp.Llama(model_path=str(out / f"llama-run-{kind}.gguf"), n_ctx=64, verbose=False).close()


def test_the_quality_report_is_consistent(tmp_path, base_ckpt, train_data):
    """On held-out tokens: f16 ~ f32 in perplexity, q4 further from fp32 than q8 (KL), f32 GGUF ~ torch."""
    out = tmp_path / "q"
    proc = run_cli("quantize", base_ckpt, "--type", "f32,f16,q8_0,q4_0", "--out", out, "--valid",
                   train_data / "tokens" / "valid", "--eval-tokens", 512, "--window", 64, "--threads", 2)
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "quantize.json").read_text())
    ref, t = r["reference"]["perplexity"], r["types"]
    assert t["f32"]["kl_mean"] < 1e-6 and t["f32"]["top1_agreement"] == 1.0
    assert abs(t["f16"]["perplexity"] - ref) / ref < 1e-3
    assert t["q4_0"]["kl_mean"] > t["q8_0"]["kl_mean"] > t["f16"]["kl_mean"] >= 0
    assert r["eval"]["tokens"] == 512 - 8  # 8 windows of 64: 63 predictions each
    assert "perplexity" in proc.stderr and "q4_0" in proc.stderr and "llama_" not in proc.stderr


def test_int4_openvino(tmp_path, base_ckpt, small_tok):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from slm.inference.openvino import OpenVinoScorer, weight_types

    out = tmp_path / "q"
    proc = run_cli("quantize", base_ckpt, "--type", "int4", "--out", out, "--eval-tokens", 256, "--window", 64)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out) and "TracerWarning" not in proc.stderr
    d = out / "run-int4"
    summary = json.loads((d / "slm_int4.json").read_text())
    assert summary["mode"] == "int4_sym" and summary["group_size"] == 64  # 128 does not divide hidden 64
    w = weight_types(d / "openvino_model.xml")
    assert w.get("i4", 0) > 0 and w.get("u8", 0) > 0  # int4 layers; the embedding and output matrix 8-bit
    r = json.loads((out / "quantize.json").read_text())["types"]["int4"]
    assert r["top1_agreement"] > 0.8 and r["kl_mean"] > 0, r
    # greedy decoding with the IR agrees with the fp32 model on most tokens
    tok = Tokenizer(small_tok)
    text = "def fib(n):\n    return"
    from slm.inference.generate import GenerateConfig, generate_ids

    want = generate_ids(GenerateConfig(checkpoint=base_ckpt, prompt=text, max_new_tokens=16, temperature=0,
                                       stop_at_eos=False, device="cpu"))
    # --int4-all-layers: the embedding and output matrix in 4 bits as well
    proc = run_cli("quantize", base_ckpt, "--type", "int4", "--int4-all-layers", "--out", tmp_path / "all",
                   "--no-report")
    assert proc.returncode == 0, proc.stderr
    w_all = weight_types(tmp_path / "all" / "run-int4" / "openvino_model.xml")
    assert w_all.get("u8", 0) == 0 and w_all["i4"] > w["i4"]
    sc = OpenVinoScorer(d, tok.n_vocab)
    got = sc.greedy(tok.encode(text), 16, set())
    assert np.mean([a == b for a, b in zip(got, want)]) >= 0.5, (got, want)
    # the IR's KV cache: decoding with it gives what rerunning the whole sequence gives
    seq = tok.encode(text)
    for _ in range(16):
        seq.append(int(sc.logits(np.asarray(seq))[-1].argmax()))
    assert got == seq[-16:]


def test_errors(tmp_path, base_ckpt):
    proc = run_cli("quantize", base_ckpt, "--type", "q3_k", "--out", tmp_path / "x")
    assert proc.returncode == 2 and "--type 'q3_k': expected some of f32, f16" in proc.stderr
    proc = run_cli("quantize", tmp_path / "nothing", "--out", tmp_path / "x")
    assert proc.returncode == 1 and "nothing" in proc.stderr
    assert not (tmp_path / "x").exists()
    bad = tmp_path / "held.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    proc = run_cli("quantize", base_ckpt, "--type", "f16", "--valid", bad, "--out", tmp_path / "x")
    assert proc.returncode == 1 and f"{bad}:2: expected a text field" in proc.stderr, proc.stderr
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob("x.tmp-*"))
    with pytest.raises(SlmError, match="slm writes"):
        write_gguf(Checkpoint.open(base_ckpt), tmp_path / "y.gguf", "q4_k_m")


@pytest.mark.slow
def test_bench_output_parses_in_every_format(tmp_path, base_ckpt):
    """slm bench on a checkpoint (torch), a GGUF (llama.cpp) and an INT4 IR (openvino): md, json and csv parse and
    agree; --out writes the files and the plot."""
    import csv
    import io

    q = tmp_path / "q"
    assert run_cli("quantize", base_ckpt, "--type", "q8_0,int4", "--out", q, "--no-report").returncode == 0
    models = [base_ckpt, q / "run-q8_0.gguf", q / "run-int4"]
    common = ["--prompt", 16, "--gen", 4, "--repeat", 2, "--threads", 1, "--bandwidth", 10]
    as_json = run_cli("bench", *models, *common, "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert [r["backend"] for r in report["results"]] == ["torch", "llama.cpp", "openvino"]
    for r in report["results"]:
        assert r["pp_tokens_per_s"]["mean"] > 0 and r["tg_tokens_per_s"]["mean"] > 0 and r["peak_rss_bytes"] > 0
        assert r["bandwidth_bound_tokens_per_s"] == pytest.approx(10e9 / r["weight_bytes"])
    assert report["device"]["bandwidth_gb_s"] == 10 and report["device"]["threads"] == 1
    # the bytes a token reads: every weight but the (untied) input embedding, which is read one row at a time
    from gguf import GGUFReader
    from safetensors import safe_open

    with safe_open(str(Checkpoint.open(base_ckpt).dir / "model.safetensors"), "pt") as f:
        sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    numel = {k: int(np.prod(s)) for k, s in sizes.items()}
    assert "lm_head.weight" in numel  # untied
    want = 4 * (sum(numel.values()) - numel["model.embed_tokens.weight"])
    assert report["results"][0]["weight_bytes"] == want
    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(models[1])).tensors}
    assert report["results"][1]["weight_bytes"] == sum(tensors.values()) - tensors["token_embd.weight"]
    assert report["results"][1]["weight_bytes"] < models[1].stat().st_size - 1000  # metadata is not read per token
    cpu = report["results"][1]["llama_cpp_cpu"]
    assert re.fullmatch(r"(built in|x64|sse42|sandybridge|ivybridge|piledriver|haswell|skylakex|cannonlake|"
                        r"cascadelake|icelake|cooperlake|zen4|alderlake|sapphirerapids) \([A-Z0-9_ ]*\)", cpu), cpu
    out = tmp_path / "b"
    proc = run_cli("bench", *models, *common, "--out", out, "--format", "csv")
    assert proc.returncode == 0 and proc.stdout.strip() == str(out)
    assert {p.name for p in out.iterdir()} >= {"bench.json", "bench.md", "bench.csv", "bench.png", "manifest.json"}
    rows = list(csv.reader(io.StringIO((out / "bench.csv").read_text())))
    assert rows[0][:3] == ["model", "backend", "size"] and [r[1] for r in rows[1:]] == ["torch", "llama.cpp", "openvino"]
    assert f"llama.cpp CPU backend: {cpu}" in (out / "bench.md").read_text()
    table = [line for line in (out / "bench.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 5 and all(line.count("|") == 10 for line in table)
    bad = run_cli("bench", tmp_path / "nope.bin")
    assert bad.returncode == 1 and "nope.bin" in bad.stderr


def test_given_gguf_files_are_scored_and_their_lineage_checked(tmp_path, base_ckpt, train_data, small_tok):
    """quantize --gguf: a file written elsewhere is scored against the checkpoint beside slm's own types; a GGUF of
    another checkpoint is refused in one line before anything is written: one slm wrote (its weights hash names
    another checkpoint) and one without slm's metadata (its shape is another model's)."""
    from slm.formats.gguf import check_lineage

    first = tmp_path / "first"
    assert run_cli("quantize", base_ckpt, "--type", "f16", "--no-report", "--out", first).returncode == 0
    given = next(first.glob("*-f16.gguf"))
    out = tmp_path / "q"
    proc = run_cli("quantize", base_ckpt, "--type", "q8_0", "--gguf", given, "--out", out, "--valid",
                   train_data / "tokens" / "valid", "--eval-tokens", 256, "--window", 64)
    assert proc.returncode == 0, proc.stderr
    t = json.loads((out / "quantize.json").read_text())["types"]
    assert set(t) == {"q8_0", given.stem} and t[given.stem]["given"] and t[given.stem]["file"] == str(given)
    assert t[given.stem]["kl_mean"] < 1e-4 and t[given.stem]["top1_agreement"] > 0.99
    assert not (out / given.name).exists()  # scored where it is

    # another checkpoint of the same shape, written by slm: its weights hash tells
    other = make_ckpt(tmp_path, small_tok, "stablelm", layers=2)
    other_gguf = tmp_path / "other.gguf"
    write_gguf(Checkpoint.open(other), other_gguf, "f16")
    proc = run_cli("quantize", base_ckpt, "--gguf", other_gguf, "--out", tmp_path / "bad")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{other_gguf}: written from another checkpoint ({other.resolve()}" in proc.stderr
    assert not (tmp_path / "bad").exists()
    # the same file without slm's lineage keys (as llama.cpp's converter writes): the shapes tell
    ckpt = Checkpoint.open(base_ckpt)
    bigger = make_ckpt(tmp_path / "b", small_tok, "stablelm", layers=3)
    foreign = tmp_path / "foreign.gguf"
    write_gguf(Checkpoint.open(bigger), foreign, "f16")
    ckpt.manifest["files"] = []  # as if the checkpoint did not record its weights' hash either
    with pytest.raises(SlmError, match=r"foreign.gguf: not this checkpoint's model \(stablelm.block_count is 3, .* "
                                       r"has 2\)"):
        check_lineage(foreign, ckpt)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF but not really")
    with pytest.raises(SlmError, match="not a GGUF file gguf-py can read"):
        check_lineage(tmp_path / "junk.gguf", ckpt)


def test_bench_peak_memory_is_the_models_own(tmp_path, base_ckpt):
    """Each model is measured in a process of its own; its peak memory must not count the 1 GiB tensor of the
    bandwidth probe that slm bench runs first (getrusage's ru_maxrss does, across fork and exec)."""
    common = ["--prompt", 8, "--gen", 2, "--repeat", 1, "--threads", 1, "--format", "json"]
    given = run_cli("bench", base_ckpt, *common, "--bandwidth", 10)
    probed = run_cli("bench", base_ckpt, *common)
    assert given.returncode == probed.returncode == 0, probed.stderr
    a = json.loads(given.stdout)["results"][0]["peak_rss_bytes"]
    b = json.loads(probed.stdout)["results"][0]["peak_rss_bytes"]
    assert b < a + (256 << 20), (a, b)  # the probe alone holds 1,024 MiB
    assert json.loads(probed.stdout)["device"]["bandwidth_source"].startswith("measured")


def test_bytes_a_generated_token_reads(small_tok):
    """slm bench's bandwidth bound counts the weights one token reads: a tied output matrix once (it is the
    embedding), an untied or transposed one in full, and the input embedding's rows not at all."""
    import copy

    from slm.model.decode import decode_linears
    from slm.stages.bench import read_per_token

    tok = Tokenizer(small_tok)
    for tied in (True, False):
        cfg = ModelConfig(family="llama", vocab_size=padded_vocab_size(tok.n_vocab), hidden_size=64, num_layers=2,
                          num_heads=4, num_kv_heads=2, intermediate_size=128, max_seq_len=64, tie_embeddings=tied)
        model = build(cfg, seed=0)
        params = sum(p.numel() for p in model.parameters())  # a tied matrix is one parameter
        embed = cfg.vocab_size * cfg.hidden_size
        assert read_per_token(model) == 4 * (params if tied else params - embed)
        fast = decode_linears(copy.deepcopy(model))  # the output matrix becomes a copy of its own
        assert read_per_token(fast) == 4 * (params if tied else params - embed)
        assert read_per_token(model.to(torch.bfloat16)) == 2 * (params if tied else params - embed)


def _llama_variants() -> list:
    from slm.inference.llamacpp import cpu_variants

    return cpu_variants()


@pytest.mark.skipif(not _llama_variants(), reason="llama-cpp-python has one built-in CPU backend here (scripts/setup.sh "
                    "builds every variant on x86-64 Linux; these checks need that build)")
def test_llama_cpp_loads_the_best_cpu_variant(tmp_path, small_tok):
    """A GGML_BACKEND_DL build (every CPU variant in site-packages/bin): slm loads them and llama.cpp keeps the one
    with the highest score for this CPU (test_llama_cpp_runs_slm_gguf_with_the_same_logits checks its logits); when
    none can be found, the error is one line naming where slm looked and what to do."""
    import subprocess
    import sys

    from slm.inference.llamacpp import AMX_VARIANTS, _variant_works, cpu_variants, variant_name, variant_score

    variants = {variant_name(p): p for p in cpu_variants()}
    scores = {name: variant_score(p) for name, p in variants.items()}
    assert len(scores) >= 6 and scores["x64"] > 0, scores  # every x86 variant; the baseline runs anywhere
    best = max(scores, key=scores.get)
    path = tmp_path / "m.gguf"
    write_gguf(Checkpoint.open(make_ckpt(tmp_path, small_tok, "llama", kv_heads=2)), path, "f16")
    if best in AMX_VARIANTS and not _variant_works(variants[best])[0]:  # AMX that faults here: the next best
        best = max((n for n in scores if n not in AMX_VARIANTS), key=scores.get)
    script = tmp_path / "open.py"
    script.write_text("import pathlib, sys\n"
                      "import slm.inference.llamacpp as L\n"
                      "if len(sys.argv) > 2:\n"
                      "    L.backend_dirs = lambda pkg: [pathlib.Path(sys.argv[2])]\n"
                      "llm = L.open_gguf(sys.argv[1], 64, 1)\n"
                      "llm.eval([1, 2, 3])\n"
                      "print(L.cpu_backend())\n")
    proc = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{best} ("), (proc.stdout, scores)
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "empty")], capture_output=True,
                          text=True)
    assert proc.returncode != 0
    assert f"none of its CPU backends (libggml-cpu-*) loads from {tmp_path / 'empty'}: set GGML_BACKEND_DIR" \
        in proc.stderr, proc.stderr
    # SLM_LLAMA_CPU picks a variant by name; a name that is not one is a one-line error listing them
    for want, ok in (("x64", True), ("sse42", True), ("nope", False)):
        proc = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True,
                              env={**os.environ, "SLM_LLAMA_CPU": want})
        if ok:
            assert proc.returncode == 0 and proc.stdout.startswith(f"{want} ("), proc.stderr
        else:
            assert proc.returncode != 0 and "SLM_LLAMA_CPU=nope: no such llama.cpp CPU variant; expected one of " \
                "alderlake" in proc.stderr, proc.stderr


def test_an_amx_variant_that_faults_is_passed_over(tmp_path, monkeypatch, capsys):
    """Where llama.cpp would pick its AMX variant and that variant dies on this machine (seen: SIGILL at the first
    tile instruction on a VM whose CPU reports AMX), slm loads the best other variant and says why; a variant that
    ran, or a CPU without AMX, leaves the choice to llama.cpp."""
    import slm.inference.llamacpp as L

    found = [tmp_path / f"libggml-cpu-{n}.so" for n in ("haswell", "icelake", "sapphirerapids", "x64")]
    scores = {"haswell": 64, "icelake": 1472, "sapphirerapids": 4032, "x64": 1}
    monkeypatch.delenv("SLM_LLAMA_CPU", raising=False)
    monkeypatch.setattr(L, "variant_score", lambda p: scores[L.variant_name(p)])
    monkeypatch.setattr(L, "_cpu_flags", lambda: {"avx512f", "amx_tile", "amx_int8"})
    monkeypatch.setattr(L, "_variant_works", lambda v: (False, "killed by SIGILL"))
    assert L._choose_variant(found) == found[1]
    assert "sapphirerapids CPU variant (AMX) fails on this machine (killed by SIGILL running a small q8_0 model): " \
        "using icelake instead (SLM_LLAMA_CPU picks a variant)" in " ".join(capsys.readouterr().err.split())
    monkeypatch.setattr(L, "_variant_works", lambda v: (True, "ran"))
    assert L._choose_variant(found) is None
    monkeypatch.setattr(L, "_variant_works", lambda v: (False, "killed by SIGILL"))
    monkeypatch.setattr(L, "_cpu_flags", lambda: {"avx512f"})
    assert L._choose_variant(found) is None


@pytest.mark.skipif(not _llama_variants(), reason="needs llama-cpp-python built with every CPU variant")
def test_the_variant_check_runs_a_quantized_model_once_per_machine(tmp_path, monkeypatch):
    """_variant_works runs the variant on a small q8_0 model (the quantized products AMX kernels take) in a child
    process and remembers the answer; the model is one llama.cpp opens and computes finite logits with."""
    import llama_cpp

    import slm.inference.llamacpp as L

    L._write_probe_model(tmp_path / "probe.gguf")
    m = L.open_gguf(tmp_path / "probe.gguf", 64, 1, logits_all=True)  # every row's logits (else only the last)
    m.eval([1, 2, 3, 4])
    assert m.n_vocab() == 256 and np.isfinite(np.array(m.scores[:4])).all()
    assert llama_cpp.llama_model_n_params(m.model) == 2 * 256 * 256 + 4 * 256 * 256 + 3 * 512 * 256 + 3 * 256
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    x64 = next(p for p in L.cpu_variants() if L.variant_name(p) == "x64")
    assert L._variant_works(x64) == (True, "ran")
    cache = json.loads((tmp_path / "cache" / "slm" / "llama-cpu.json").read_text())
    (entry,) = cache.values()
    assert entry == {"ok": True, "why": "ran"}
    (tmp_path / "cache" / "slm" / "llama-cpu.json").write_text(json.dumps({k: {"ok": False, "why": "killed by X"}
                                                                            for k in cache}))
    assert L._variant_works(x64) == (False, "killed by X")  # remembered, not run again


def _die(q):
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def _report(q):
    q.put(("ok", {"tg": 1.0}))


def test_bench_names_a_measuring_process_that_dies_without_a_result():
    """`slm bench` measures each model in a child process; one that crashes in native code (llama.cpp's AMX kernels
    died with SIGILL on one VM) or is killed gives a one-line error naming how it ended, where the parent used to
    wait on its queue forever; a child that reports and exits is read as before."""
    import multiprocessing

    from slm.stages.bench import _result

    ctx = multiprocessing.get_context("spawn")
    for target, want in ((_die, "was killed by SIGKILL before reporting"), (_report, None)):
        q = ctx.Queue()
        p = ctx.Process(target=target, args=(q,))
        p.start()
        if want is None:
            assert _result(q, p, "m.gguf") == ("ok", {"tg": 1.0})
        else:
            with pytest.raises(SlmError, match=f"m.gguf: the process measuring it {want}"):
                _result(q, p, "m.gguf")
        p.join()
