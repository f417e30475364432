"""Write this worker's environment and a few process facts (its parent-death signal too) to
OUTDIR/env_<RANK>.json, then exit 0."""

import ctypes
import json
import os
import sys

PR_GET_PDEATHSIG = 2
pdeathsig = ctypes.c_int(0)
ctypes.CDLL(None, use_errno=True).prctl(PR_GET_PDEATHSIG, ctypes.byref(pdeathsig), 0, 0, 0)

out = sys.argv[1] if len(sys.argv) > 1 else os.environ["RECORD_ENV_DIR"]
facts = {
    "env": dict(os.environ),
    "argv": sys.argv,
    "pid": os.getpid(),
    "pgid": os.getpgid(0),
    "sid": os.getsid(0),
    "ppid": os.getppid(),
    "pdeathsig": pdeathsig.value,  # the signal this process gets when its parent (thread) dies; 0: none
    "stdin": os.readlink("/proc/self/fd/0"),
}
with open(os.path.join(out, f"env_{os.environ['RANK']}.json"), "w") as f:
    json.dump(facts, f)
print(f"recorded rank {os.environ['RANK']}")
