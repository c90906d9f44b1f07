"""The model against transformers: parameter counts, logits (packed and unpacked), the KV cache, the fused loss."""

import pytest
import torch
import torch.nn.functional as F

from slm.model.hf import from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict
from slm.model.loss import linear_cross_entropy
from slm.model.transformer import KVCache, ModelConfig, build, document_mask, positions_from_segments
from slm.recipes import load_recipe

STABLELM = ModelConfig(family="stablelm", vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4,
                       intermediate_size=256, partial_rotary_factor=0.25, qkv_bias=True, max_seq_len=128)
LLAMA = ModelConfig(family="llama", vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=256, tie_embeddings=True, max_seq_len=128)


@pytest.mark.parametrize("recipe,expected", [
    ("stablelm-2-1_6b", 1_644_515_328),  # transformers' count (LayerNorms with bias); the card says 1,644,417,024
    ("smollm2-135m", 134_515_008),
    ("smollm2-360m", 361_821_120),
    ("smollm2-1_7b", 1_711_376_384),
])
def test_parameter_counts_of_the_recipes(recipe, expected):
    model = build(ModelConfig(**load_recipe(recipe)["model"]), "meta")
    assert model.num_parameters() == expected
    if recipe == "stablelm-2-1_6b":
        per_layer_norm_biases = 24 * 2 * 2048
        assert expected - per_layer_norm_biases == 1_644_417_024


def test_tiny_recipe_is_small_and_kquant_friendly():
    cfg = ModelConfig(vocab_size=8192, **load_recipe("tiny")["model"])
    model = build(cfg, "meta")
    assert 2_000_000 < model.num_parameters() < 10_000_000
    for name, p in model.named_parameters():
        if p.ndim == 2:
            assert p.shape[1] % 256 == 0, name  # GGUF k-quants need rows divisible by 256


def hf_twin(model, cfg):
    """transformers' model with the same weights."""
    import transformers

    conf = {k: v for k, v in to_hf_config(cfg, 0, 0).items() if k != "architectures"}
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**conf),
                                                      attn_implementation="eager", dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict(), cfg), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    return hf.eval()


def random_model(cfg, seed=0):
    model = build(cfg, seed=seed)
    with torch.no_grad():  # make norms and biases non-trivial so that a mix-up shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.mark.parametrize("cfg", [STABLELM, LLAMA], ids=["stablelm", "llama"])
def test_logits_equal_transformers(cfg):
    model = random_model(cfg)
    hf = hf_twin(model, cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 57), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split_from", [10**9, 16], ids=["dense-mask", "document-runs"])
@pytest.mark.parametrize("cfg", [STABLELM, LLAMA], ids=["stablelm", "llama"])
def test_packed_documents_equal_each_document_alone(cfg, split_from, monkeypatch):
    """Both CPU paths for packed rows (the dense mask; one causal call per document, which rows of 512 tokens or
    more take) against transformers on each document alone."""
    import slm.model.transformer as T

    monkeypatch.setattr(T, "SPLIT_DOCUMENTS_FROM", split_from)
    model = random_model(cfg, seed=3)
    hf = hf_twin(model, cfg)
    g = torch.Generator().manual_seed(2)
    lengths = [[20, 30, 14], [64], [1, 40, 23]]
    rows, segs = [], []
    for doc_lengths in lengths:
        rows.append(torch.randint(0, cfg.vocab_size, (sum(doc_lengths),), generator=g))
        segs.append(torch.repeat_interleave(torch.arange(len(doc_lengths)), torch.tensor(doc_lengths)))
    ids, seg = torch.stack(rows), torch.stack(segs)
    with torch.no_grad():
        packed = model(ids, segment_ids=seg)
        for b, doc_lengths in enumerate(lengths):
            start = 0
            for n in doc_lengths:
                alone = hf(ids[b:b + 1, start:start + n]).logits[0]
                torch.testing.assert_close(packed[b, start:start + n], alone, rtol=1e-5, atol=1e-5)
                start += n


