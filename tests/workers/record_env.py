"""Write this worker's environment and a few process facts to OUTDIR/env_<RANK>.json, then exit 0."""

import json
import os
import sys

out = sys.argv[1] if len(sys.argv) > 1 else os.environ["RECORD_ENV_DIR"]
facts = {
    "env": dict(os.environ),
    "argv": sys.argv,
    "pid": os.getpid(),
    "pgid": os.getpgid(0),
    "sid": os.getsid(0),
    "stdin": os.readlink("/proc/self/fd/0"),
}
with open(os.path.join(out, f"env_{os.environ['RANK']}.json"), "w") as f:
    json.dump(facts, f)
print(f"recorded rank {os.environ['RANK']}")
