"""The thin MCP server around the olmo-fine-tuning-mcp template (arrives with the MCP issue)."""
