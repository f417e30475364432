"""Helpers for tests and tools only: embedded etcd clusters (``cluster``). Nothing in the product imports this
package.
"""
