"""Print two lines to stdout, one to stderr, and a last stdout line without a newline."""

import sys

print("hello stdout")
print("second line")
print("hello stderr", file=sys.stderr)
sys.stdout.write("no newline at end")
