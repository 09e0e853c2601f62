"""A minimal MCP client that is not ours: JSON-RPC 2.0 over the server's stdin/stdout, written
from the 2026-07-28 specification alone (no mcp SDK). Each request carries the per-request
`_meta` envelope (protocol version, client info, and empty client capabilities: no roots, no
sampling, no elicitation), and every line the server writes must be one JSON-RPC message.
A call that answers with a running job is followed with wait_for_job, as an agent would."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from typing import Any

PROTOCOL = "2026-07-28"
META = {"io.modelcontextprotocol/protocolVersion": PROTOCOL,
        "io.modelcontextprotocol/clientInfo": {"name": "raw-json-rpc", "version": "1.0"},
        "io.modelcontextprotocol/clientCapabilities": {}}
CLIENT_TIMEOUT = 60.0  # what many clients allow one request


class ToolFailed(Exception):
    pass


class RawClient:
    def __init__(self, argv: list[str], env: dict[str, str], cwd: str):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env, cwd=cwd)
        self.next_id = 0
        self.durations: list[tuple[str, float]] = []
        self.stderr: list[bytes] = []
        threading.Thread(target=lambda: self.stderr.extend(iter(self.proc.stderr.readline, b"")),
                         daemon=True).start()

    def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one request; return its result. Every line read on the way must be JSON-RPC."""
        self.next_id += 1
        message = {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": {**(params or {}), "_meta": META}}
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        self.proc.stdin.flush()
        began = time.monotonic()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"the server closed stdout; stderr: {b''.join(self.stderr)[-3000:]!r}")
            reply = json.loads(line)  # anything but JSON on stdout fails here
            assert reply.get("jsonrpc") == "2.0", reply
            if reply.get("id") == self.next_id:
                break
            assert "method" in reply, f"a reply to no request: {reply}"
            # a notification may come; a request (roots, sampling) may not: this client declared no capabilities
            assert reply["method"].startswith("notifications/"), f"the server asked a capability-less client: {reply}"
        elapsed = time.monotonic() - began
        name = params.get("name", method) if params else method
        self.durations.append((name, elapsed))
        assert elapsed < CLIENT_TIMEOUT, f"{name} took {elapsed:.1f} s; a client gives up after {CLIENT_TIMEOUT:.0f} s"
        assert "error" not in reply, reply["error"]
        return reply["result"]

    def call(self, tool: str, **arguments: Any) -> dict[str, Any]:
        """A tool's structured result; a tool error raises ToolFailed with its text. A running
        job is waited for with wait_for_job and its result returned."""
        result = self.request("tools/call", {"name": tool, "arguments": arguments})
        text = "".join(part.get("text", "") for part in result.get("content", []))
        if result.get("isError"):
            raise ToolFailed(text)
        out = result["structuredContent"]
        assert json.loads(text) == out, "the text content mirrors the structured result"
        if isinstance(out, dict) and out.get("job_status") == "running":
            while True:
                state = self.call("wait_for_job", project_path=arguments["project_path"], job_id=out["job_id"])
                if state["status"] != "running":
                    break
            if state["status"] != "completed":
                raise ToolFailed(state.get("error") or state["status"])
            return state["result"]
        return out

    def close(self) -> int:
        self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
