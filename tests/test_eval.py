"""slm eval: lm-eval on slm's local tasks for a checkpoint and its GGUF (agreeing), the GGUF model class against
llama.cpp's logits and slm's own greedy generation, suites against lm-eval's registry, and the errors a user sees."""

import json
import random

import numpy as np
import pytest
from conftest import run_cli

from slm.formats.checkpoint import Checkpoint
from slm.formats.gguf import write_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is in the test extra (scripts/setup.sh)")
pytest.importorskip("lm_eval", reason="lm-eval is in the test extra (scripts/setup.sh)")

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="module")
def model_pair(tmp_path_factory, small_tok):
    """A random llama-family checkpoint (GQA, tied embeddings, peaked logits) and its f32 GGUF."""
    from test_quantize import make_ckpt

    d = tmp_path_factory.mktemp("evalpair")
    ckpt = make_ckpt(d, small_tok, "llama", kv_heads=2, std=0.15)
    gguf = d / "m-f32.gguf"
    write_gguf(Checkpoint.open(ckpt), gguf, "f32")
    return ckpt, gguf


class Req:
    def __init__(self, *args):
        self.args = args


def log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_gguf_model_scores_equal_llama_cpp_logits(model_pair):
    """slm-gguf's log-likelihoods (any request order: the cache reuse must not leak) equal log-softmax of
    llama.cpp's logits computed directly; rolling log-likelihood = the sum over the document after the prefix token;
    greedy generation = slm's torch greedy tokens, cut at the stop string."""
    from slm.evaluation.llamacpp import LlamaCppLM
    from slm.inference.generate import GenerateConfig, generate_ids

    ckpt, gguf = model_pair
    lm = LlamaCppLM(pretrained=str(gguf), threads=2)
    contexts = ["The quick brown fox", "def main():\n    return", "Question: What is 3 + 4?\nAnswer:"]
    conts = [" jumps over", " the lazy dog.", " None", " 7", " seven"]
    reqs = [Req(c, k) for c in contexts for k in conts] + [Req("", "Hello world")]
    got = lm.loglikelihood(reqs)
    shuffled = list(range(len(reqs)))
    random.Random(0).shuffle(shuffled)
    again = lm.loglikelihood([reqs[i] for i in shuffled])
    for j, i in enumerate(shuffled):
        assert again[j][0] == pytest.approx(got[i][0], abs=1e-4) and again[j][1] == got[i][1]

    ref = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, n_batch=256, logits_all=True, n_threads=2, type_k=0,
                          type_v=0, verbose=False)
    for r, (logprob, greedy) in zip(reqs, got):
        context, cont = r.args
        whole = ref.tokenize((context + cont).encode(), add_bos=False, special=True)
        n_ctx = len(ref.tokenize(context.encode(), add_bos=False, special=True)) if context else 0
        if not context:
            whole = [lm.prefix_token_id] + whole
            n_ctx = 1
        ref.reset()
        ref.eval(whole[:-1])
        lp = log_softmax(np.array(ref.scores[:len(whole) - 1, :lm.n_vocab]))
        targets = whole[n_ctx:]
        rows = lp[n_ctx - 1:]
        assert logprob == pytest.approx(float(rows[np.arange(len(targets)), targets].sum()), abs=2e-4)
        assert greedy == bool((rows.argmax(-1) == np.array(targets)).all())

    doc = "Rolling log-likelihood over a document: every token is predicted once."
    (rolled,) = lm.loglikelihood_rolling([Req(doc)])
    ids = [lm.prefix_token_id] + ref.tokenize(doc.encode(), add_bos=False, special=True)
    ref.reset()
    ref.eval(ids[:-1])
    lp = log_softmax(np.array(ref.scores[:len(ids) - 1, :lm.n_vocab]))
    assert rolled == pytest.approx(float(lp[np.arange(len(ids) - 1), ids[1:]].sum()), abs=2e-4)
    ref.close()

    prompt = "def add(a, b):"
    (text,) = lm.generate_until([Req(prompt, {"until": ["\n\n\n"], "max_gen_toks": 12, "do_sample": False})])
    ids = generate_ids(GenerateConfig(checkpoint=ckpt, prompt=prompt, max_new_tokens=12, temperature=0,
                                      stop_at_eos=True))
    expected = lm.tok_decode(ids)
    assert text == expected.split("\n\n\n")[0]


