"""The thin MCP server around the olmo-fine-tuning-mcp template: it generates and updates
projects with copier and drives their own scripts; it holds no training logic."""