def test_document_runs_are_taken_for_long_rows_on_a_cpu_only(monkeypatch):
    from slm.model.transformer import SPLIT_DOCUMENTS_FROM, DocumentRuns, document_runs

    T = SPLIT_DOCUMENTS_FROM
    seg = torch.zeros(3, T, dtype=torch.long)
    seg[0, 100:] = 1
    seg[0, 400:] = 2
    seg[2, T - 1:] = 1
    assert document_runs(seg) == DocumentRuns(((100, 300, T - 400), (T,), (T - 1, 1)))
    assert document_runs(seg[:, :T - 1]) is None  # shorter rows: the dense mask is faster
    back = seg.clone()
    back[0, 450:] = 0  # an id that comes back: the mask joins both runs, so runs are not the same thing
    assert document_runs(back) is None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert document_runs(seg) is None


@pytest.mark.parametrize("ac", [False, True], ids=["plain", "activation-checkpointing"])
@pytest.mark.parametrize("cfg", [STABLELM, LLAMA], ids=["stablelm", "llama"])
def test_training_on_document_runs_equals_the_dense_mask(cfg, ac, monkeypatch):
    """Loss and every gradient of a training step on packed rows of 600 tokens: one causal call per document
    against the dense mask."""
    import slm.model.transformer as T

    cfg = ModelConfig.from_dict({**cfg.to_dict(), "max_seq_len": 600})
    model = build(cfg, seed=0)
    model.activation_checkpointing = ac
    ids = torch.randint(0, cfg.vocab_size, (3, 600), generator=torch.Generator().manual_seed(4))
    seg = torch.zeros(3, 600, dtype=torch.long)
    seg[0, 100:] = 1
    seg[0, 420:] = 2
    seg[2, 1:] = 1  # a one-token document first
    real_attend, masks = T.attend, []
    monkeypatch.setattr(T, "attend", lambda q, k, v, mask: masks.append(type(mask).__name__) or real_attend(q, k, v, mask))
    results = []
    for split_from in (512, 10**9):
        monkeypatch.setattr(T, "SPLIT_DOCUMENTS_FROM", split_from)
        model.zero_grad(set_to_none=True)
        s, n = model(ids, segment_ids=seg, targets=ids)
        (s / n).backward()
        results.append((s.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (runs_loss, runs_grads), (mask_loss, mask_grads) = results
    assert {masks[0], masks[-1]} == {"DocumentRuns", "Tensor"}, masks
    torch.testing.assert_close(runs_loss, mask_loss, rtol=1e-6, atol=1e-4)
    for k in mask_grads:
        torch.testing.assert_close(runs_grads[k], mask_grads[k], rtol=1e-4, atol=1e-6, msg=k)


def test_positions_restart_at_document_starts():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert positions_from_segments(seg).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_flex_attention_equals_the_masked_fallback():
    """The GPU path (FlexAttention block mask) against the boolean-mask SDPA path. On a CPU FlexAttention has no
    backward, so this compares the forward; a GPU machine runs the backward (benchmarks/train_step.py)."""
    torch.manual_seed(0)
    B, T = 2, 200
    q, k, v = torch.randn(B, 4, T, 32), torch.randn(B, 2, T, 32), torch.randn(B, 2, T, 32)
    seg = torch.zeros(B, T, dtype=torch.long)
    seg[0, 70:] = 1
    seg[1, 20:] = 1
    seg[1, 150:] = 2
    from slm.model.transformer import attend

    flex = attend(q, k, v, document_mask(seg, "flex"))
    sdpa = attend(q, k, v, document_mask(seg, "sdpa"))
    torch.testing.assert_close(flex, sdpa, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch,heads,kv,threads,expand", [
    (1, 9, 3, 2, True),  # SmolLM2-135M, one sequence: 3 tasks on 2 threads grouped, 9 expanded
    (1, 15, 5, 2, True),  # SmolLM2-360M
    (2, 9, 3, 2, False),  # 6 tasks: even either way, grouped needs no copies
    (1, 32, 8, 2, False),  # SmolLM2-1.7B
    (1, 9, 3, 1, False),  # one thread: nothing idles
    (2, 9, 3, 16, True),  # 6 of 16 threads busy grouped, 18 tasks expanded
])
def test_cpu_training_expands_kv_heads_where_the_backward_balances_better(monkeypatch, batch, heads, kv, threads,
                                                                         expand):
    """SDPA's CPU backward runs one task per (sequence, kv head) with grouped heads: slm expands the kv heads in
    training where that leaves threads idle, and the result is the same either way."""
    import slm.model.transformer as T

    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    torch.manual_seed(0)
    T_ = 40
    q = torch.randn(batch, heads, T_, 16, requires_grad=True)
    k, v = (torch.randn(batch, kv, T_, 16, requires_grad=True) for _ in range(2))
    assert T._expand_kv(q, k) is expand
    assert T._expand_kv(q.detach(), k) is False  # inference: the forward's tasks are per query head already
    with torch.no_grad():
        assert T._expand_kv(q, k) is False
    seg = torch.zeros(batch, T_, dtype=torch.long)
    seg[:, 25:] = 1
    results = {}
    for flag in (False, True):
        monkeypatch.setattr(T, "EXPAND_KV_ON_CPU", flag)
        for mask in ("causal", document_mask(seg, "sdpa")):
            y = T.attend(q, k, v, mask)
            grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), (q, k, v))
            results.setdefault(flag, []).append((y, *grads))
    for grouped, expanded in zip(results[False], results[True]):
        for a, b in zip(grouped, expanded):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cfg", [STABLELM, LLAMA], ids=["stablelm", "llama"])
