"""Runs a peer benchmark (the PyTorch references) in its own interpreter."""

import json
import subprocess


def run_json(command: list[str]) -> dict:
    """Runs `command` and returns the JSON object on the last line of its stdout."""
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"PyTorch reference failed ({' '.join(command)}):\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


class Server:
    """A peer kept running: each `request(line)` writes one line to its stdin and returns the
    JSON object of the next line of its stdout; `ready` is the object of its first line."""

    def __init__(self, command: list[str]):
        self._command = command
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self._process.stdout.readline()
        if not line:
            self._process.wait()
            raise RuntimeError(f"PyTorch peer failed ({' '.join(self._command)}):\n"
                               f"{self._process.stderr.read()}")
        return json.loads(line)

    def request(self, line: str) -> dict:
        self._process.stdin.write(line + "\n")
        self._process.stdin.flush()
        return self._read()

    def close(self) -> None:
        self._process.stdin.close()
        self._process.wait()
