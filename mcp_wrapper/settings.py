"""What the server is configured with: environment variables, overridden by CLI flags.

OLMO_TEMPLATES_DIR       template source for new projects: a local template (copier.yml at its
                         top) or a git URL (default: the template bundled in this package; in a
                         source checkout, the checkout)
OLMO_TEMPLATE_REF        the template version new projects get and updates go to when a call names
                         none: a tag, a commit, or HEAD (a local template's working tree, as the
                         tests pin it); default: the newest tag
OLMO_TEMPLATE_GIT        the template's git history (a git URL or a local clone) for updating
                         projects made from the bundled copy, which has none (copier update needs
                         the old and the new version)
OLMO_DEFAULT_OUTPUT_DIR  where new projects go when a call names no output_dir
                         (default: ./fine-tuning-projects)
OLMO_ALLOWED_ROOTS       directories every path argument must lie in, separated by ':'
                         (default: the output directory)
OLMO_TRUSTED_TEMPLATES   template sources whose migrations may run (copier --trust), ':'-separated;
                         the bundled template is always trusted
OLMO_PROJECT_PYTHON      interpreter for a project's scripts when the project has no .venv
                         (default: the server's own)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

PACKAGE = Path(__file__).resolve().parent
# An installed wheel carries the template in the package; a source checkout is the template.
BUNDLED_TEMPLATE = (PACKAGE / "bundled_template" if (PACKAGE / "bundled_template" / "copier.yml").is_file()
                    else PACKAGE.parent)


def is_git_source(source: str) -> bool:
    """Whether copier can read versions from `source`: a git URL or a folder inside a git repository."""
    if source.startswith(("git@", "git+", "gh:", "gl:")) or source.endswith(".git") or "://" in source:
        return True
    path = Path(source).expanduser()
    return any((parent / ".git").exists() for parent in (path, *path.parents)) if path.exists() else False


def _paths(value: str) -> list[str]:
    return [part for part in value.split(os.pathsep) if part.strip()]


@dataclass
class Settings:
    template: str = str(BUNDLED_TEMPLATE)
    output_dir: Path = field(default_factory=lambda: Path.cwd() / "fine-tuning-projects")
    allowed_roots: list[Path] = field(default_factory=list)
    trusted_templates: list[str] = field(default_factory=list)
    python: str = sys.executable
    template_git: str = ""
    template_ref: Optional[str] = None

    def __post_init__(self) -> None:
        if self.template_ref is None:  # also when the settings are built directly, as the tests build them
            self.template_ref = os.environ.get("OLMO_TEMPLATE_REF") or None
        self.output_dir = Path(self.output_dir).expanduser().resolve()
        self.allowed_roots = [Path(r).expanduser().resolve() for r in self.allowed_roots] or [self.output_dir]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> Settings:
        env = os.environ if environ is None else environ
        values: dict = {}
        if env.get("OLMO_TEMPLATES_DIR"):
            values["template"] = env["OLMO_TEMPLATES_DIR"]
        if env.get("OLMO_DEFAULT_OUTPUT_DIR"):
            values["output_dir"] = Path(env["OLMO_DEFAULT_OUTPUT_DIR"])
        if env.get("OLMO_ALLOWED_ROOTS"):
            values["allowed_roots"] = [Path(p) for p in _paths(env["OLMO_ALLOWED_ROOTS"])]
        if env.get("OLMO_TRUSTED_TEMPLATES"):
            values["trusted_templates"] = _paths(env["OLMO_TRUSTED_TEMPLATES"])
        if env.get("OLMO_PROJECT_PYTHON"):
            values["python"] = env["OLMO_PROJECT_PYTHON"]
        if env.get("OLMO_TEMPLATE_GIT"):
            values["template_git"] = env["OLMO_TEMPLATE_GIT"]
        if env.get("OLMO_TEMPLATE_REF"):
            values["template_ref"] = env["OLMO_TEMPLATE_REF"]
        values.update({k: v for k, v in overrides.items() if v not in (None, [], "")})
        return cls(**values)

    def trusted(self, template: str) -> bool:
        """Migrations (and other unsafe copier features) run only for trusted templates."""
        def norm(source: str) -> str:
            path = Path(source).expanduser()
            return str(path.resolve()) if path.exists() else source.rstrip("/")

        trusted = {norm(str(BUNDLED_TEMPLATE))} | {norm(t) for t in self.trusted_templates}
        return norm(template) in trusted | ({norm(self.template_git)} if self.template_git else set())

    def local_template(self) -> Path:
        """The template's files on this machine (for the questionnaire); the bundled one
        when the source is a git URL."""
        path = Path(self.template).expanduser()
        return path if (path / "copier.yml").is_file() else BUNDLED_TEMPLATE

    def project_python(self, project: Path) -> str:
        venv = project / ".venv" / "bin" / "python"
        return str(venv) if venv.is_file() else self.python
