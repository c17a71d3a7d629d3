"""The model packages are pure math: they import with jax, flax, optax and numpy alone (../shared/DESIGN.md).

Every module of ``liax_jax``, ``xnemo_jax`` and ``perception`` is imported in a fresh interpreter in which
the runtime layers and the heavy optional packages cannot be imported at all, so a stray import (even a
lazy one at module level, or one reaching up into ``launch/``) fails here instead of on a bare GPU machine.
"""

import subprocess
import sys

from conftest import ROOT

BLOCKED = ("grain", "clu", "tensorflow", "tensorflow_datasets", "cv2", "torch", "orbax", "array_record",
           "ml_collections", "PIL", "safetensors", "diffusers", "transformers", "input_pipeline", "launch")

SCRIPT = r"""
import importlib, importlib.abc, pkgutil, sys

BLOCKED = set(sys.argv[1].split(","))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: model packages must import without it")
        return None

sys.meta_path.insert(0, Block())
sys.path.insert(0, sys.argv[2])
names = []
for package in ("liax_jax", "xnemo_jax", "perception"):
    pkg = importlib.import_module(package)
    for info in pkgutil.walk_packages(pkg.__path__, package + "."):
        importlib.import_module(info.name)
        names.append(info.name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not leaked, leaked
print(len(names), " ".join(names))
"""


def test_model_packages_import_with_only_jax_flax_optax_numpy():
    r = subprocess.run([sys.executable, "-c", SCRIPT, ",".join(BLOCKED), ROOT], capture_output=True, text=True,
                       timeout=300, cwd="/")
    assert r.returncode == 0, r.stderr[-3000:]
    count, names = r.stdout.split(" ", 1)
    modules = names.split()
    assert int(count) == len(modules) >= 15, r.stdout
    for name in ("liax_jax.inference", "liax_jax.training", "liax_jax.model", "xnemo_jax.unet", "xnemo_jax.convert"):
        assert name in modules, name


# Lazy imports (inside functions) escape the import test above; these layers may not be reached even so.
# (torch, safetensors and PIL stay allowed lazily: checkpoint conversion and CLIP's image resize use them.)
UPWARD = {"launch", "input_pipeline", "configs", "grain", "clu", "tensorflow", "tensorflow_datasets", "cv2", "orbax",
          "ml_collections", "absl", "array_record"}


def test_model_packages_never_import_the_runtime_layers_even_lazily():
    import ast
    import pathlib

    found = []
    for package in ("liax_jax", "xnemo_jax", "perception"):
        for path in sorted(pathlib.Path(ROOT, package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module or ""]
                else:
                    continue
                found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in UPWARD]
    assert not found, found
