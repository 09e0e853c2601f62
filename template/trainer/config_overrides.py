"""Where a config value comes from besides the YAML file: OLMO_<SECTION>__<KEY> environment
variables and dotted overrides from code or the command line, applied key by key (an unknown
key is refused with the keys allowed there), and validation errors worded with their source."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import BaseModel

from trainer.errors import ConfigError

ENV_PREFIX = "OLMO_"
ENV_DELIMITER = "__"


def env_overrides(environ: Mapping[str, str]) -> dict[tuple[str, ...], tuple[str, Any]]:
    """Config overrides found in the environment: {key path: (variable name, parsed value)}.

    Only OLMO_<SECTION>__<KEY> variables (with the nested delimiter) are config
    overrides; plain OLMO_* variables belong to other tools (e.g. the MCP server).
    Values are parsed as YAML so numbers, booleans and lists keep their types.
    """
    found = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or ENV_DELIMITER not in name:
            continue
        path = tuple(part.lower() for part in name[len(ENV_PREFIX):].split(ENV_DELIMITER))
        if any(not part for part in path):
            raise ConfigError(name, [f"{name}: empty key in the variable name (use OLMO_SECTION__KEY)"])
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        found[path] = (name, value)
    return found


def allowed_keys(model: type[BaseModel], path: tuple[str, ...]) -> list[str] | None:
    """The keys a mapping at `path` may hold, or None if `path` is not a section."""
    for part in path:
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        section = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if section is None:
            return None
        model = section
    return sorted(model.model_fields)


def apply(model: type[BaseModel], data: dict[str, Any], overrides: dict[tuple[str, ...], tuple[str, Any]]) -> list[str]:
    problems = []
    for path, (name, value) in sorted(overrides.items()):
        parent_keys = allowed_keys(model, path[:-1])
        if parent_keys is None or path[-1] not in parent_keys:
            where = ".".join(path[:-1]) or "the top level"
            allowed = ", ".join(parent_keys) if parent_keys else ", ".join(sorted(model.model_fields))
            problems.append(f"{name}: unknown key '{'.'.join(path)}'; keys allowed in {where}: {allowed}")
            continue
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return problems


def describe(model: type[BaseModel], error: dict[str, Any], sources: dict[tuple[str, ...], str],
             default_source: str) -> str:
    loc = tuple(str(p) for p in error["loc"])
    key = ".".join(loc) or "(top level)"
    source = next((sources[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in sources), default_source)
    if error["type"] == "extra_forbidden":
        allowed = allowed_keys(model, tuple(loc[:-1])) or []
        return f"{key}: unknown key (in {source}); allowed here: {', '.join(allowed)}"
    if error["type"] == "missing":
        return f"{key}: required key is missing (in {source})"
    message = error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    return f"{key}: {message}{shown} (in {source})"
