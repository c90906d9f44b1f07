"""slm carbon: the estimate formula against hand computation (and StableLM 2's published figure), the roll-up's
arithmetic over stage and run directories, and a real stage's meter reading in its manifest."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, run_cli

pytest.importorskip("codecarbon", reason="codecarbon is in the test extra (scripts/setup.sh)")


def test_estimate_equals_hand_computation():
    """GPU-hours x board power x PUE x intensity; StableLM 2 1.6B's ~11 tCO2eq from its ~92,000 A100 GPU-hours
    follows from 0.299 kg/kWh at PUE 1.0 (or PUE 1.2 on Virginia's grid, eGRID 2023)."""
    from slm.stages.carbon import estimate, intensity_for

    r = estimate(92_000, "a100-40gb", None, 1.1, 300, None)
    assert r["power_w"] == 400 and r["energy_kwh"] == pytest.approx(92_000 * 0.4 * 1.1)
    assert r["kg_co2eq"] == pytest.approx(92_000 * 0.4 * 1.1 * 0.3)
    assert estimate(92_000, "a100-40gb", None, 1.0, 299, None)["t_co2eq"] == pytest.approx(11.0, abs=0.01)
    virginia, _ = intensity_for("USA:virginia")
    r = estimate(92_000, "a100-40gb", None, 1.2, None, "USA:virginia")
    assert r["t_co2eq"] == pytest.approx(92_000 * 0.4 * 1.2 * virginia / 1000) and 10.5 < r["t_co2eq"] < 11.2
    assert set(r["by_region"]) >= {"FRA", "USA", "world", "IND"}
    assert r["by_region"]["FRA"]["t_co2eq"] < r["t_co2eq"] < r["by_region"]["IND"]["t_co2eq"]
    assert intensity_for("world")[0] == pytest.approx(0.475)
    assert estimate(10, None, 250, 1.0, 500, None)["kg_co2eq"] == pytest.approx(10 * 0.25 * 0.5)

    cli = run_cli("carbon", "estimate", "--gpu-hours", 92000, "--gpu", "a100-40gb", "--pue", 1.0, "--intensity", 299)
    assert cli.returncode == 0 and "36,800 kWh" in cli.stdout and "11.00 tCO2eq" in cli.stdout
    as_json = json.loads(run_cli("carbon", "estimate", "--gpu-hours", 10, "--power", 300, "--region", "FRA",
                                 "--json").stdout)
    assert as_json["energy_kwh"] == pytest.approx(3.0) and as_json["intensity_source"].startswith("codecarbon")
    bad = run_cli("carbon", "estimate", "--gpu-hours", 10, "--gpu", "b200x", "--intensity", 100)
    assert bad.returncode == 2 and "--gpu 'b200x': unknown; expected one of" in bad.stderr
    region = run_cli("carbon", "estimate", "--gpu-hours", 10, "--gpu", "h100", "--region", "Atlantis")
    assert region.returncode == 1 and "ISO 3166 alpha-3" in region.stderr


def _record(stage, kwh, hours, host="n1", intensity=0.5):
    return {"stage": stage, "host": host, "energy_kwh": kwh, "duration_s": hours * 3600, "device": "gpu",
            "device_model": "A100", "devices": 4, "device_hours": 4 * hours, "intensity_kg_per_kwh": intensity,
            "kg_co2eq": kwh * intensity, "method": {"cpu": "RAPL (measured)", "gpu": "NVML (measured)"},
            "country_iso_code": "FRA", "region": None}


def test_rollup_arithmetic(tmp_path):
    """Stage directories (manifest energy) and a run directory (one record per session and node) found under the
    given roots, summed per stage and in total; --pue and --intensity applied by hand's arithmetic."""
    root = tmp_path / "pipeline"
    (root / "release").mkdir(parents=True)
    (root / "release" / "manifest.json").write_text(json.dumps(
        {"kind": "quantize", "energy_kwh": 0.5, "energy": _record("quantize", 0.5, 0.25, intensity=0.1)}))
    run = root / "runs" / "pretrain"
    (run / "energy").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    for i, (host, kwh) in enumerate([("n1", 10.0), ("n2", 12.0), ("n1", 3.0)]):  # two nodes, then a resumed session
        (run / "energy" / f"{i}-{host}.json").write_text(json.dumps(_record("pretrain", kwh, 2.0, host)))
    (root / "tokens").mkdir()
    (root / "tokens" / "manifest.json").write_text(json.dumps({"kind": "tokens", "energy_kwh": None}))

    proc = run_cli("carbon", root, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    rows = {r["stage"]: r for r in report["rows"]}
    assert rows["pretrain"]["energy_kwh"] == pytest.approx(25.0) and rows["pretrain"]["hosts"] == 2
    assert rows["pretrain"]["sessions"] == 3 and rows["pretrain"]["device_hours"] == pytest.approx(24.0)
    assert rows["pretrain"]["kg_co2eq"] == pytest.approx(25.0 * 0.5)
    assert rows["quantize"]["kg_co2eq"] == pytest.approx(0.5 * 0.1)
    assert report["total"]["energy_kwh"] == pytest.approx(25.5)
    assert report["total"]["kg_co2eq"] == pytest.approx(12.5 + 0.05)
    assert report["unmeasured"] == [str(root / "tokens")] and "tokens" in proc.stderr

    out = tmp_path / "bill"
    proc = run_cli("carbon", root, "--pue", 1.5, "--intensity", 400, "--out", out)
    assert proc.returncode == 0 and proc.stdout.strip() == str(out)
    report = json.loads((out / "carbon.json").read_text())
    assert report["total"]["kg_co2eq"] == pytest.approx(25.5 * 1.5 * 0.4)
    assert report["assumptions"]["pue"] == 1.5 and "400.0 g/kWh" in report["assumptions"]["intensity"]
    md = (out / "carbon.md").read_text()
    assert "| **total** |" in md and "15.3 kg CO2eq" in md and "PUE of 1.5" in md
    assert json.loads((out / "manifest.json").read_text())["kind"] == "carbon"

    empty = tmp_path / "empty"
    (empty / "x").mkdir(parents=True)
    none = run_cli("carbon", empty)
    assert none.returncode == 1 and "no energy readings" in none.stderr
    both = run_cli("carbon", root, "--intensity", 100, "--region", "FRA")
    assert both.returncode == 2 and "not both" in both.stderr


def test_a_stage_records_its_energy_in_its_manifest(tmp_path):
    """A one-directory stage run with the meter on: codecarbon's reading (method, duration, energy, intensity) is in
    its manifest, and `slm carbon` rolls it up with the intensity of the place it names."""
    out = tmp_path / "cd"
    proc = run_cli("chat-data", "--out", out, "--n", 40, env={"SLM_ENERGY": "on", "SLM_COUNTRY": "FRA"})
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "manifest.json").read_text())
    e = m["energy"]
    assert m["energy_kwh"] == e["energy_kwh"] > 0 and e["stage"] == "chat-data" and e["duration_s"] > 0
    assert e["country_iso_code"] == "FRA" and e["intensity_kg_per_kwh"] == pytest.approx(0.056, abs=0.001)
    assert e["method"]["cpu"] in ("RAPL (measured)", "TDP x load (estimated)", "TDP / 2 (estimated)")
    assert e["device_hours"] == pytest.approx(e["duration_s"] / 3600)
    report = json.loads(run_cli("carbon", out, "--json").stdout)
    assert report["total"]["kg_co2eq"] == pytest.approx(e["energy_kwh"] * 0.056039, rel=1e-6)
    off = run_cli("chat-data", "--out", tmp_path / "off", "--n", 40, env={"SLM_ENERGY": "off"})
    assert off.returncode == 0 and "energy" not in json.loads((tmp_path / "off" / "manifest.json").read_text())


