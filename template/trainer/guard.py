"""What a request from outside the project (an MCP client, through the server) may make it do.

The MCP server runs the project's scripts with OLMO_GUARD_ROOTS set to its allowed roots
(and OLMO_GUARD_CLIENT_ROOTS to the client's, when it sent any). A script then holds every
path it reads or writes to those roots, the derived ones too: the config's folders, the
run folder and every symlink below it, data files, the base model's directory, exports.
It also refuses overrides (--set) that name code to import or a network endpoint to send
data to: those stay available to a user who writes them into the YAML by hand.

Without OLMO_GUARD_ROOTS (a user at a shell) nothing here restricts anything.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from pydantic import BaseModel

from trainer.errors import ProjectError

ROOTS_ENV = "OLMO_GUARD_ROOTS"
CLIENT_ROOTS_ENV = "OLMO_GUARD_CLIENT_ROOTS"

# Field kinds that are not plain values (set with json_schema_extra={"guard": KIND} in trainer.config;
# fields typed Path are "path" without saying so). A "store" is a tracking URI: a local file or
# folder (checked as a path) or a server (an endpoint). A "model" is a Hub id or, since the
# loaders read a local folder of that name first, a path.
PATH, GLOBS, CODE, ENDPOINT, STORE, MODEL = "path", "globs", "code", "endpoint", "store", "model"
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
REFUSED_KINDS = {CODE: "names code to import and call", ENDPOINT: "names a network endpoint that receives data"}


class GuardError(ProjectError):
    kind = "refused"


def _roots(variable: str) -> Optional[list[Path]]:
    value = os.environ.get(variable, "")
    roots = [Path(part).resolve() for part in value.split(os.pathsep) if part.strip()]
    return roots or None


def roots() -> Optional[list[Path]]:
    """The allowed roots of the request, or None when the script runs for a user at a shell."""
    return _roots(ROOTS_ENV)


def active() -> bool:
    return roots() is not None


def _inside(path: Path, folders: list[Path]) -> bool:
    return any(path == folder or path.is_relative_to(folder) for folder in folders)


def check_path(path: Path | str, what: str) -> Path:
    """`path` resolved (symlinks followed); under the guard it must lie inside the roots."""
    resolved = Path(path).expanduser().resolve()
    allowed = roots()
    if allowed is None:
        return resolved
    for folders, whose in ((allowed, "the allowed roots"), (_roots(CLIENT_ROOTS_ENV), "the client's roots")):
        if folders is not None and not _inside(resolved, folders):
            raise GuardError(f"{what} ({path}) resolves to {resolved}, which is outside {whose} "
                             f"({', '.join(map(str, folders))}); move it inside, or add its folder to the "
                             "server's OLMO_ALLOWED_ROOTS", details={"field": what, "path": str(resolved)})
    return resolved


def check_tree(folder: Path, what: str) -> None:
    """Under the guard, no link below `folder` may lead outside the roots (writes through it
    would land there), links to folders that lead to further links included."""
    if not active() or not folder.is_dir():
        return
    check_path(folder, what)
    seen = set()
    for parent, dirs, files in os.walk(folder, followlinks=True):
        real = Path(parent).resolve()
        if real in seen:  # a link loop, or a folder reached twice
            dirs.clear()
            continue
        seen.add(real)
        for name in (*dirs, *files):
            entry = Path(parent) / name
            if entry.is_symlink():
                check_path(entry, f"{what}: {entry.relative_to(folder)}")


# ----------------------------------------------------------------- the config's fields


def kind_of(field: Any) -> Optional[str]:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if "guard" in extra:
        return extra["guard"]
    annotation = field.annotation
    return PATH if Path in (annotation, *getattr(annotation, "__args__", ())) else None


def fields(model: BaseModel, prefix: str = "") -> Iterable[tuple[str, Optional[str], Any]]:
    """(dotted key, kind, value) of every leaf field of a config."""
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            yield from fields(value, f"{key}.")
        else:
            yield key, kind_of(field), value


def key_kind(model: type[BaseModel], dotted: str) -> Optional[str]:
    """The kind of the field at `dotted` (None for plain values or unknown keys)."""
    parts = dotted.split(".")
    for part in parts[:-1]:
        field = model.model_fields.get(part)
        if field is None:
            return None
        sections = [a for a in (field.annotation, *getattr(field.annotation, "__args__", ()))
                    if isinstance(a, type) and issubclass(a, BaseModel)]
        if not sections:
            return None
        model = sections[0]
    field = model.model_fields.get(parts[-1])
    if field is None:
        return None
    if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
        return "section"
    return kind_of(field)


def check_overrides(model: type[BaseModel], overrides: Mapping[str, Any]) -> None:
    """Under the guard, overrides may not name code or endpoints (paths are checked once the
    config is loaded, with every other path)."""
    if not active():
        return
    for key, value in overrides.items():
        kind = key_kind(model, key)
        if kind == "section" and isinstance(value, Mapping):
            check_overrides(model, {f"{key}.{k}": v for k, v in value.items()})
            continue
        if kind == STORE and isinstance(value, str) and local_path_of(value) is None and not loopback(value):
            kind = ENDPOINT  # a tracking server elsewhere: the run's data would leave the machine
        if kind == MODEL and not (isinstance(value, str) and HUB_ID.fullmatch(value) and ".." not in value):
            raise GuardError(f"override {key} must be a Hugging Face model id (owner/name); a request through "
                             "the MCP server sets a local model with base_model.local_path, which is held to the "
                             "allowed roots", details={"field": key})
        if kind in REFUSED_KINDS and value not in (None, "", []):
            raise GuardError(f"override {key} is refused: it {REFUSED_KINDS[kind]}; a request through the MCP "
                             "server may not set it (write it into config/fine_tuning_config.yaml by hand "
                             "if you mean it)", details={"field": key})


def _glob_base(pattern: str) -> str:
    """The part of a glob before its first wildcard."""
    cut = min((pattern.find(c) for c in "*?[" if c in pattern), default=len(pattern))
    return pattern[:cut].rpartition("/")[0] or "."


# Folders the code derives from the project root rather than from a config key.
DERIVED = ("models", "models/quantized", "wandb", "mlruns", ".tmp")


def check_config(config: Any) -> None:
    """Under the guard, every folder and file the config names (or the code derives from the
    project root) lies inside the roots, and so does every link inside the base model."""
    if not active():
        return
    check_path(config.source, "the config file")
    for name in DERIVED:
        check_path(config.root / name, f"the project's {name}/ folder")
    if config.base_model.local_path is not None:
        check_tree(config.resolve(config.base_model.local_path), "base_model.local_path")
    for key, kind, value in fields(config):
        if value in (None, "", []):
            continue
        if kind == PATH:
            check_path(config.resolve(value), key)
        elif kind == GLOBS:
            for pattern in value:
                check_path(config.resolve(_glob_base(pattern)), key)
        elif kind == STORE and isinstance(value, str):
            local = local_path_of(value)
            if local is not None:
                check_path(config.resolve(local), key)
        elif kind == MODEL and isinstance(value, str) and config.base_model.local_path is None:
            local = config.resolve(value)  # the loaders take an existing folder of that name first
            if local.exists() or Path(value).expanduser().exists():
                check_path(local if local.exists() else value, key)


def local_path_of(uri: str) -> Optional[str]:
    """The file a tracking URI writes to (sqlite:///x, file:///x or a plain folder), else None."""
    for scheme in ("sqlite:///", "file://"):
        if uri.startswith(scheme):
            return uri[len(scheme):] if scheme == "sqlite:///" else uri[len(scheme):] or "/"
    return None if "://" in uri else uri


def loopback(uri: str) -> bool:
    """Whether a server URI stays on this machine (localhost, 127.0.0.0/8, ::1)."""
    try:
        host = urlparse(uri).hostname or ""
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
