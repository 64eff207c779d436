"""Shim for tools that still need a setup.py, e.g. Beam's `--setup_file` when staging ESP to
Dataflow workers. All metadata is declared in setup.cfg."""

from setuptools import setup

setup()