def test_a_compiled_training_forward_is_one_graph_on_a_cpu(cfg):
    """torch.compile of the training forward (fused loss, packed rows) on a CPU without graph breaks: the loss's
    check for ignored targets, the kv-head choice and the per-document attention step aside while compiling."""
    import slm.model.transformer as T

    cfg = ModelConfig.from_dict({**cfg.to_dict(), "max_seq_len": T.SPLIT_DOCUMENTS_FROM})
    model = build(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (1, T.SPLIT_DOCUMENTS_FROM), generator=torch.Generator().manual_seed(0))
    seg = torch.zeros_like(ids)
    seg[:, 200:] = 1
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    for kwargs in ({}, {"segment_ids": seg}):
        s, n = compiled(ids, targets=ids, **kwargs)
        torch.testing.assert_close(s, model(ids, targets=ids, **kwargs)[0], rtol=1e-5, atol=1e-4)


def test_the_kv_expansion_choice_does_not_break_a_compiled_graph():
    import slm.model.transformer as T

    q = torch.randn(1, 9, 32, 16, requires_grad=True)
    k, v = torch.randn(1, 3, 32, 16), torch.randn(1, 3, 32, 16)
    compiled = torch.compile(lambda q, k, v: T.attend(q, k, v, "causal"), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v), T.attend(q, k, v, "causal"))


@pytest.mark.parametrize("cfg", [STABLELM, LLAMA], ids=["stablelm", "llama"])
def test_kv_cache_equals_full_forward(cfg):
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 30))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(cfg, 2, 40, "cpu", torch.float32)
        first = model(ids[:, :10], cache=cache)
        chunk = model(ids[:, 10:25], cache=cache)  # several new tokens against a filled cache
        steps = [model(ids[:, i:i + 1], cache=cache) for i in range(25, 30)]
    torch.testing.assert_close(torch.cat([first, chunk] + steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compile_step", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("cfg", [STABLELM, LLAMA], ids=["stablelm", "llama"])
def test_static_decoder_equals_full_forward(cfg, compile_step):
    """slm bench's decoder (its weight layouts, one-row products split over threads, steps over the written cache
    or the whole masked cache when compiled) gives the logits of one full forward at every generated position, for
    two rows at once and for one row on 1, 2 and 3 threads (GQA and tied output included)."""
    import copy

    from slm.model.decode import DecodeLinear, StaticDecoder, decode_linears

    torch.manual_seed(0)
    model = build(cfg, seed=0).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(ids)
    fast = decode_linears(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.Linear) for m in fast.modules())
    assert isinstance(fast.lm_head, DecodeLinear)
    dec = StaticDecoder(fast, batch=2, max_len=40, compile=compile_step)
    for _ in range(2):  # a second prompt reuses the cache (and the compiled graph) after a reset
        got = [dec.prefill(ids[:, :10])] + [dec.step(ids[:, t]) for t in range(10, 23)]
        torch.testing.assert_close(torch.stack(got, 1), full[:, 9:23], atol=2e-5, rtol=1e-4)
    assert dec.length == 23
    with pytest.raises(ValueError, match="cache holds 40"):
        dec.prefill(torch.zeros((2, 40), dtype=torch.long))
    assert fast.layers[0].mlp.down_proj.by_output and not fast.lm_head.by_output  # both layouts are in the model
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3) if not compile_step else (2,):  # one row: the products in n blocks (3 divides none here)
            torch.set_num_threads(n)
            one = StaticDecoder(fast, batch=1, max_len=40, compile=compile_step)
            got = [one.prefill(ids[:1, :10])] + [one.step(ids[:1, t]) for t in range(10, 23)]
            torch.testing.assert_close(torch.stack(got, 1), full[:1, 9:23], atol=2e-5, rtol=1e-4)
    finally:
        torch.set_num_threads(threads)


