"""Sits between an MCP client and the real server: starts the server command, forwards
stdin to it and its stdout back, byte for byte, and records every byte the server wrote to
stdout in a file (the stdio test then checks that all of it is JSON-RPC).

    python stdio_recorder.py RECORD_FILE SERVER_COMMAND...
"""

import subprocess
import sys
import threading


def main() -> int:
    record = open(sys.argv[1], "wb")
    child = subprocess.Popen(sys.argv[2:], stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def forward_stdin() -> None:
        for chunk in iter(lambda: sys.stdin.buffer.read1(65536), b""):
            child.stdin.write(chunk)
            child.stdin.flush()
        child.stdin.close()

    threading.Thread(target=forward_stdin, daemon=True).start()
    for chunk in iter(lambda: child.stdout.read1(65536), b""):
        record.write(chunk)
        record.flush()
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
