"""What every script shares: the --config/--json flags and the output contract.

With --json a script prints exactly one JSON object as its last stdout line (its
result, or {"error": {...}}) and exits 0 only on success. Without it, it prints a
readable summary and errors go to stderr. The MCP server relies on this contract.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import yaml

from trainer import guard
from trainer.config import DEFAULT_CONFIG, ConfigError, FineTuningConfig, load_config
from trainer.errors import ProjectError


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="config file (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    return p


def config_from(args: argparse.Namespace) -> FineTuningConfig:
    config = load_config(args.config)
    guard.check_config(config)  # a request through the MCP server: every folder inside its roots
    return config


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """--set key.path=value pairs; values are read as YAML (numbers, booleans, lists)."""
    overrides: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ProjectError(f"--set {item!r}: expected key.path=value, e.g. training.stage1.iterations=50")
        try:
            overrides[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            overrides[key.strip()] = raw
    return overrides


def run(main: Callable[[argparse.Namespace], dict[str, Any]], args: argparse.Namespace,
        show: Callable[[dict[str, Any]], None]) -> int:
    """Call `main(args)` and report its result or error per the output contract."""
    try:
        result = main(args)
    except ConfigError as error:
        return _fail(args, "config_error", str(error), {"source": error.source, "problems": error.problems})
    except ProjectError as error:
        return _fail(args, error.kind, str(error), error.details)
    except Exception as error:  # the contract holds for the unexpected too; the traceback goes to stderr
        traceback.print_exc()
        return _fail(args, "internal_error", f"{type(error).__name__}: {error}", {})
    if args.json:
        emit(result)
    else:
        show(result)
    return 0


def _fail(args: argparse.Namespace, kind: str, message: str, details: dict[str, Any]) -> int:
    if args.json:
        emit({"error": {"type": kind, "message": message, **details}})
    else:
        print(f"error: {message}", file=sys.stderr)
    return 1


def emit(obj: dict[str, Any]) -> None:
    """Print `obj` as one JSON line in a single write(2).

    Under a launcher every rank shares one stdout pipe; print() may write the text and its
    newline separately (unbuffered launchers), so two ranks' lines could interleave. One
    write of up to PIPE_BUF (4 KiB) bytes to a pipe is atomic.
    """
    text = json.dumps(obj, default=str) + "\n"
    sys.stdout.flush()  # anything printed before goes first
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):  # a captured, in-memory stdout
        sys.stdout.write(text)
        return
    view = memoryview(text.encode())
    while view:
        view = view[os.write(fd, view):]