def test_the_meter_measures_under_slurm_without_scontrol(tmp_path):
    """SLURM_JOB_ID set and no `scontrol` on PATH (srun's environment copied to a machine without SLURM's tools):
    codecarbon's tracker alone fails to start and measures nothing; slm's meter counts the machine's CPUs instead
    and says so. With a tracker that measured nothing, the meter says that too instead of writing no record."""
    bin_dir = tmp_path / "bin"  # a PATH with this Python and nothing else: no scontrol, whatever is installed
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {"PATH": str(bin_dir), "SLURM_JOB_ID": "4242", "SLM_ENERGY": "on", "SLM_COUNTRY": "FRA",
           "PYTHONPATH": str(ROOT)}
    proc = run_cli("chat-data", "--out", tmp_path / "cd", "--n", 40, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "SLURM_JOB_ID is set but scontrol is not on PATH" in proc.stderr
    assert json.loads((tmp_path / "cd" / "manifest.json").read_text())["energy"]["energy_kwh"] > 0

    script = ("import codecarbon, slm.energy as e\n"  # codecarbon imported first: the tracker fails as it would
              "with e.Meter('bench') as m:\n    r = e.take()\nprint(r)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, **env), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "None", proc.stderr
    assert "energy: codecarbon measured nothing for `slm bench`" in proc.stderr