def test_fused_cross_entropy_equals_pytorch():
    torch.manual_seed(0)
    h = torch.randn(300, 64, requires_grad=True)
    w = torch.randn(1000, 64, requires_grad=True)
    t = torch.randint(0, 1000, (300,))
    t[::7] = -100
    loss = linear_cross_entropy(h, w, t, chunk_elements=1000 * 64)  # several chunks
    (loss * 0.5).backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.cross_entropy(h2 @ w2.T, t, ignore_index=-100, reduction="sum")
    (ref * 0.5).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_fused_losses_chunk_by_the_device(monkeypatch):
    """With no chunk size given, the fused losses hold the device's CHUNK_ELEMENTS logits at a time (2^25 on a CPU,
    2^27 on a GPU, where small chunks would spend the layer re-reading the fp32 gradient of the output matrix), and
    the planner counts a GPU's chunk; the result is the same as one chunk's."""
    from slm.model import loss as loss_mod

    assert loss_mod.default_chunk_elements(torch.device("cpu")) == 1 << 25
    assert loss_mod.default_chunk_elements(torch.device("cuda")) == 1 << 27
    rows = []
    real = loss_mod._LinearCrossEntropy.apply
    monkeypatch.setattr(loss_mod._LinearCrossEntropy, "apply", lambda *a: rows.append(a[3]) or real(*a))
    monkeypatch.setitem(loss_mod.CHUNK_ELEMENTS, "cpu", 1000 * 100)  # 100 rows of a 1,000-word vocabulary
    torch.manual_seed(0)
    h, w, t = torch.randn(300, 64), torch.randn(1000, 64), torch.randint(0, 1000, (300,))
    torch.testing.assert_close(linear_cross_entropy(h, w, t), F.cross_entropy(h @ w.T, t, reduction="sum"),
                               rtol=1e-6, atol=1e-3)
    assert rows == [100]


def test_fused_cross_entropy_under_bf16_autocast():
    """Under autocast (bf16 training on a GPU, or a CPU with bf16 units) the fused loss and its gradients follow
    F.cross_entropy of the autocast logits, across several chunks, with an fp32 gradient for the fp32 weight."""
    torch.manual_seed(0)
    h = torch.randn(300, 64, requires_grad=True)
    w = (torch.randn(1000, 64) * 0.1).requires_grad_()
    t = torch.randint(0, 1000, (300,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, chunk_elements=1000 * 64)
    loss.backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = h2 @ w2.T
    F.cross_entropy(logits.float(), t, reduction="sum").backward()
    assert loss.dtype == torch.float32 and w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), t, reduction="sum"), rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(h.grad, h2.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w.grad, w2.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("cfg", [STABLELM, LLAMA], ids=["stablelm", "llama"])
def test_training_loss_equals_transformers(cfg):
    model = random_model(cfg)
    hf = hf_twin(model, cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    s, n = model(ids[:, :-1], targets=ids[:, 1:])
    torch.testing.assert_close(s / n, hf(ids, labels=ids).loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cfg", [STABLELM, LLAMA], ids=["stablelm", "llama"])
def test_hf_mapping_round_trip(cfg):
    model = random_model(cfg)
    hf_conf = to_hf_config(cfg, 1, 2)
    back = from_hf_config(hf_conf)
    assert back == cfg
    state = from_hf_state_dict(to_hf_state_dict(model.state_dict(), cfg), cfg)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)


def test_refuses_what_it_cannot_reproduce():
    conf = to_hf_config(LLAMA, 1, 2)
    with pytest.raises(ValueError, match="mlp_bias"):
        from_hf_config({**conf, "mlp_bias": True})
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        from_hf_config({**conf, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope scaling"):
        from_hf_config({**conf, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
