"""The cluster tests (bed.py builds the cluster). A package, so that its modules, conftest.py included, are
imported as ``cluster.*`` and never stand in for tests/' own modules of the same name."""
