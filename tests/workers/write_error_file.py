"""Write a torch-style error file to TORCHELASTIC_ERROR_FILE, then exit 1.

``record`` (default): the nested format of torch's @record; ``plain``: {"message": "..."}; ``bad``: not JSON.
"""

import json
import os
import sys
import time

kind = sys.argv[1] if len(sys.argv) > 1 else "record"
path = os.environ["TORCHELASTIC_ERROR_FILE"]
print("Traceback (most recent call last):\nRuntimeError: boom", file=sys.stderr)
with open(path, "w") as f:
    if kind == "record":
        json.dump({"message": {"message": "RuntimeError: boom",
                               "extraInfo": {"py_callstack": "Traceback ...", "timestamp": str(int(time.time()))}}}, f)
    elif kind == "plain":
        json.dump({"message": "plain message"}, f)
    else:
        f.write("{not json")
sys.exit(1)
