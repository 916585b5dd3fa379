"""scripts/tensorrt_stubs.py repairs only what keeps mypy from reading TensorRT's generated stubs."""

import ast
import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("tensorrt_stubs",
                                               Path(__file__).resolve().parents[1] / "scripts" / "tensorrt_stubs.py")
tensorrt_stubs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tensorrt_stubs)

GENERATED = '''class IPluginV3:
    def on_shape_change(self: IPluginV3, in: list[PluginTensorDesc], out: list[PluginTensorDesc]) -> None:
        """in: the inputs"""
    def add_scale_nd(self, input: ITensor, mode: ScaleMode, shift: Weights = None, power: dict[str, int], axis: int) -> X:
        ...
    def untouched(self, a: int = 1, *, b: int) -> None: ...
'''


def test_keyword_parameters_are_renamed_and_missing_defaults_given():
    repaired = tensorrt_stubs.repair(GENERATED, "tensorrt.pyi")
    tree = ast.parse(repaired)
    methods = {f.name: f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
    assert [a.arg for a in methods["on_shape_change"].args.args] == ["self", "in_", "out"]
    scale = methods["add_scale_nd"].args
    assert [a.arg for a in scale.args] == ["self", "input", "mode", "shift", "power", "axis"]
    assert len(scale.defaults) == 3  # shift's, and ... for the two after it
    assert "dict[str, int] = ..." in repaired and "axis: int = ..." in repaired
    assert '"""in: the inputs"""' in repaired  # only signatures change
    assert "def untouched(self, a: int = 1, *, b: int) -> None: ..." in repaired


def test_what_it_cannot_repair_stops_it_with_the_line():
    with pytest.raises(SystemExit, match=r"tensorrt.pyi:2: cannot repair"):
        tensorrt_stubs.repair("class A:\n    def f(self, x: int) -> None\n", "tensorrt.pyi")
