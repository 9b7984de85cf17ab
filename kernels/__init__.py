"""Triton kernels for rdr_fast, installed as ``rdr_fast.kernels`` (setup.py maps this
top-level folder into the package). Importing this package does no GPU work."""
