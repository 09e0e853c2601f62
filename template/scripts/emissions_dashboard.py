"""Training and emissions dashboard (Streamlit): training curves per run and stage, emissions
per run and stage, the energy breakdown, carbon intensity, and a table of runs.

    streamlit run scripts/emissions_dashboard.py
    streamlit run scripts/emissions_dashboard.py -- --config other.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import streamlit as st

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from trainer.config import load_config  # noqa: E402
from trainer.observe import emissions  # noqa: E402
from trainer.runs.training_run_manager import RunManager  # noqa: E402


def metrics_frame(path: Path, run_id: str) -> pd.DataFrame:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("type") != "emissions":
                rows.append({"run": run_id, **record})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    # This script's project, not the imported package's: Streamlit may have imported `trainer` for another page.
    parser.add_argument("--config", default=str(PROJECT / "config" / "fine_tuning_config.yaml"))
    args, _ = parser.parse_known_args()
    config = load_config(args.config)
    manager = RunManager(config)
    st.set_page_config(page_title=f"{config.project.name} training and emissions", layout="wide")
    st.title(f"{config.project.name}: training and emissions")
    runs = manager.list_runs()
    if not runs:
        st.info("No runs yet. Train one with `python scripts/train.py --name first-try`; this page shows it "
                "once it starts.")
        return

    summaries = {run["run_id"]: emissions.report(config, run["run_id"]) for run in runs}
    overall = emissions.aggregate(config, list(summaries.values()))  # each run's CSVs are read once
    columns = st.columns(4)
    columns[0].metric("Runs", overall["runs"])
    columns[1].metric("Total emissions (kg CO2eq)", f"{overall['total_kg']:.3g}")
    columns[2].metric("Energy (kWh)", f"{overall['energy_kwh']:.3g}")
    columns[3].metric("Offset cost (USD)", f"{overall['offset_cost_usd']:.3g}")

    table = pd.DataFrame([{
        "run": run["run_id"], "status": run["status"], "progress %": run["progress"],
        "emissions kg": summaries[run["run_id"]]["total_kg"], "energy kWh": summaries[run["run_id"]]["energy_kwh"],
        "hours": round(summaries[run["run_id"]]["duration_hours"], 4),
        "alerts": ", ".join(a["alert"] for a in summaries[run["run_id"]]["alerts"]) or "",
    } for run in runs])
    st.subheader("Runs")
    st.dataframe(table, hide_index=True, width="stretch")

    chosen = st.multiselect("Runs to plot", [r["run_id"] for r in runs], default=[r["run_id"] for r in runs][-3:])
    st.subheader("Training curves")
    frames = [metrics_frame(manager.run_dir(run) / "metrics.jsonl", run) for run in chosen]
    frame = pd.concat([f for f in frames if not f.empty], ignore_index=True) if any(
        not f.empty for f in frames) else pd.DataFrame()
    if frame.empty:
        st.info("No metrics recorded yet for the chosen runs.")
    else:
        frame["series"] = frame["run"] + " stage " + frame["stage"].astype(str)
        for metric, title in (("train_loss", "Training loss"), ("val_loss", "Validation loss"),
                              ("tokens_per_second", "Tokens per second")):
            if metric in frame:
                data = frame.dropna(subset=[metric]).pivot_table(index="iteration", columns="series",
                                                                 values=metric, aggfunc="last")
                if not data.empty:
                    st.markdown(f"**{title}**")
                    st.line_chart(data)

    stage_rows = [{"run": run, "stage": stage, "emissions kg": record.get("emissions_kg"),
                   "cpu kWh": record.get("cpu_energy_kwh"), "gpu kWh": record.get("gpu_energy_kwh"),
                   "ram kWh": record.get("ram_energy_kwh"),
                   "carbon intensity g/kWh": record.get("carbon_intensity_g_per_kwh"),
                   "status": record["status"], "reason": record.get("reason", "")}
                  for run, summary in summaries.items() for stage, record in summary["stages"].items()]
    stages = pd.DataFrame(stage_rows)
    measured = stages[stages["status"] == "measured"] if not stages.empty else stages
    st.subheader("Emissions per run and stage")
    if measured.empty:
        st.info("No emissions measured yet (carbon_tracking.enabled, and the carbon extra installed).")
    else:
        labels = measured["run"] + " " + measured["stage"]
        st.bar_chart(pd.DataFrame({"kg CO2eq": measured["emissions kg"].values}, index=labels.values))
        st.subheader("Energy breakdown (kWh)")
        st.bar_chart(pd.DataFrame(measured[["cpu kWh", "gpu kWh", "ram kWh"]].values,
                                  columns=["cpu", "gpu", "ram"], index=labels.values))
        st.subheader("Carbon intensity (g CO2eq per kWh)")
        st.bar_chart(pd.DataFrame({"g/kWh": measured["carbon intensity g/kWh"].values}, index=labels.values))
    unavailable = stages[stages["status"] != "measured"] if not stages.empty else stages
    if not unavailable.empty:
        st.warning("Stages without measured emissions:\n\n" + "\n".join(
            f"- {row.run} {row.stage}: {row.reason}" for row in unavailable.itertuples()))
    st.subheader("Recommendations")
    alerts = emissions.alerts_of(overall["total_kg"], None, config)
    for advice in emissions.recommendations(alerts, overall["duration_hours"], None):
        st.markdown(f"- {advice}")


main()
