#!/usr/bin/env python
"""Serve the monitoring API (run status, metrics, emissions) with uvicorn on 127.0.0.1.

    python scripts/monitor_training.py                 # http://127.0.0.1:8765/docs
    python scripts/monitor_training.py --port 9000 --host 0.0.0.0   # reachable from other machines
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import DEFAULT_CONFIG, load_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    try:
        import uvicorn

        from trainer.observe.monitor_api import create_app
    except ImportError as error:
        sys.exit(f"the monitor needs fastapi and uvicorn ({error.name} is missing): pip install -e '.[dashboard]'")
    uvicorn.run(create_app(load_config(args.config)), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
