"""The streamable-http transport: served on 127.0.0.1 only, a real client works, and a
request with a foreign Host header (DNS rebinding) is refused."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time

import anyio
import pytest
from mcp import Client

from conftest import REPO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_http_transport_on_loopback_with_rebinding_protection(tmp_path):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mcp_wrapper", "--transport", "streamable-http", "--port",
                               str(port), "--output-dir", str(tmp_path)], cwd=tmp_path, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "the server did not come up"
                time.sleep(0.2)
        listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True, check=False).stdout
        if listening:
            assert f"127.0.0.1:{port}" in listening and f"0.0.0.0:{port}" not in listening

        async def tools():
            async with Client(f"http://127.0.0.1:{port}/mcp") as client:
                return {tool.name for tool in (await client.list_tools()).tools}

        assert "generate_fine_tuning_project" in anyio.run(tools)

        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("POST", "/mcp", body=b"{}", headers={
            "Host": "evil.example:80", "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream"})
        assert connection.getresponse().status in (403, 421)
    finally:
        server.terminate()
        server.wait(timeout=30)
