"""Start-up in-process: the listen socket and the package's lazy names."""

import socket
import subprocess
import sys

import pytest

from moekit.serve.server import PortInUseError, listen_socket


def test_a_taken_port_is_a_port_in_use_error_naming_it():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"port {port} on 127.0.0.1 is in use"):
            listen_socket("127.0.0.1", port)
    sock = listen_socket("127.0.0.1", port)  # free again
    sock.close()


def test_importing_the_package_loads_no_web_framework():
    code = (
        "import sys, moekit.serve as s\n"
        "assert not any(m.split('.')[0] in ('fastapi', 'uvicorn', 'torch') for m in sys.modules)\n"
        "assert callable(s.build) and callable(s.serve) and 'fastapi' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
