"""`slm carbon`: the energy and carbon bill of a pipeline, from what its stages measured, and the published estimate.

Roll-up (`slm carbon DIR...`): every stage directory's manifest carries the energy its node meter measured
(slm.energy), and a training run directory holds one record per session and node in RUN/energy/. Directories
that hold stage directories (a quickstart's output, runs/) are searched. Per stage and in total: energy (kWh),
duration, device-hours, and kg CO2eq = energy x PUE x grid intensity, with the intensity of the place each record
names (codecarbon's bundled data) unless --intensity or --region replaces it.

Estimate (`slm carbon estimate`): the method papers use when nothing was metered, GPU-hours x average power per GPU
x PUE x grid intensity. StableLM 2 1.6B: about 92,000 A100 GPU-hours and about 11 tCO2eq (../shared/RECIPES.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from slm import devices, energy
from slm.console import err, warn
from slm.errors import AT_LEAST_0, AT_LEAST_1, POSITIVE, SlmError, UsageError, check_ranges
from slm.formats.manifest import atomic_dir, manifest_of, new_manifest, read_json, write_json

# Places whose intensity the estimate also shows, to give the range (codecarbon's bundled data).
RANGE = ["SWE", "FRA", "USA:oregon", "GBR", "USA:virginia", "USA", "DEU", "world", "CHN", "IND"]


def intensity_for(place: str) -> tuple[float, str]:
    """(kg CO2eq per kWh, where it comes from) for a place: an ISO 3166 alpha-3 country (USA), a country and region
    (USA:oregon, CAN:quebec, SWE:SE3), a GCP region (gcp:us-central1), or 'world'."""
    try:
        from codecarbon.input import DataSource
    except ImportError:
        raise SlmError("--region needs codecarbon (pip install 'slm[eval]'); or give --intensity") from None
    ds = DataSource()
    spec = place.strip()
    if spec.lower() == "world":
        per = ds.get_carbon_intensity_per_source_data()
        return per["world_average"] / 1000, "codecarbon: world average"
    if spec.lower().startswith("gcp:"):
        df = ds.get_cloud_emissions_data()
        row = df[(df["provider"] == "gcp") & (df["region"] == spec[4:])]
        if row.empty:
            known = ", ".join(sorted(df[df["provider"] == "gcp"]["region"]))
            raise SlmError(f"--region {place}: not a GCP region codecarbon knows ({known})")
        return float(row["impact"].iloc[0]) / 1000, f"codecarbon: GCP {spec[4:]}"
    country, _, region = spec.partition(":")
    country = country.upper()
    mix = ds.get_global_energy_mix_data()
    if country not in mix:
        raise SlmError(f"--region {place}: expected an ISO 3166 alpha-3 country code (USA, FRA, DEU, ...), "
                       "COUNTRY:REGION (USA:oregon, CAN:quebec, SWE:SE3), gcp:REGION or world")
    if not region:
        c = mix[country]
        return float(c["carbon_intensity"]) / 1000, f"codecarbon: {c.get('country_name', country)} " \
                                                     f"{c.get('year', '')}".strip()
    key = region.lower()
    if country == "USA":
        data = ds.get_country_emissions_data("usa")
        if key not in data:
            raise SlmError(f"--region {place}: not a US state codecarbon knows (e.g. USA:oregon, USA:texas)")
        return float(data[key]["emissions"]) * 0.45359237 / 1000, f"codecarbon: EPA eGRID, {region}"
    if country in ("SWE", "NOR", "FIN", "DNK"):
        data = ds.get_nordic_country_energy_mix_data()
        zones = data.get("data", data)
        if region.upper() not in zones:
            raise SlmError(f"--region {place}: not a Nordic zone codecarbon knows ({', '.join(zones)})")
        return float(zones[region.upper()]["emission_factor"]) / 1000, f"codecarbon: Nordic zone {region.upper()}"
    raise SlmError(f"--region {place}: regions are known for USA (states) and the Nordic countries (zones); give the country, or --intensity")


# --- roll-up -------------------------------------------------------------------------------------------------------
def _records_of(d: Path) -> list[dict] | None:
    """The energy records of one stage directory, or None when it is not one."""
    if (d / "energy").is_dir():
        return [read_json(p, "energy record") for p in sorted((d / "energy").glob("*.json"))]
    manifest = manifest_of(d)
    if manifest is None or manifest["kind"] in ("carbon", "checkpoint"):
        return None  # not a stage, or an earlier bill
    return [manifest["energy"]] if isinstance(manifest.get("energy"), dict) else []  # [] : the meter was off


def find_stage_dirs(roots: list[Path]) -> tuple[list[tuple[Path, list[dict]]], list[Path]]:
    """(directory, records) for every stage directory under ROOTS, and the stage directories without a reading."""
    found, unmeasured = [], []

    def walk(d: Path, depth: int) -> None:
        recs = _records_of(d)
        if recs is not None:
            (found.append((d, recs)) if recs else unmeasured.append(d))
            return
        if depth == 0:
            return
        for sub in sorted(p for p in d.iterdir() if p.is_dir() and p.name not in ("checkpoints", "energy")
                          and ".tmp-" not in p.name):
            walk(sub, depth - 1)

    for r in roots:
        r = Path(r)
        if not r.is_dir():
            raise SlmError(f"{r}: no such directory")
        walk(r, 3)
    return found, unmeasured


@dataclass
class CarbonConfig:
    dirs: list[Path]
    pue: float = 1.0
    intensity: float | None = None
    """g CO2eq per kWh for every record (default: each record's place)."""
    region: str | None = None
    out: Path | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        check_ranges(self, pue=AT_LEAST_1, intensity=AT_LEAST_0)


def rollup(cfg: CarbonConfig) -> dict:
    if cfg.intensity is not None and cfg.region:
        raise UsageError("give --intensity or --region, not both")
    found, unmeasured = find_stage_dirs(cfg.dirs)
    if not found:
        raise SlmError(f"{', '.join(map(str, cfg.dirs))}: no energy readings in any stage directory (were the "
                       "stages run with SLM_ENERGY=off, or without codecarbon installed?)")
    fixed = None
    if cfg.intensity is not None:
        fixed = (cfg.intensity / 1000, "given (--intensity)")
    elif cfg.region:
        fixed = intensity_for(cfg.region)
    rows = []
    for d, recs in found:
        energy = sum(r["energy_kwh"] for r in recs)
        if fixed is not None:
            kg_raw = energy * fixed[0]
            source = fixed[1]
        else:
            kg_raw = sum(r["energy_kwh"] * (r.get("intensity_kg_per_kwh") or 0) for r in recs)
            places = sorted({"/".join(x for x in (r.get("country_iso_code"), r.get("region")) if x) or "world"
                             for r in recs})
            source = "codecarbon: " + ", ".join(places)
        methods = sorted({v for r in recs for v in (r.get("method") or {}).values() if v})
        rows.append({
            "stage": recs[0].get("stage", d.name), "dir": str(d), "sessions": len(recs),
            "hosts": len({r.get("host") for r in recs}), "energy_kwh": energy,
            "duration_s": sum(r.get("duration_s", 0) for r in recs),
            "device_hours": sum(r.get("device_hours", 0) for r in recs),
            "devices": sorted({f"{r.get('devices', 1)} x {r.get('device_model') or r.get('device')}" for r in recs}),
            "kg_co2eq": kg_raw * cfg.pue, "intensity_kg_per_kwh": kg_raw / energy if energy else None,
            "intensity_source": source, "methods": methods,
            "started_utc": min((r.get("started_utc") or "" for r in recs), default="")})
    rows.sort(key=lambda r: r["started_utc"])  # pipeline order (records without a start time first)
    total = {k: sum(r[k] for r in rows) for k in ("energy_kwh", "duration_s", "device_hours", "kg_co2eq")}
    return {"rows": rows, "total": total, "unmeasured": [str(d) for d in unmeasured],
            "assumptions": {"pue": cfg.pue, "intensity": "per record (codecarbon's data for its place)"
                            if fixed is None else f"{fixed[0] * 1000:.1f} g/kWh, {fixed[1]}",
                            "scope": "whole machine per node (codecarbon machine mode, local rank 0)"}}


def render(report: dict) -> str:
    lines = ["| stage | directory | energy kWh | time | device-hours | kg CO2eq | g/kWh | measured by |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        g = f"{r['intensity_kg_per_kwh'] * 1000:.0f}" if r["intensity_kg_per_kwh"] is not None else "-"
        lines.append(f"| {r['stage']} | {Path(r['dir']).name} | {r['energy_kwh']:.6f} | {_dur(r['duration_s'])} | "
                     f"{r['device_hours']:.4f} | {r['kg_co2eq']:.6f} | {g} | {'; '.join(r['methods'])} |")
    t = report["total"]
    lines.append(f"| **total** | | **{t['energy_kwh']:.6f}** | {_dur(t['duration_s'])} | {t['device_hours']:.4f} | "
                 f"**{t['kg_co2eq']:.6f}** | | |")
    return "\n".join(lines)


def _dur(s: float) -> str:
    return f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def model_card(report: dict) -> str:
    t, a = report["total"], report["assumptions"]
    devices = sorted({d for r in report["rows"] for d in r["devices"]})
    methods = sorted({m for r in report["rows"] for m in r["methods"]})
    kg = t["kg_co2eq"]
    amount = f"{kg / 1000:.3g} tCO2eq" if kg >= 1000 else f"{kg:.3g} kg CO2eq" if kg >= 0.1 else f"{kg * 1000:.3g} g CO2eq"
    return (f"Training and evaluating this model ({len(report['rows'])} stages: "
            f"{', '.join(r['stage'] for r in report['rows'])}) used {t['energy_kwh']:.4g} kWh over "
            f"{t['device_hours']:.3g} device-hours on {', '.join(devices)}, measured with codecarbon on each node "
            f"({'; '.join(methods)}). With a PUE of {a['pue']:g} and the grid intensity {a['intensity']}, this is "
            f"about {amount}.")


def report(cfg: CarbonConfig) -> dict:
    """The roll-up with its model-card paragraph; a warning on stderr for each stage directory with no reading."""
    r = rollup(cfg)
    r["model_card"] = model_card(r)
    for d in r["unmeasured"]:
        warn(f"{d}: no energy reading (made with SLM_ENERGY=off or without codecarbon)")
    return r


def text(cfg: CarbonConfig) -> str:
    """Without --out: the table and the model-card paragraph, for stdout."""
    r = report(cfg)
    return render(r) + "\n\n" + r["model_card"]


def run(cfg: CarbonConfig) -> Path:
    """OUT/carbon.json, carbon.md and the manifest; the table on stderr."""
    if cfg.out is None:
        raise UsageError("--out: missing (the directory to write)")
    started = time.time()
    r = report(cfg)
    r["out"] = str(cfg.out)
    err.print(render(r) + "\n\n" + r["model_card"], soft_wrap=True, markup=False, highlight=False)
    with atomic_dir(cfg.out) as tmp:
        write_json(tmp / "carbon.json", r)
        (tmp / "carbon.md").write_text(render(r) + "\n\n" + r["model_card"] + "\n")
        write_json(tmp / "manifest.json", new_manifest(
            "carbon", {"pue": cfg.pue, "intensity": cfg.intensity, "region": cfg.region},
            inputs=[{"path": row["dir"], "role": "measured"} for row in r["rows"]], counts={"stages": len(r["rows"])},
            started=started, energy=energy.take()))
    return Path(cfg.out)


# --- estimate ------------------------------------------------------------------------------------------------------
def estimate(gpu_hours: float, gpu: str | None, power_w: float | None, pue: float, intensity: float | None,
             region: str | None) -> dict:
    """GPU-hours x power x PUE x intensity, and the same at the places of RANGE."""
    check_ranges({"gpu_hours": gpu_hours, "power": power_w, "pue": pue, "intensity": intensity}, gpu_hours=POSITIVE,
                 power=POSITIVE, pue=AT_LEAST_1, intensity=AT_LEAST_0)
    if power_w is None:
        if gpu is None:
            raise UsageError("give --gpu NAME or --power WATTS")
        g = devices.gpu(gpu)
        power_w, gpu = g.power_w, g.name
    if (intensity is None) == (region is None):
        raise UsageError("give --intensity G_PER_KWH or --region PLACE")
    kg_per_kwh, source = (intensity / 1000, "given (--intensity)") if intensity is not None else intensity_for(region)
    kwh = gpu_hours * power_w / 1000 * pue
    by_region = {}
    for place in RANGE:
        try:
            k, _ = intensity_for(place)
        except SlmError:
            continue
        by_region[place] = {"kg_per_kwh": k, "t_co2eq": kwh * k / 1000}
    return {"gpu_hours": gpu_hours, "gpu": gpu, "power_w": power_w, "pue": pue, "energy_kwh": kwh,
            "intensity_kg_per_kwh": kg_per_kwh, "intensity_source": source, "kg_co2eq": kwh * kg_per_kwh,
            "t_co2eq": kwh * kg_per_kwh / 1000, "by_region": by_region,
            "formula": "gpu_hours x power_w / 1000 x pue x intensity_kg_per_kwh"}


def estimate_text(gpu_hours: float, gpu: str | None, power_w: float | None, pue: float, intensity: float | None,
                  region: str | None) -> str:
    """The estimate as one line for stdout (the same energy at other places on stderr)."""
    r = estimate(gpu_hours, gpu, power_w, pue, intensity, region)
    err.print("the same energy elsewhere: " + ", ".join(f"{k} {v['t_co2eq']:.1f} t" for k, v in r["by_region"].items()),
              soft_wrap=True, highlight=False)
    return (f"{r['gpu_hours']:,.0f} GPU-hours x {r['power_w']:g} W x PUE {r['pue']:g} = {r['energy_kwh']:,.0f} kWh; "
            f"x {r['intensity_kg_per_kwh'] * 1000:.0f} g/kWh ({r['intensity_source']}) = {r['t_co2eq']:,.2f} tCO2eq")
