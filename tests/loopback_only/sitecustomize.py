"""Loaded by every Python process of the gs:// tests (tests/gcs_emulator.py puts this folder on PYTHONPATH).

With GPT1_JAX_LOOPBACK_ONLY set, an audit hook refuses every socket connection to an address outside
127.0.0.0/8 and ::1, so a client that tried to reach a cloud metadata server or Google's endpoints
fails the test with the address it tried, instead of sending traffic off this machine.
"""

import ipaddress
import os
import sys


def _refuse_off_loopback(event, args):
    if event != "socket.connect" or not isinstance(args[1], tuple):
        return  # AF_UNIX and other non-IP sockets stay on this machine
    host = args[1][0]
    try:
        loopback = ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        loopback = False  # a name: resolving it would already have left loopback
    if not loopback:
        raise ConnectionRefusedError(f"the gs:// tests allow loopback only; refused a connection to {args[1]}")


if os.environ.get("GPT1_JAX_LOOPBACK_ONLY"):
    sys.addaudithook(_refuse_off_loopback)
