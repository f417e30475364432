"""Print two lines to stdout, one to stderr, and a last stdout line without a newline.

Each line is one write: workers run ``python -u``, where ``print`` writes its text and its newline in two calls, and
two workers sharing one console (an inherited stdout, or the agent's stderr passing chunks as written) could then
have one's text land between the other's text and newline."""

import sys

sys.stdout.write("hello stdout\n")
sys.stdout.write("second line\n")
sys.stderr.write("hello stderr\n")
sys.stdout.write("no newline at end")
