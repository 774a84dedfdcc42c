"""The `likeness` command in a child process, stopped by a signal once it has printed a line: how a
user's Ctrl-C or a service manager's SIGTERM reaches a real run (handlers, exit status, stderr)."""
from __future__ import annotations

import os
import subprocess
import sys


def stop_when(args: list[str], prefix: str, sig: int, timeout: float = 120) -> tuple[int, str]:
    """Run ``likeness <args>``, send ``sig`` when a stdout line starts with ``prefix``; returns
    (exit status, stderr)."""
    cmd = [sys.executable, "-u", "-m", "likeness.cli", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        for line in proc.stdout:
            if line.startswith(prefix):
                break
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return proc.returncode, err
