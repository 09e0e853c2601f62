"""The thin MCP server around the olmo-fine-tuning-mcp template: it generates and updates
projects with copier and drives their own scripts; it holds no training logic."""

from importlib.metadata import PackageNotFoundError, version

try:  # computed from git when the package was built or installed (mcp_wrapper/checkout_version.py)
    __version__ = version("olmo-fine-tuning-mcp")
except PackageNotFoundError:  # a source tree that was never installed
    from mcp_wrapper.checkout_version import checkout_version

    __version__ = checkout_version()
