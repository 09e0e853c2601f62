"""Carbon accounting with CodeCarbon: one tracker per training stage, and summaries.

The tracker measures only this process by default (`tracking_mode: process`), so two runs
sharing a machine do not count each other's work. It never prompts (CodeCarbon's
powermetrics probe is non-interactive and bounded), its start is bounded here too, and no
tracker failure fails training: the stage then records emissions as unavailable, with the
reason. Each stage writes emissions/<run_id>_stage<N>_emissions.csv.
"""

from __future__ import annotations

import csv
import logging
import threading
from pathlib import Path
from typing import Any, Callable, Optional

from trainer.config import FineTuningConfig
from trainer.runs.training_run_manager import RunManager, lock_held

log = logging.getLogger("trainer")
START_TIMEOUT = 60.0  # seconds; a tracker that cannot start by then is given up

# Equivalencies, with their sources (kg CO2eq per unit):
KG_PER_MILE_DRIVEN = 0.400  # US EPA, "Greenhouse Gas Emissions from a Typical Passenger Vehicle" (about 400 g/mile)
KG_PER_TREE_YEAR = 21.77  # Arbor Day Foundation / EEA: a mature tree absorbs about 48 lb (21.77 kg) CO2 a year
KG_PER_SMARTPHONE_CHARGE = 0.00822  # US EPA Greenhouse Gas Equivalencies Calculator (8.22e-6 t per charge)
KG_PER_KM_FLOWN = 0.15  # UK DESNZ 2023 conversion factors, short-haul economy, per passenger-km incl. RF (~0.15)


def csv_path(config: FineTuningConfig, run_id: str, stage: int) -> Path:
    return config.resolve(config.carbon_tracking.output_dir) / f"{run_id}_stage{stage}_emissions.csv"


def tracking_mode(config: FineTuningConfig, run_id: str) -> tuple[str, Optional[str]]:
    """The mode to measure in, and why it differs from the config's: 'machine' counts every
    process, so while another run of this project trains it would count that run's work too."""
    if config.carbon_tracking.tracking_mode != "machine":
        return config.carbon_tracking.tracking_mode, None
    manager = RunManager(config)
    others = [r["run_id"] for r in manager.list_runs()
              if r["run_id"] != run_id and lock_held(manager.runs_dir / r["run_id"] / ".lock")]
    if others:
        return "process", f"tracking_mode machine would also count the running run(s) {', '.join(others)}"
    return "machine", None


def make_tracker(config: FineTuningConfig, run_id: str, stage: int):
    """A CodeCarbon tracker for one stage: offline with the configured country unless online mode is asked."""
    carbon = config.carbon_tracking
    mode, why = tracking_mode(config, run_id)
    if why:
        log.warning("stage %s: measuring this process only: %s", stage, why)
    output = csv_path(config, run_id, stage)
    output.parent.mkdir(parents=True, exist_ok=True)
    common = dict(project_name=f"{carbon.project_name}-stage{stage}", output_dir=str(output.parent),
                  output_file=output.name, tracking_mode=mode, log_level=carbon.log_level,
                  measure_power_secs=carbon.measure_power_secs, save_to_file=True, save_to_api=False,
                  allow_multiple_runs=True, experiment_name=run_id)
    if carbon.offline_mode:
        from codecarbon import OfflineEmissionsTracker

        return OfflineEmissionsTracker(country_iso_code=carbon.country_iso_code, **common)
    from codecarbon import EmissionsTracker

    endpoint = {"emissions_endpoint": carbon.emissions_endpoint} if carbon.emissions_endpoint else {}
    return EmissionsTracker(**common, **endpoint)


