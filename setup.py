"""Build rdr_fast. The top-level kernels/ folder ships as rdr_fast.kernels."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["rdr_fast", "rdr_fast.*"]) + ["rdr_fast.kernels"],
    package_dir={"rdr_fast": "rdr_fast", "rdr_fast.kernels": "kernels"},
)
