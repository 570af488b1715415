"""Loaded by every Python child process of the tests (via PYTHONPATH), and by conftest for the test
process itself: refuses network connections to anything but loopback and logs each attempt to
$EDGETL_NETGUARD_LOG, so tests can prove that an export (onnx2tf, TensorFlow, torch) never reached
the network."""

import ipaddress
import os
import socket

_connect = socket.socket.connect


def _guarded(self, address):
    host = address[0] if isinstance(address, tuple) else None
    if host is not None:
        try:
            local = ipaddress.ip_address(host).is_loopback
        except ValueError:
            local = host == "localhost"
        if not local:
            log = os.environ.get("EDGETL_NETGUARD_LOG")
            if log:
                with open(log, "a") as fh:
                    fh.write(f"{os.getpid()} {address}\n")
            raise OSError(f"network access blocked in tests: {address}")
    return _connect(self, address)


socket.socket.connect = _guarded
