"""The native part of VTL: libudt congestion controls (``vtl.bridge.transports._udtcc``).

Everything else is declared in pyproject.toml; this file only adds the C++ extension,
built against Debian's libudt-dev (``/usr/include/udt``, ``-ludt``: the same
``libudt.so.0`` that udt4py links, so both share one UDT instance).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "vtl.bridge.transports._udtcc",
    sources=["bridge/transports/udtcc.cpp"],
    language="c++",
    libraries=["udt"],
    extra_compile_args=["-std=c++17", "-O2", "-Wall"],
)])
