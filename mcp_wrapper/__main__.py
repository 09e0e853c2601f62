"""python -m mcp_wrapper: the same as the olmo-fine-tuning-mcp command."""

from mcp_wrapper.server import main

main()