def test_local_suite_on_a_checkpoint_and_its_gguf(tmp_path, model_pair):
    """`slm eval CKPT F32.gguf --suite slm-local`: lm-eval runs offline on the local tasks for both; the f32 GGUF
    (llama.cpp) and the checkpoint (lm-eval's transformers model) agree closely, per sample too; lm-eval's results
    and per-sample logs, eval.json, eval.md and the plot are written."""
    ckpt, gguf = model_pair
    out = tmp_path / "ev"
    proc = run_cli("eval", ckpt, gguf, "--suite", "slm-local", "--limit", 12, "--out", out, "--plot",
                   tmp_path / "e.png", env=OFFLINE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(out)
    report = json.loads((out / "eval.json").read_text())
    assert [t["task"] for t in report["tasks"]] == ["slm_heldout", "slm_cloze", "slm_arith"]
    a, b = (m["scores"] for m in report["models"])
    assert [m["backend"] for m in report["models"]] == ["hf", "gguf"]
    assert a["slm_heldout"]["metric"] == "bits_per_byte,none" and a["slm_heldout"]["value"] > 0
    assert b["slm_heldout"]["value"] == pytest.approx(a["slm_heldout"]["value"], rel=1e-3)
    assert b["slm_cloze"]["value"] == a["slm_cloze"]["value"] and a["slm_cloze"]["n"] == 12
    assert b["slm_arith"]["value"] == a["slm_arith"]["value"] and a["slm_arith"]["shots"] == 3
    for label in ("llama-run", "m-f32"):
        files = list((out / "lm-eval" / label).iterdir())
        assert any(f.name.startswith("results_") for f in files)
        assert any(f.name.startswith("samples_slm_cloze") for f in files)
    logs = []
    for label in ("llama-run", "m-f32"):
        (f,) = (out / "lm-eval" / label).glob("samples_slm_cloze_*.jsonl")
        logs.append([json.loads(line) for line in f.read_text().splitlines()])
    for x, y in zip(*logs):
        lx = [float(r[0][0]) if isinstance(r[0], list) else float(r[0].strip("()[]").split(",")[0])
              for r in x["resps"]]
        ly = [float(r[0][0]) if isinstance(r[0], list) else float(r[0].strip("()[]").split(",")[0])
              for r in y["resps"]]
        np.testing.assert_allclose(lx, ly, atol=2e-3)
    table = (out / "eval.md").read_text().splitlines()
    assert table[0].startswith("| model | slm_heldout (bits_per_byte, 0-shot)") and len(table) == 4
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "manifest.json").read_text())["kind"] == "eval"
    assert "| llama-run |" in proc.stderr  # the table on stderr


def test_suites_resolve_in_lm_eval_registry():
    """Every suite's tasks exist in lm-eval's registry (no download) with the shots and metrics the papers used."""
    from lm_eval.tasks import TaskManager

    from slm.evaluation.local import write_tasks
    from slm.stages.eval import load_suites, suite_specs

    specs = {name: suite_specs(name)[0] for name in load_suites()}
    assert [(s.task, s.shots) for s in specs["stablelm2-leaderboard"]] == [
        ("arc_challenge", 25), ("hellaswag", 10), ("mmlu", 5), ("truthfulqa_mc2", 0), ("winogrande", 5),
        ("gsm8k", 5)]
    multi = specs["stablelm2-multilingual"]
    assert len(multi) == 24 and {s.task for s in multi} >= {"arc_de", "hellaswag_pt", "m_mmlu_nl", "truthfulqa_it_mc2"}
    assert {(s.task, s.shots) for s in specs["smollm2-base"]} >= {("hellaswag", 0), ("piqa", 0), ("gsm8k", 5)}
    tm = TaskManager(include_path=str(write_tasks(__import__("tempfile").mkdtemp())))
    for name, items in specs.items():
        for s in items:
            assert s.task in tm.all_tasks, (name, s.task)
            entry = tm.task_index[s.task]
            cfg = entry.cfg or {}
            metric = s.metric.split(",")[0]
            listed = [m["metric"] for m in cfg.get("metric_list") or []]
            if listed:  # a task (groups aggregate their members' metric)
                assert metric in listed, (s.task, metric, listed)
            if "filter" in s.metric and s.metric.split(",")[1] != "none":
                assert s.metric.split(",")[1] in [f["name"] for f in cfg.get("filter_list") or []], s.task


