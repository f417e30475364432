"""Draw a progress bar on stderr the way tqdm does (``\\r``, no newline), then wait until the test lets it finish.

It connects to NOTIFY_SOCK and blocks until the test closes the connection, then ends the bar with a newline.
"""

import os
import socket
import sys

sys.stderr.write("progress 50%\r")
sys.stderr.flush()
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
    sock.connect(os.environ["NOTIFY_SOCK"])
    sock.recv(1)  # b"" once the test closes its end
sys.stderr.write("progress 100%\n")
