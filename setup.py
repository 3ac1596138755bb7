"""Build hook: setuptools needs setup.py to run the cffi build of native/."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

_spec = importlib.util.spec_from_file_location(
    "capvisor_native_build", Path(__file__).resolve().parent / "native" / "build.py"
)
assert _spec is not None and _spec.loader is not None
_native_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_native_build)


class build_ext_by_rename(build_ext):
    """``pip install -e .`` copies the extension into supervisor/: by rename,
    so a supervisor that is running from this tree keeps working."""

    def copy_file(self, infile, outfile, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not str(outfile).endswith(".so"):
            return super().copy_file(infile, outfile, *args, **kwargs)
        _native_build.install(Path(infile), Path(outfile))
        return outfile, True


setup(cffi_modules=["native/build.py:ffibuilder"], cmdclass={"build_ext": build_ext_by_rename})
