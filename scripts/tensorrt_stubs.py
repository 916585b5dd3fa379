#!/usr/bin/env python3
"""Make the ``tensorrt-stubs`` wheel readable by mypy, so the TensorRT backend's calls are type-checked.

No TensorRT runs here (it needs an NVIDIA GPU and NVIDIA's package index), so mypy against TensorRT's API is the
check the TensorRT code gets on every CI run. The stubs on PyPI, generated from the bindings, cannot be read as they
are: they sit in an installed ``tensorrt/`` package without a ``py.typed`` marker (mypy skips such a package), and a
few generated signatures are not Python (parameters named ``in``, a parameter without a default after defaulted
ones). This copies the stub files into a folder for ``MYPYPATH`` and repairs those signatures only — every class,
method and type stays as generated; a signature it cannot repair stops it with the line.

    python scripts/tensorrt_stubs.py SITE_PACKAGES_WITH_THE_STUBS OUT_DIR
    MYPYPATH=OUT_DIR mypy
"""

from __future__ import annotations

import ast
import keyword
import re
import shutil
import sys
from pathlib import Path

PACKAGES = ("tensorrt", "tensorrt_bindings")
# a parameter named after a keyword (``in: list[PluginTensorDesc]``): renamed with a trailing underscore
_KEYWORD_PARAMETER = re.compile(rf"(?<=[(\s])({'|'.join(keyword.kwlist)})(?=: )")


def _split_parameters(text: str) -> list[str]:
    """A signature's parameters, split at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch in "[(") - (ch in "])")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _defaults_after_defaults(line: str) -> str:
    """Give ``= ...`` to each parameter that follows a defaulted one without a default of its own."""
    head, _, rest = line.partition("(")
    depth, end = 1, 0
    for end, ch in enumerate(rest):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            break
    parameters, defaulted = _split_parameters(rest[:end]), False
    for i, parameter in enumerate(parameters):
        name = parameter.strip()
        if "=" in name:
            defaulted = True
        elif defaulted and name and not name.startswith("*"):
            parameters[i] = f"{parameter} = ..."
    return f"{head}({','.join(parameters)}{rest[end:]}"


def repair(source: str, name: str) -> str:
    lines = source.splitlines()
    for _ in range(len(lines)):
        try:
            ast.parse("\n".join(lines), filename=name)
            return "\n".join(lines) + "\n"
        except SyntaxError as exc:
            index = (exc.lineno or 1) - 1
            line = lines[index]
            fixed = _KEYWORD_PARAMETER.sub(lambda m: f"{m.group(0)}_", line)
            if fixed == line and "default argument" in (exc.msg or ""):
                fixed = _defaults_after_defaults(line)
            if fixed == line:
                raise SystemExit(f"{name}:{exc.lineno}: cannot repair: {exc.msg}: {line.strip()[:120]}")
            lines[index] = fixed
    raise SystemExit(f"{name}: no end to the repairs")


def main(site_packages: str, out: str) -> None:
    site, target = Path(site_packages), Path(out)
    missing = [p for p in PACKAGES if not (site / p / "__init__.pyi").is_file()]
    if missing:
        raise SystemExit(f"{site} holds no tensorrt-stubs ({', '.join(missing)} missing): "
                         "pip install --no-deps --target DIR tensorrt-stubs")
    shutil.rmtree(target, ignore_errors=True)
    for package in PACKAGES:
        for stub in sorted((site / package).rglob("*.pyi")):
            written = target / stub.relative_to(site)
            written.parent.mkdir(parents=True, exist_ok=True)
            written.write_text(repair(stub.read_text(encoding="utf-8"), str(stub.relative_to(site))), encoding="utf-8")
    print(f"tensorrt stubs for mypy in {target}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.strip().splitlines()[-2].strip())
    main(*sys.argv[1:])
