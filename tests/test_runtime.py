import subprocess
import sys


def run(code, **env):
    import os

    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_allocator_tuning_applies_once_and_can_be_turned_off():
    code = "from moekit.runtime import tune_cpu_allocator as t; a = t(); b = t(); print(a, b)"
    first, second = run(code).split()
    assert first == second  # idempotent
    assert run(code, MOEKIT_CPU_ALLOCATOR="system") == "False False"
