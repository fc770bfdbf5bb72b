"""Extension modules only; everything else about the package is in pyproject.toml.

Compiler directives are set once here. ``CONVEYOR_DEBUG=1`` builds with line tracing,
internal asserts and no optimisation, for debugging and coverage of the Cython code.
"""

import os
import platform

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("CONVEYOR_DEBUG") == "1"

directives = {
    "language_level": 3,
    "embedsignature": True,
    "linetrace": DEBUG,
    "profile": DEBUG,
}
macros = [("CYTHON_TRACE_NOGIL", "1")] if DEBUG else [("NDEBUG", "1")]
compile_args = ["-O0", "-g", "-Wall"] if DEBUG else ["-O2", "-Wall"]
# Cython's generated code trips these; our own code is checked by the rest of -Wall.
compile_args += ["-Wno-unused-function", "-Wno-unreachable-code"]

# The shared rate-limit buckets swap 16 bytes at once: cmpxchg16b on x86-64.
atomic_args = ["-mcx16"] if platform.machine() in ("x86_64", "AMD64") else []

extensions = [
    Extension(
        "engine._segment",
        ["engine/_segment.pyx"],
        include_dirs=["engine"],
        define_macros=macros,
        extra_compile_args=compile_args,
    ),
    Extension(
        "engine._queue",
        ["engine/_queue.pyx"],
        include_dirs=["engine"],
        define_macros=macros,
        extra_compile_args=compile_args,
    ),
    Extension(
        "engine._syncer",
        ["engine/_syncer.pyx"],
        define_macros=macros,
        extra_compile_args=compile_args,
    ),
    Extension(
        "engine._ring",
        ["engine/_ring.pyx"],
        include_dirs=["engine", numpy.get_include()],
        define_macros=[*macros, ("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=compile_args,
    ),
    Extension(
        "server.protection._shared_buckets",
        ["server/protection/_shared_buckets.pyx"],
        define_macros=macros,
        extra_compile_args=compile_args + atomic_args,
    ),
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives))