class StageEmissions:
    """Measures one stage. `start()` and `stop()` never raise; `stop()` returns the record
    for the stage result and manifest. `factory` replaces make_tracker (tests)."""

    def __init__(self, config: FineTuningConfig, run_id: str, stage: int,
                 factory: Optional[Callable[[], Any]] = None):
        self.config, self.run_id, self.stage = config, run_id, stage
        self.factory = factory or self._configured_factory()
        self.tracker = None
        self.reason: Optional[str] = None

    def _configured_factory(self) -> Callable[[], Any]:
        name = self.config.carbon_tracking.tracker_factory
        if not name:
            return lambda: make_tracker(self.config, self.run_id, self.stage)

        def custom():
            import importlib

            module, _, function = name.partition(":")
            return getattr(importlib.import_module(module), function)(self.config, self.run_id, self.stage)

        return custom

    def start(self) -> None:
        if not self.config.carbon_tracking.enabled:
            self.reason = "carbon_tracking.enabled is false"
            return
        outcome: dict[str, Any] = {}

        def begin() -> None:
            try:
                tracker = self.factory()
                tracker.start()
                outcome["tracker"] = tracker
            except ImportError:
                outcome["error"] = "codecarbon is not installed (pip install -e '.[carbon]')"
            except Exception as error:  # CodeCarbon's failures vary by platform
                outcome["error"] = f"{type(error).__name__}: {error}"

        thread = threading.Thread(target=begin, daemon=True, name="codecarbon-start")
        thread.start()
        thread.join(START_TIMEOUT)
        if thread.is_alive():
            self.reason = f"the tracker did not start within {START_TIMEOUT:.0f} s"
        elif "error" in outcome:
            self.reason = f"the tracker failed to start: {outcome['error']}"
        else:
            self.tracker = outcome["tracker"]
        if self.reason:
            log.warning("stage %s: emissions are not measured: %s", self.stage, self.reason)

    def flush(self) -> Optional[float]:
        """Emissions so far (kg), also appended to the stage's CSV; None when unavailable."""
        if self.tracker is None:
            return None
        try:
            value = self.tracker.flush()
            return float(value) if value is not None else None
        except Exception as error:
            log.warning("stage %s: emissions flush failed: %s", self.stage, error)
            return None

    def stop(self) -> dict[str, Any]:
        if self.tracker is None:
            return {"status": "unavailable", "reason": self.reason or "not started"}
        try:
            self.tracker.stop()
            data = self.tracker.final_emissions_data
        except Exception as error:
            reason = f"the tracker failed to stop: {type(error).__name__}: {error}"
            log.warning("stage %s: emissions are not measured: %s", self.stage, reason)
            return {"status": "unavailable", "reason": reason}
        finally:
            tracker, self.tracker = self.tracker, None
        record = record_of(data, csv_path(self.config, self.run_id, self.stage))
        record["measurement"] = measurement(tracker)
        return record


def measurement(tracker: Any) -> dict[str, str]:
    """How each device's power was obtained (CodeCarbon's mode: a power counter such as
    intel_rapl, or an estimate such as cpu_load/constant when counters are missing or
    unreadable). Read from CodeCarbon's internals, so best effort."""
    found = {}
    for device in getattr(tracker, "_hardware", []) or []:
        kind = type(device).__name__.lower()
        found[kind] = str(getattr(device, "_mode", None) or getattr(device, "_tracking_method", None) or "unknown")
    return found


def intensity(kg: float, kwh: float) -> Optional[float]:
    """Carbon intensity in g CO2eq per kWh."""
    return 1000 * kg / kwh if kwh > 0 else None


def per_hour(kg: float, seconds: float) -> Optional[float]:
    return kg / (seconds / 3600) if seconds > 0 else None


def record_of(data: Any, path: Path) -> dict[str, Any]:
    """The stage record from CodeCarbon's EmissionsData (or a CSV row as a dict)."""
    get = (lambda k: data.get(k)) if isinstance(data, dict) else (lambda k: getattr(data, k, None))

    def number(key: str) -> float:
        value = get(key)
        try:
            return float(value) if value not in (None, "") else 0.0
        except (TypeError, ValueError):
            raise ValueError(f"{path.name}: column {key} is not a number ({value!r})") from None

    emissions, energy, duration = number("emissions"), number("energy_consumed"), number("duration")
    return {
        "status": "measured", "emissions_kg": emissions, "energy_kwh": energy,
        "cpu_energy_kwh": number("cpu_energy"), "gpu_energy_kwh": number("gpu_energy"),
        "ram_energy_kwh": number("ram_energy"), "duration_seconds": duration,
        "cpu_power_w": number("cpu_power"), "gpu_power_w": number("gpu_power"), "ram_power_w": number("ram_power"),
        "carbon_intensity_g_per_kwh": intensity(emissions, energy),
        "emissions_per_hour_kg": per_hour(emissions, duration),
        "country": get("country_name"), "region": get("region") or None, "tracking_mode": get("tracking_mode"),
        "csv": str(path),
    }


