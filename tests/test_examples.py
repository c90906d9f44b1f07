"""The example scripts users copy: they parse, and the SLURM chain submits each stage after the one it needs."""

import os
import subprocess

import pytest
from conftest import ROOT

SCRIPTS = ["examples/quickstart.sh", "examples/pipeline.sh", "examples/slurm/pretrain.sbatch",
           "examples/slurm/stage.sbatch", "examples/slurm/chain.sh", "examples/recipes/cost.sh",
           "examples/recipes/stablelm-2-1_6b/run.sh", "examples/recipes/smollm2-1_7b/run.sh", "examples/released.sh",
           "benchmarks/gpu.sh", "benchmarks/gpu_wheels.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_chain_submits_dependent_jobs(tmp_path):
    """chain.sh with a stand-in sbatch on PATH: seven jobs, each after the previous one (afterok), the training
    stages through stage.sbatch with the user's sbatch options."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    (bindir / "sbatch").write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> {calls}\n'
                                   f'wc -l < {calls} | tr -d " " | sed "s/^/10/"\n')
    (bindir / "sbatch").chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(ROOT / "examples/slurm/chain.sh"), "tiny", "mix", "chat.jsonl", "pairs.jsonl",
                           "facts.yaml", "--nodes", "2"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    ids = proc.stdout.split()
    assert ids == [f"10{i}" for i in range(1, 8)]
    lines = calls.read_text().splitlines()
    assert "--dependency" not in lines[0] and "stage.sbatch pretrain --recipe tiny" in lines[0]
    for i, line in enumerate(lines[1:], 1):
        assert f"--dependency=afterok:{ids[i - 1]}" in line, line
    stages = [line.split("stage.sbatch ")[1].split(" --")[0] for line in lines if "stage.sbatch" in line]
    assert stages == ["pretrain", "cooldown", "sft", "dpo", "selfknow train"]
    assert all("--nodes 2" in line for line in lines if "stage.sbatch" in line)
    assert "selfknow generate" in lines[4] and "slm carbon" in lines[6]
    bad = subprocess.run(["bash", str(ROOT / "examples/slurm/stage.sbatch"), "tokenize"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "not a training stage" in bad.stderr


# --- every `slm ...` line a user copies names a real command and real options -------------------------------------

def _click_app():
    import typer

    from slm.cli import app

    return typer.main.get_command(app)


def slm_invocations(text: str, helpers=("run",)) -> list[tuple[list[str], list[str], str]]:
    """(command path, --options, the line) of each `slm CMD [SUB] ...` in shell TEXT (README code blocks or scripts);
    HELPERS are shell functions that pass their arguments to a training stage (`run pretrain ...`)."""
    import re

    text = re.sub(r"\\\n\s*", " ", text)  # continuation lines
    found = []
    for line in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line)  # comments
        if re.match(r"\s*(echo|printf)\b", line):
            continue
        for m in re.finditer(rf"(?:^|[\s$(;|&\"`])(?:slm|\"\$slm\"|{'|'.join(helpers)})\s+([a-z][a-z-]*)(?:\s+([a-z][a-z-]*))?(.*?)(?=[);|`]|&&|$)",
                             line):
            cmd, sub, rest = m.group(1), m.group(2), m.group(3)
            path = [cmd] + ([sub] if sub and cmd in ("tokenize", "selfknow") else [])
            if sub and len(path) == 1:
                rest = f"{sub} {rest}"
            found.append((path, re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest), line.strip()))
    return found


def check_invocations(invocations) -> list[str]:
    root = _click_app()  # typer's own click: groups are told by their commands
    problems = []
    for path, options, line in invocations:
        cmd = root
        for name in path:
            cmd = cmd.commands.get(name) if hasattr(cmd, "commands") else None
            if cmd is None:
                break
        if cmd is None:
            problems.append(f"no command slm {' '.join(path)}: {line}")
            continue
        if hasattr(cmd, "commands"):
            continue
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
        problems += [f"slm {' '.join(path)} has no option {o}: {line}" for o in options if o not in known]
    return problems


def _readme_shell_blocks(path) -> str:
    import re

    return "\n".join(re.findall(r"```(?:bash|sh|shell)\n(.*?)```", path.read_text(encoding="utf-8"), re.S))


@pytest.mark.parametrize("doc", ["README.md", "examples/recipes/README.md", "examples/recipes/stablelm-2-1_6b/run.sh",
                                 "examples/released.sh",
                                 "examples/recipes/smollm2-1_7b/run.sh", "examples/recipes/cost.sh",
                                 "examples/pipeline.sh", "examples/quickstart.sh", "examples/slurm/chain.sh",
                                 "examples/slurm/stage.sbatch", "examples/slurm/pretrain.sbatch"])
def test_documented_commands_exist(doc):
    """Each slm command line of the README and the example scripts names a command and options slm has."""
    path = ROOT / doc
    text = _readme_shell_blocks(path) if doc.endswith(".md") else path.read_text(encoding="utf-8")
    invocations = slm_invocations(text)
    if doc in ("README.md",) or doc.endswith("run.sh"):
        assert len(invocations) >= 10, invocations  # the parser sees them
    assert check_invocations(invocations) == []


def test_invocation_checker_catches_mistakes():
    bad = slm_invocations("x=$(slm mix m.yaml --outt mix)\nslm tokenise encode --out t\n"
                          "run cooldown --from a --recipe r:s --data m \\\n  --stepz 3\nslm selfknow train --model m")
    assert check_invocations(bad) == ["slm mix has no option --outt: x=$(slm mix m.yaml --outt mix)",
                                      "no command slm tokenise: slm tokenise encode --out t",
                                      "slm cooldown has no option --stepz: run cooldown --from a --recipe r:s --data m "
                                      " --stepz 3"]


def test_recipe_plans_match_the_recipes(tmp_path):
    """examples/recipes: the mixes have the recipes' phases and name a dataset for every source with data of its
    own; slm plans them (sources bound to a small tokens directory) and records the datasets."""

    import yaml

    from slm.recipes import load_recipe, load_step

    pairs = [("stablelm-2-1_6b/pretrain.yaml", load_recipe("stablelm-2-1_6b")["mix"]),
             ("smollm2-1_7b/pretrain.yaml", load_recipe("smollm2-1_7b")["mix"]),
             ("smollm2-1_7b/long-context.yaml", load_step("smollm2-1_7b:long_context", "x")["mix"])]
    for name, recipe_mix in pairs:
        mix = yaml.safe_load((ROOT / "examples/recipes" / name).read_text())
        assert mix["phases"] == recipe_mix["phases"] and mix["seq_len"] == recipe_mix["seq_len"], name
        assert set(mix["sources"]) == set(recipe_mix["sources"]), name
        for src, spec in mix["sources"].items():
            assert spec.get("dataset") or spec.get("source"), (name, src)
    cool = yaml.safe_load((ROOT / "examples/recipes/stablelm-2-1_6b/cooldown.yaml").read_text())
    assert sum(cool["phases"][0]["weights"].values()) == pytest.approx(1.0)
    assert set(cool["sources"]) <= set(load_recipe("stablelm-2-1_6b")["mix"]["sources"])


def test_recipe_costs_are_current():
    """The cost tables of examples/recipes/README.md are what cost.sh prints now (slm's own dry-runs)."""
    import sys

    readme = (ROOT / "examples/recipes/README.md").read_text(encoding="utf-8")
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    for recipe in ("stablelm-2-1_6b", "smollm2-1_7b"):
        proc = subprocess.run(["bash", str(ROOT / "examples/recipes/cost.sh"), recipe], capture_output=True,
                              text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.count("\n") >= 6 and proc.stdout in readme, proc.stdout


@pytest.mark.slow
def test_pipeline_runs_on_the_tiny_recipe(tmp_path):
    """examples/pipeline.sh as a user runs it, on the tiny recipe, with every training stage cut to a few steps (an
    `slm` earlier on PATH adds --steps, the last value winning): each stage's printed path feeds the next, and the
    closing report has every part."""
    import sys

    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "slm").write_text(
        "#!/usr/bin/env bash\n"
        'case "$1" in\n'
        '  pretrain|cooldown|sft|dpo) set -- "$@" --steps 3 ;;\n'
        '  selfknow) [ "$2" = train ] && set -- "$@" --steps 3; [ "$2" = generate ] && set -- "$@" --n 12 ;;\n'
        '  chat-data) set -- "$@" --n 200 ;;\n'
        '  quantize) set -- "$@" --type f16,q8_0,q4_k_m --eval-tokens 512 ;;\n'
        '  bench) set -- "$@" --repeat 1 --gen 8 --prompt 32 ;;\n'
        '  eval) set -- "$@" --limit 8 ;;\n'
        "esac\n"
        f'exec {sys.executable} -m slm "$@"\n')
    (bindir / "slm").chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", SLM_ENERGY="on")
    proc = subprocess.run(["bash", str(ROOT / "examples/pipeline.sh"), str(tmp_path / "out"), "tiny"], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    report = (out / "report.md").read_text()
    for part in ("## Training", "| pretrain | runs/pretrain | 3 |", "| cooldown | runs/cooldown |", "| sft |",
                 "| dpo |", "| selfknow |", "## DPO", "## Self-knowledge", "## Quantization (release)",
                 "## Speed (bench)", "## Evaluation (eval, suite slm-local)", "## Carbon (carbon)"):
        assert part in report, part
    assert "runs/selfknow" in proc.stdout  # slm info's tree of the final model


def _leaf_commands():
    root = _click_app()

    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from walk(sub, path + [name])
        else:
            yield path, cmd

    return list(walk(root, []))


def test_every_command_has_json_and_a_working_example():
    """--json on every command, and an `Example:` in every --help whose commands and options exist."""
    leaves = _leaf_commands()
    assert len(leaves) >= 21
    for path, cmd in leaves:
        name = " ".join(path)
        opts = {o for p in cmd.params for o in p.opts}
        assert "--json" in opts, f"slm {name} has no --json"
        import re

        m = re.search(r"Examples?:\s*\x08?\s*(slm.*)", cmd.help or "", re.S)
        assert m, f"slm {name} --help has no example"
        example = m.group(1)
        invocations = slm_invocations(example)
        assert invocations and invocations[0][0] == path, (name, invocations)
        assert check_invocations(invocations) == [], name


def test_messages_name_real_options():
    """Every --option that a message or a help text in slm/ names is one slm has, and every `slm ...` command they
    quote exists with its options: an error that sends the user to an option that is not there is a dead end."""
    import ast
    import re

    root = _click_app()
    known = {"--help"}

    def walk(cmd):
        for p in cmd.params:
            known.update(p.opts, getattr(p, "secondary_opts", []))
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)

    walk(root)
    problems = []
    for path in sorted((ROOT / "slm").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            problems += [f"{where}: no option {o}" for o in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", node.value)
                         if o not in known]
            for quoted in re.findall(r"`(slm [^`]+)`", node.value):
                problems += [f"{where}: {p}" for p in check_invocations(slm_invocations(quoted))]
    assert problems == []


def test_readme_quotes_the_recorded_quickstart():
    """Every quickstart figure the README gives sits between <!-- recorded --> marks and is, word for word, in
    docs/quickstart-run.md: the report of a recorded run with its date, machine and commit
    (scripts/record-quickstart.sh). A figure changed by hand, or a run re-recorded without the README, fails here."""
    import re

    def plain(text: str, quoted: bool = False) -> str:
        lines = []
        for line in text.splitlines():
            line = line.strip()
            if quoted and line.startswith(">"):
                line = line[1:].strip()  # the README quotes the report as a block quote
            line = re.sub(r"^####? ", "## ", line)
            lines.append(line)
        return " ".join(" ".join(lines).split())

    recorded = plain((ROOT / "docs" / "quickstart-run.md").read_text(encoding="utf-8"))
    quotes = re.findall(r"<!-- recorded -->(.*?)<!-- /recorded -->", (ROOT / "README.md").read_text(encoding="utf-8"),
                        re.S)
    assert len(quotes) >= 3
    for q in quotes:
        assert plain(q, quoted=True) in recorded, q
    header = (ROOT / "docs" / "quickstart-run.md").read_text(encoding="utf-8").splitlines()[2]
    assert re.search(r"finished \d{4}-\d\d-\d\d \d\d:\d\d UTC after \d+ minutes, .* at commit [0-9a-f]{7}", header)
