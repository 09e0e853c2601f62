"""The thin MCP server around the olmo-fine-tuning-mcp template: it generates and updates
projects with copier and drives their own scripts; it holds no training logic."""

try:  # written by hatch-vcs from the git tag when the package is built or installed
    from mcp_wrapper._version import __version__
except ImportError:  # a source tree that was never installed
    __version__ = "0.0.0"
