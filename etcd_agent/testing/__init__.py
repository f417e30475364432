"""Helpers for tests and tools only: embedded etcd clusters (``cluster``) and the simulation (``sim``: real agents,
stand-in workers). Nothing in the product imports this package.
"""
