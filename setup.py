"""Build hook: setuptools needs setup.py to run the cffi build of native/."""

from setuptools import setup

setup(cffi_modules=["native/build.py:ffibuilder"])