def read_csv(path: Path) -> dict[str, Any]:
    """A stage's CSV summed over its tracker sessions (a resumed stage adds one); each
    session's last row is cumulative. A missing, empty or corrupt file is 'unavailable'."""
    if not path.is_file():
        return {"status": "unavailable", "reason": f"{path.name} does not exist", "csv": str(path)}
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        if not rows:
            return {"status": "unavailable", "reason": f"{path.name} is empty", "csv": str(path)}
        sessions: dict[str, dict[str, Any]] = {}
        for row in rows:
            if "emissions" not in row or None in row:
                raise ValueError(f"{path.name}: malformed row {len(sessions) + 1}")
            sessions[row.get("run_id") or str(len(sessions))] = row
        records = [record_of(row, path) for row in sessions.values()]
    except (ValueError, csv.Error, UnicodeDecodeError) as error:
        return {"status": "unavailable", "reason": f"{path.name} is unreadable: {error}", "csv": str(path)}
    total = records[-1]
    for key in ("emissions_kg", "energy_kwh", "cpu_energy_kwh", "gpu_energy_kwh", "ram_energy_kwh",
                "duration_seconds"):
        total[key] = sum(r[key] for r in records)
    total["carbon_intensity_g_per_kwh"] = intensity(total["emissions_kg"], total["energy_kwh"])
    total["emissions_per_hour_kg"] = per_hour(total["emissions_kg"], total["duration_seconds"])
    total["sessions"] = len(records)
    return total


def equivalencies(kg: float) -> dict[str, Any]:
    return {
        "miles_driven": kg / KG_PER_MILE_DRIVEN,
        "km_flown": kg / KG_PER_KM_FLOWN,
        "tree_years_to_absorb": kg / KG_PER_TREE_YEAR,
        "smartphones_charged": kg / KG_PER_SMARTPHONE_CHARGE,
        "sources": {
            "miles_driven": f"{KG_PER_MILE_DRIVEN} kg/mile: US EPA, Greenhouse Gas Emissions from a Typical "
                            "Passenger Vehicle",
            "km_flown": f"{KG_PER_KM_FLOWN} kg/passenger-km: UK DESNZ 2023 GHG conversion factors (short-haul)",
            "tree_years_to_absorb": f"{KG_PER_TREE_YEAR} kg/tree/year: Arbor Day Foundation (48 lb CO2 a year)",
            "smartphones_charged": f"{KG_PER_SMARTPHONE_CHARGE} kg/charge: US EPA Greenhouse Gas Equivalencies "
                                   "Calculator",
        },
    }


def recommendations(alerts: list[dict[str, Any]], hours: float, grid_intensity: Optional[float]) -> list[str]:
    """Advice for the alerts raised (alerts_of), the grid and the duration."""
    advice = []
    for alert in alerts:
        if alert["alert"] == "high_emissions":
            advice.append(f"Emissions exceed the alert threshold of {alert['threshold_kg']} kg: train in a region "
                          "with a cleaner grid (hydro or nuclear, e.g. Quebec, Norway, France) or at cleaner hours.")
        else:
            advice.append(f"Emissions per hour ({alert['value_kg']:.3f} kg) exceed {alert['threshold_kg']} kg: "
                          "a smaller model, a quantized base (q4 with mlx) or fewer LoRA layers cut power draw.")
    if grid_intensity is not None and grid_intensity > 300:
        advice.append(f"The grid's carbon intensity is {grid_intensity:.0f} g/kWh; below 100 g/kWh is achievable "
                      "in low-carbon regions.")
    if hours > 12:
        advice.append("Long runs: evaluate early and stop when validation loss stops improving.")
    advice.append("Compare runs in the emissions report to see which settings cost the most.")
    return advice


def alerts_of(total_kg: float, per_hour_kg: Optional[float], config: FineTuningConfig) -> list[dict[str, Any]]:
    alerts = config.carbon_tracking.alerts
    found = []
    if total_kg > alerts.high_emissions_kg:
        found.append({"alert": "high_emissions", "value_kg": total_kg, "threshold_kg": alerts.high_emissions_kg})
    if per_hour_kg is not None and per_hour_kg > alerts.high_emissions_per_hour_kg:
        found.append({"alert": "high_emissions_per_hour", "value_kg": per_hour_kg,
                      "threshold_kg": alerts.high_emissions_per_hour_kg})
    return found