def test_errors(tmp_path, model_pair):
    """A missing dataset, an unknown task or suite, a file that is not GGUF: one line each, exit 1 (2 for a bad
    command line), nothing written."""
    ckpt, gguf = model_pair
    missing = run_cli("eval", gguf, "--tasks", "arc_easy", "--out", tmp_path / "a", env=OFFLINE)
    assert missing.returncode == 1
    line = missing.stderr.strip().splitlines()[-1]
    assert "arc_easy" in line and "allenai/ai2_arc" in line and "HF_DATASETS_CACHE" in line, missing.stderr[-2000:]
    assert not (tmp_path / "a").exists()
    unknown = run_cli("eval", gguf, "--tasks", "slm_cloze,no_such_task", "--out", tmp_path / "b", env=OFFLINE)
    assert unknown.returncode == 1 and "'no_such_task' is not an lm-eval task" in unknown.stderr
    suite = run_cli("eval", gguf, "--suite", "nope", "--out", tmp_path / "c")
    assert suite.returncode == 2 and "--suite 'nope': expected one of" in suite.stderr
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a model")
    bad = run_cli("eval", fake, "--suite", "slm-local", "--out", tmp_path / "d")
    assert bad.returncode == 1 and "not a GGUF file" in bad.stderr
    neither = run_cli("eval", gguf, "--out", tmp_path / "e")
    assert neither.returncode == 2 and "--suite NAME or --tasks" in neither.stderr


@pytest.fixture(scope="module")
def chat_pair(tmp_path_factory, base_ckpt):
    """A (briefly) fine-tuned chat checkpoint with a ChatML template, and its f32 GGUF."""
    from test_post import _sft, write_post_data

    d = tmp_path_factory.mktemp("evalchat")
    ckpt = _sft(base_ckpt, write_post_data(d), d / "chat", 2)
    gguf = d / "chat-f32.gguf"
    write_gguf(Checkpoint.open(ckpt), gguf, "f32")
    return ckpt, gguf


QUESTIONS = [{"question_id": 1, "category": "math", "turns": ["What is 3 plus 2?", "And 4 plus 1?"]},
             {"question_id": "w1", "category": "writing", "turns": ["Say hello."]}]


def test_mt_bench_with_an_http_judge_and_a_tiny_judge(tmp_path, chat_pair):
    """Two-turn questions answered by a checkpoint and a GGUF; a fake OpenAI-compatible judge on localhost grades
    turn 1 with [[7]] and turn 2 with "Rating: 4": per-category and mean scores by hand; the judge saw the question
    and the answer; then the same flow with a tiny GGUF judge (whose replies need not hold a rating)."""
    import http.server
    import threading

    ckpt, gguf = chat_pair
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    seen = []

    class Judge(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body))
            prompt = body["messages"][-1]["content"]
            reply = "Good. Rating: [[7]]" if prompt.count("[Assistant]") == 1 else "Weaker.\nRating: 4"
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "mt"
        proc = run_cli("eval", ckpt, gguf, "--mt-bench", qfile, "--judge",
                       f"http://127.0.0.1:{server.server_address[1]}/v1", "--judge-model", "fake-judge", "--out", out)
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr[-3000:]
    mt = json.loads((out / "mt_bench.json").read_text())
    assert len(mt["models"]) == 2 and len(seen) == 2 * 3
    for m in mt["models"]:
        assert m["judged"] == m["turns"] == 3
        assert m["per_category"] == {"math": 5.5, "writing": 7.0} and m["mean"] == pytest.approx(6.0)
    path, body = seen[0]
    assert path == "/v1/chat/completions" and body["model"] == "fake-judge" and body["temperature"] == 0
    first = mt["models"][0]["answers"][0]
    assert "What is 3 plus 2?" in body["messages"][-1]["content"]
    assert first["answers"][0] in body["messages"][-1]["content"]
    assert "Rating: [[N]]" in body["messages"][-1]["content"]
    assert "MT-Bench-style" in proc.stderr and "| 6.00 |" in proc.stderr

    tiny = run_cli("eval", gguf, "--mt-bench", qfile, "--judge", gguf, "--out", tmp_path / "mt2", "--json")
    assert tiny.returncode == 0, tiny.stderr[-2000:]
    m = json.loads(tiny.stdout)["mt_bench"]["models"][0]  # --json: eval.json on stdout
    assert m == json.loads((tmp_path / "mt2" / "mt_bench.json").read_text())["models"][0]
    assert m["turns"] == 3 and 0 <= m["judged"] <= 3
    assert all(isinstance(g["judgement"], str) for a in m["answers"] for g in a["grades"])
    assert (m["mean"] is None) == (m["judged"] == 0)


