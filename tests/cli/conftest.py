import shutil
import subprocess
import sys

MOEKIT = shutil.which("moekit") or ""


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The console script as a user runs it (or `python -m moekit` where it is not on PATH)."""
    cmd = [MOEKIT, *args] if MOEKIT else [sys.executable, "-m", "moekit", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc
