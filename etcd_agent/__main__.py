"""``python -m etcd_agent``: the same as the ``etcd-agent`` console script."""

import sys

from .cli.main import main

sys.exit(main())