def totals(stages: dict[str, dict[str, Any]], config: FineTuningConfig) -> dict[str, Any]:
    """The manifest's `emissions` entry from the stages' records."""
    measured = {k: v for k, v in stages.items() if v.get("status") == "measured"}
    total = sum(v["emissions_kg"] for v in measured.values())
    energy = sum(v["energy_kwh"] for v in measured.values())
    seconds = sum(v["duration_seconds"] for v in measured.values())
    hourly = per_hour(total, seconds)
    return {
        "status": "measured" if len(measured) == len(stages) and stages else (
            "partial" if measured else "unavailable"),
        "total_kg": total if measured else None, "energy_kwh": energy if measured else None,
        "duration_seconds": seconds, "emissions_per_hour_kg": hourly,
        "cpu_energy_kwh": sum(v["cpu_energy_kwh"] for v in measured.values()),
        "gpu_energy_kwh": sum(v["gpu_energy_kwh"] for v in measured.values()),
        "ram_energy_kwh": sum(v["ram_energy_kwh"] for v in measured.values()),
        "stages": stages, "alerts": alerts_of(total, hourly, config),
    }


def run_summary(config: FineTuningConfig, run_id: str, stages: list[int]) -> dict[str, Any]:
    """The run's emissions read back from its CSVs: per stage, total, per hour, equivalencies,
    recommendations, offset cost, alerts."""
    records = {f"stage{n}": read_csv(csv_path(config, run_id, n)) for n in stages}
    summary = totals(records, config)
    kg = summary["total_kg"] or 0.0
    hours = summary["duration_seconds"] / 3600
    intensities = [r["carbon_intensity_g_per_kwh"] for r in records.values()
                   if r.get("carbon_intensity_g_per_kwh") is not None]
    price = config.carbon_tracking.offset_price_usd_per_tonne
    return {
        "run_id": run_id, **summary, "duration_hours": hours,
        "carbon_intensity_g_per_kwh": sum(intensities) / len(intensities) if intensities else None,
        "equivalencies": equivalencies(kg),
        "offset_cost_usd": kg / 1000 * price,
        "offset_price_usd_per_tonne": price,
        "recommendations": recommendations(summary["alerts"], hours, intensities[-1] if intensities else None),
    }


def aggregate(config: FineTuningConfig, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs' summaries (run_summary) together: totals, the top emitters, and each run's figures."""
    measured = [s for s in summaries if s["total_kg"] is not None]
    total = sum(s["total_kg"] for s in measured)
    hours = sum(s["duration_hours"] for s in measured)
    price = config.carbon_tracking.offset_price_usd_per_tonne
    rows = [{"run_id": s["run_id"], "status": s["status"], "total_kg": s["total_kg"], "energy_kwh": s["energy_kwh"],
             "duration_hours": s["duration_hours"], "alerts": s["alerts"]} for s in summaries]
    return {
        "runs": len(summaries), "measured_runs": len(measured), "total_kg": total,
        "energy_kwh": sum(s["energy_kwh"] for s in measured), "duration_hours": hours,
        "average_per_run_kg": total / len(measured) if measured else None,
        "equivalencies": equivalencies(total), "offset_cost_usd": total / 1000 * price,
        "top_emitting_runs": sorted((r for r in rows if r["total_kg"] is not None),
                                    key=lambda r: -r["total_kg"])[:10],
        "by_run": rows,
    }


def report(config: FineTuningConfig, run_id: Optional[str] = None) -> dict[str, Any]:
    """One run's summary, or the aggregate of every run of the project."""
    manager = RunManager(config)

    def stages_of(run: str) -> list[int]:
        return sorted(int(key.removeprefix("stage")) for key in manager.manifest(run)["stages"])

    if run_id is not None:
        return run_summary(config, run_id, stages_of(run_id))
    runs = [entry["run_id"] for entry in manager.list_runs()]
    return aggregate(config, [run_summary(config, run, stages_of(run)) for run in runs])
