"""slm stages as Unix tools: `-` reads standard input, stdout carries only paths or JSON, so shell pipelines and
$(...) chain them."""

import gzip
import json
import os
import subprocess
import sys

from conftest import VARIED_TEXT, write_jsonl


def _shell(script: str, cwd) -> subprocess.CompletedProcess:
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    return subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_a_shell_pipeline_of_stages(tmp_path, small_tok, base_ckpt):
    """zcat | slm tokenize encode - | xargs slm info --json | python: the shards equal encoding the file by name,
    the manifest names standard input; `slm generate CKPT -` answers one JSON line per prompt line."""
    docs = write_jsonl(tmp_path / "docs.jsonl", VARIED_TEXT * 3)
    with gzip.open(tmp_path / "docs.jsonl.gz", "wt") as f:
        f.write(docs.read_text())
    proc = _shell(f"zcat docs.jsonl.gz | slm tokenize encode --tokenizer {small_tok} - --out piped "
                  "| xargs -I{} slm info {} --json "
                  "| python3 -c 'import json, sys; d = json.load(sys.stdin); print(d[\"kind\"], *[c[\"path\"] for c in d[\"from\"] if c[\"relation\"] != \"tokenizer\"])'",
                  tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["tokens", "-"]
    named = _shell(f"slm tokenize encode --tokenizer {small_tok} docs.jsonl --out named", tmp_path)
    assert named.returncode == 0, named.stderr[-2000:]
    m = json.loads((tmp_path / "piped" / "manifest.json").read_text())
    assert m["inputs"][0]["path"] == "-" and m["counts"]["documents"] == len(VARIED_TEXT) * 3
    (a,) = (tmp_path / "piped").rglob("*.bin")
    (b,) = (tmp_path / "named").rglob("*.bin")
    assert a.read_bytes() == b.read_bytes()
    assert not list(tmp_path.glob(".piped.stdin*"))  # the spooled copy is gone

    gen = _shell(f"printf 'def f():\\n\\nclass A:\\n' | slm generate {base_ckpt} - --max-new-tokens 4 "
                 "--temperature 0", tmp_path)
    assert gen.returncode == 0, gen.stderr[-2000:]
    lines = [json.loads(x) for x in gen.stdout.splitlines()]
    assert [x["prompt"] for x in lines] == ["def f():", "class A:"] and all("completion" in x for x in lines)
