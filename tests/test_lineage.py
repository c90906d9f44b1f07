"""Lineage refusals: every stage checks that its inputs belong together before it works, and says in one line
what does not (exit 1, nothing written). Each mismatch kind, as a user meets it:

    tokenizer vs model vocabulary         test_train.py::test_refusals (pretrain --set model.vocab_size=512)
    mix sources from two tokenizers       test_mix.py::test_refuses_sources_with_different_tokenizers
    a mix and another tokenizer           here (pretrain, cooldown --tokenizer)
    a checkpoint and a mix of another tokenizer   here (cooldown --from), test_train.py (pretrain --init)
    a DPO reference of another tokenizer  here (dpo --ref)
    a GGUF of another checkpoint          test_quantize.py::test_given_gguf_files_are_scored_and_their_lineage_checked
    a changed source under a planned mix  test_mix.py::test_changed_source_is_detected
    a changed window table                test_mix.py::test_min_doc_tokens_keeps_only_windows_inside_long_documents
"""

import json
import shutil

from conftest import run_cli


def _one_line_refusal(proc, *needles):
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    for n in needles:
        assert n in proc.stderr, proc.stderr


def _with_tokenizer_of(ckpt, tok_dir, dest):
    """A copy of checkpoint CKPT whose tokenizer is TOK_DIR's (as if trained on other data)."""
    shutil.copytree(ckpt, dest, symlinks=True)
    for f in ("encoding.json", "tokenizer.tiktoken"):
        (dest / f).write_bytes((tok_dir / f).read_bytes())
    return dest


def test_mix_and_checkpoint_of_another_tokenizer(tmp_path, train_data, base_ckpt, arcade_dir):
    mix = train_data / "mix"
    proc = run_cli("pretrain", "--config", train_data / "model.yaml", "--data", mix, "--tokenizer", arcade_dir,
                   "--steps", "1", "--out", tmp_path / "a")
    _one_line_refusal(proc, f"{arcade_dir}: this tokenizer (", f"is not the one {mix} was encoded with")
    proc = run_cli("cooldown", "--from", base_ckpt, "--data", mix, "--tokenizer", arcade_dir, "--steps", "1",
                   "--out", tmp_path / "b")
    _one_line_refusal(proc, "is not the one", "was encoded with")
    foreign = _with_tokenizer_of(base_ckpt, arcade_dir, tmp_path / "foreign")
    proc = run_cli("cooldown", "--from", foreign, "--data", mix, "--steps", "1", "--out", tmp_path / "c",
                   "--device", "cpu")
    _one_line_refusal(proc, f"--from {foreign}: the checkpoint's tokenizer (", f"is not the one {mix} was encoded with")
    for d in ("a", "b", "c"):
        assert not (tmp_path / d / "checkpoints").exists()


def test_dpo_reference_of_another_tokenizer(tmp_path, base_ckpt, arcade_dir):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}.",
                                         "rejected": f"{i + 2}."}) + "\n" for i in range(8)))
    ref = _with_tokenizer_of(base_ckpt, arcade_dir, tmp_path / "ref")
    proc = run_cli("dpo", "--model", base_ckpt, "--ref", ref, "--data", pairs, "--template", "chatml", "--out", tmp_path / "dpo",
                   "--device", "cpu", "--set", "dpo.batch_size=4", "--set", "dpo.micro_batch_size=4",
                   "--set", "dpo.max_length=64", "--set", "dpo.max_prompt_length=32")
    _one_line_refusal(proc, f"--ref {ref}: its tokenizer (", "the reference must score the same token ids")
    assert not (tmp_path / "dpo" / "checkpoints").exists()
