"""Import boundaries: the CLI's help and the device runtime never load the heavy stacks."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import REPO

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {blocked!r}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked by test: {{name}}")
    sys.meta_path.insert(0, Block())
    """
)


def run_blocked(blocked: set[str], code: str) -> subprocess.CompletedProcess:
    script = BLOCKER.format(blocked=sorted(blocked)) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def test_help_imports_neither_torch_nor_tensorflow():
    code = """
        from edgetl.cli import main
        for args in (["--help"], *([name, "--help"] for name in sorted(main.commands))):
            try:
                main(args, prog_name="edgetl")
            except SystemExit as exc:
                assert exc.code == 0, exc.code
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "tensorflow", "onnx", "optuna"})
        print("HEAVY", heavy)
    """
    proc = run_blocked({"torch", "torchvision", "tensorflow", "onnx", "onnxruntime", "optuna"}, code)
    assert proc.returncode == 0, proc.stderr
    for command in ("finetune", "demo", "export", "check", "search"):
        assert f"Usage: edgetl {command}" in proc.stdout, command
    assert "HEAVY []" in proc.stdout


def test_runtime_preprocessing_needs_only_numpy_and_opencv(tmp_path):
    import numpy as np
    from PIL import Image

    path = tmp_path / "image.png"
    Image.fromarray(np.full((50, 80, 3), 128, np.uint8)).save(path)
    code = f"""
        from edgetl.runtime.preprocess import PreprocessSpec, load_image, prepare
        spec = PreprocessSpec.for_size(32)
        crop = prepare(load_image({str(path)!r}), spec)
        assert crop.shape == (32, 32, 3) and crop.dtype.name == "uint8", crop.shape
        loaded = sorted(m.split(".")[0] for m in sys.modules)
        print("EDGETL", sorted({{m for m in sys.modules if m.startswith("edgetl.")}}))
    """
    proc = run_blocked({"torch", "torchvision", "tensorflow", "onnx", "onnxruntime", "click", "PIL"}, code)
    assert proc.returncode == 0, proc.stderr
    assert "EDGETL ['edgetl.runtime', 'edgetl.runtime.imageheader', 'edgetl.runtime.preprocess']" in proc.stdout


def test_missing_torch_names_the_extra():
    code = """
        from edgetl.cli import main
        try:
            main(["finetune", "data", "--out", "run"])
        except SystemExit as exc:
            print("EXIT", exc.code)
    """
    proc = run_blocked({"torch"}, code)
    assert "EXIT 5" in proc.stdout, proc.stdout + proc.stderr
    assert 'pip install "edgetl[train]"' in proc.stderr
    assert "Traceback" not in proc.stderr
