#!/usr/bin/env python
"""Carbon emissions of one run (per stage, per hour, equivalencies, recommendations, offset
cost, alerts) or, without --run-id, of every run of the project.

    python scripts/emissions_report.py --run-id ID
    python scripts/emissions_report.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import cli  # noqa: E402
from trainer.observe.emissions import report  # noqa: E402


def main(args) -> dict:
    return report(cli.config_from(args), args.run_id)


def _kg(value) -> str:
    return "-" if value is None else f"{value:.3g} kg"


def show(result: dict) -> None:
    if "run_id" in result:
        print(f"run {result['run_id']}: {_kg(result['total_kg'])} CO2eq ({result['status']}), "
              f"{result['duration_hours']:.3g} h, {result['energy_kwh'] or 0:.3g} kWh")
        for stage, record in result["stages"].items():
            detail = _kg(record.get("emissions_kg")) if record["status"] == "measured" else record.get("reason")
            print(f"  {stage}: {detail}")
    else:
        print(f"{result['runs']} runs ({result['measured_runs']} measured): {_kg(result['total_kg'])} CO2eq, "
              f"{result['duration_hours']:.3f} h")
        for row in result["top_emitting_runs"]:
            print(f"  {row['run_id']}: {_kg(row['total_kg'])}")
    eq = result["equivalencies"]
    print(f"  = {eq['miles_driven']:.3g} miles driven, {eq['smartphones_charged']:.3g} smartphone charges, "
          f"{eq['tree_years_to_absorb']:.3g} tree-years to absorb; offset about ${result['offset_cost_usd']:.3g}")
    for alert in result.get("alerts", []):
        print(f"  ALERT {alert['alert']}: {alert['value_kg']:.4f} kg > {alert['threshold_kg']} kg")
    for advice in result.get("recommendations", []):
        print(f"  - {advice}")


if __name__ == "__main__":
    parser = cli.parser(__doc__.splitlines()[0])
    parser.add_argument("--run-id", help="one run (default: every run)")
    arguments = parser.parse_args()
    sys.exit(cli.run(main, arguments, show))
