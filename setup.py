"""Build step the pyproject can't declare: ship the gRPC contract inside the package.

``build_py`` copies ``proto/`` into ``server/api/grpc/proto/`` of the build and generates the
Python stubs from it (``server.api.grpc.codegen``), so a wheel or a plain ``pip install .``
serves gRPC without the source tree. A stub built by another grpcio-tools than the one
installed is regenerated at first use from the packaged copy.
"""

import importlib.util
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithStubs(build_py):
    def run(self):
        super().run()
        spec = importlib.util.spec_from_file_location("_codegen", ROOT / "server/api/grpc/codegen.py")
        codegen = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(codegen)
        grpc_dir = Path(self.build_lib) / "server" / "api" / "grpc"
        shutil.rmtree(grpc_dir / "proto", ignore_errors=True)
        shutil.copytree(ROOT / "proto", grpc_dir / "proto", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
        shutil.rmtree(grpc_dir / "_gen", ignore_errors=True)
        codegen.generate(grpc_dir / "proto", grpc_dir / "_gen")


setup(cmdclass={"build_py": BuildWithStubs})
