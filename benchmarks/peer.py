"""Runs a peer benchmark (the PyTorch references) in its own interpreter."""

import json
import subprocess


def run_json(command: list[str]) -> dict:
    """Runs `command` and returns the JSON object on the last line of its stdout."""
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"PyTorch reference failed ({' '.join(command)}):\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])