def test_mt_bench_input_errors(tmp_path, chat_pair):
    _, gguf = chat_pair
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps(QUESTIONS[0]) + "\n" + json.dumps({"question_id": 2, "turns": []}) + "\n")
    proc = run_cli("eval", gguf, "--mt-bench", bad, "--judge", gguf, "--out", tmp_path / "x")
    assert proc.returncode == 1 and f"{bad}:2: 'turns' must be a list of non-empty strings" in proc.stderr
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(QUESTIONS[0]) + "\n")
    nojudge = run_cli("eval", gguf, "--mt-bench", good, "--out", tmp_path / "y")
    assert nojudge.returncode == 2 and "--judge" in nojudge.stderr
    down = run_cli("eval", gguf, "--mt-bench", tmp_path / "none.jsonl", "--judge", "http://127.0.0.1:9/v1",
                   "--out", tmp_path / "z")
    assert down.returncode == 1 and "no such file" in down.stderr
    from slm.evaluation.mtbench import parse_rating

    assert parse_rating("ok [[8]]") == 8 and parse_rating("Rating: 3") == 3
    assert parse_rating("[[11]]") is None and parse_rating("great answer") is None


def test_task_scores_during_training_equal_slm_eval_of_the_checkpoint(tmp_path, train_data):
    """train.eval_tasks: the run scores itself every eval_every steps through slm eval's code; its scores at the last
    step equal `slm eval` of the checkpoint it saved, on the same tasks and limits; loss.png draws them."""
    run = tmp_path / "run"
    proc = run_cli("pretrain", "--config", train_data / "model.yaml", "--data", train_data / "mix", "--out", run,
                   "--steps", "4", "--device", "cpu", "--set", "train.eval_every=2",
                   "--set", "train.eval_tasks=[slm_heldout:6, slm_cloze:10]", env=OFFLINE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "task scores every 2 steps and at the end: slm_heldout (6), slm_cloze (10)" in proc.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"task_scores"' in line]
    assert [r["step"] for r in rows] == [1, 3] and all(r["task_eval_seconds"] > 0 for r in rows)
    assert not (run / ".task-eval").exists()
    want = {}
    for task, limit in (("slm_heldout", 6), ("slm_cloze", 10)):
        ev = run_cli("eval", run, "--tasks", task, "--limit", limit, "--out", tmp_path / f"ev-{task}", env=OFFLINE)
        assert ev.returncode == 0, ev.stderr[-2000:]
        want[task] = json.loads((tmp_path / f"ev-{task}" / "eval.json").read_text())["models"][0]["scores"][task]
    assert rows[-1]["task_scores"]["slm_heldout"] == pytest.approx(want["slm_heldout"]["value"], rel=1e-6)
    assert rows[-1]["task_scores"]["slm_cloze"] == want["slm_cloze"]["value"]
    bad = run_cli("pretrain", "--config", train_data / "model.yaml", "--data", train_data / "mix", "--out",
                  tmp_path / "bad", "--steps", "1", "--device", "cpu", "--set", "train.eval_tasks=[slm_cloze:0]",
                  env=OFFLINE)
    assert bad.returncode == 1 and "train.eval_tasks: 'slm_cloze:0': expected NAME or NAME:LIMIT" in bad.stderr
    (tmp_path / "empty").mkdir()
    unknown = run_cli("pretrain", "--config", train_data / "model.yaml", "--data", train_data / "mix", "--out",
                      tmp_path / "bad2", "--steps", "1", "--device", "cpu", "--set", "train.eval_tasks=[no_such_task]",
                      "--set", f"train.eval_include_path=[{tmp_path / 'empty'}]", env=OFFLINE)
    last = unknown.stderr.strip().splitlines()[-1]
    assert unknown.returncode == 1 and unknown.stderr.count("error:") == 1, unknown.stderr
    assert last.startswith("error: train.eval_tasks: 'no_such_task' is not an lm-eval task (nor one in "
                           "train.eval_include_path)"), last
    assert not (tmp_path / "bad2").exists()  # nothing left behind
