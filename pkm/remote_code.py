"""Remote code for saved folders: they load with only torch and transformers installed.

``write_remote_code(folder)`` (called by every BertPkm model's ``save_pretrained``, so also by
``pretrain.convert``) writes two files beside the weights and an ``auto_map`` into config.json:

* ``configuration_bert_pkm.py``: ``pkm/memory_config.py`` + ``pkm/configuration.py``;
* ``modeling_bert_pkm.py``: ``pkm/values.py`` + ``pkm/memory.py`` + ``pkm/modeling.py``,

then ``AutoModel*.from_pretrained(folder, trust_remote_code=True)`` works on a machine without this
package. The files are generated from the package's own source at save time, so they cannot drift
from it: each module's statements are copied as they are (comments included), with

* the imports of ``pkm`` dropped (the modules now sit in one file; names from the configuration
  file come in by a relative import, which transformers copies along);
* the pure-torch path only: the kernel switches (``triton_enabled``, ``fused_topk_enabled``) become
  functions that always say no, every ``if <switch>(...):`` block is replaced by its ``else`` part,
  and functions that only serve the kernels (they import ``pkm.triton_kernels``) are left out;
* package-only methods (``save_pretrained``, which calls this generator) left out.

Anything the rules do not cover (a new import of ``pkm``, a name clash between modules, a dropped
function still in use) raises ``RemoteCodeError`` here, at save time, instead of writing a file that
fails on the colleague's machine.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os

from pkm.auto_classes import AUTO_CLASSES

__all__ = ["CONFIG_FILE", "MODELING_FILE", "RemoteCodeError", "auto_map", "remote_code_sources", "write_remote_code"]

CONFIG_FILE = "configuration_bert_pkm.py"
MODELING_FILE = "modeling_bert_pkm.py"
_FILES = {
    CONFIG_FILE: ("pkm.memory_config", "pkm.configuration"),
    MODELING_FILE: ("pkm.values", "pkm.memory", "pkm.modeling"),
}
_KERNEL_SWITCHES = ("triton_enabled", "fused_topk_enabled")
_PACKAGE_ONLY_METHODS = ("save_pretrained",)
_SWITCH_STUB = '''def {name}(tensor, flag=None):
    """The remote code holds the torch path only: no Triton kernels."""
    if flag:
        raise RuntimeError("this folder's remote code has no Triton kernels; install pkm-bert for them.")
    return False
'''


class RemoteCodeError(RuntimeError):
    """The package source has something the remote-code rules do not cover."""


def auto_map() -> dict[str, str]:
    """config.json's ``auto_map``: every Auto class the package registers, to the remote classes."""
    stem = os.path.splitext(MODELING_FILE)[0]
    return {"AutoConfig": f"{os.path.splitext(CONFIG_FILE)[0]}.BertPkmConfig",
            **{auto: f"{stem}.{cls}" for auto, cls in AUTO_CLASSES.items()}}


def _module_source(module: str) -> tuple[str, str]:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise RemoteCodeError(f"the source of {module} is not available (found {spec and spec.origin!r}).")
    with open(spec.origin, encoding="utf-8") as f:
        return spec.origin, f.read()


def _is_pkm_import(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        return any(a.name == "pkm" or a.name.startswith("pkm.") for a in node.names)
    if isinstance(node, ast.ImportFrom):
        return node.level == 0 and node.module is not None and (node.module == "pkm" or node.module.startswith("pkm."))
    return False


def _first_line(node: ast.AST) -> int:
    """0-based first line of a statement, decorators included."""
    decorators = getattr(node, "decorator_list", [])
    return min([node.lineno] + [d.lineno for d in decorators]) - 1


def _is_switch_test(test: ast.expr) -> bool:
    return isinstance(test, ast.Call) and isinstance(test.func, ast.Name) and test.func.id in _KERNEL_SWITCHES


class _Module:
    """One package module's statements for a generated file."""

    def __init__(self, module: str) -> None:
        self.module = module
        path, self.text = _module_source(module)
        self.lines = self.text.splitlines()
        self.tree = ast.parse(self.text, path)
        self.imports: list[str] = []  # non-pkm top-level imports, as source text
        self.pkm_names: dict[str, list[str]] = {}  # pkm module -> names this module imports from it
        self.blocks: list[tuple[str, bool]] = []  # the kept statements as source text, and "is a def/class"
        self.defined: set[str] = set()
        self.dropped: set[str] = set()  # top-level functions left out (kernel-only)
        self._split()

    def _split(self) -> None:
        body = self.tree.body
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
            body = body[1:]  # the module docstring: the generated file has its own
        for node in body:
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            if _is_pkm_import(node):
                if isinstance(node, ast.Import):
                    raise RemoteCodeError(f"{self.module}: `{ast.unparse(node)}`: only `from pkm.x import names` "
                                          f"can be resolved in the remote code.")
                self.pkm_names.setdefault(node.module, []).extend(a.asname or a.name for a in node.names)
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                self.imports.append(ast.unparse(node))
                continue
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
                continue
            if isinstance(node, ast.FunctionDef) and node.name in _KERNEL_SWITCHES:
                args = [a.arg for a in node.args.args]
                if args != ["tensor", "flag"]:
                    raise RemoteCodeError(f"{self.module}.{node.name} takes {args}; the remote stub takes "
                                          f"(tensor, flag): update pkm.remote_code.")
                self.blocks.append((_SWITCH_STUB.format(name=node.name), True))
                self.defined.add(node.name)
                continue
            text, pkm_left = self._statement_without_kernels(node)
            if pkm_left:
                if isinstance(node, ast.FunctionDef):
                    self.dropped.add(node.name)  # serves the kernels only (checked: unused afterwards)
                    continue
                raise RemoteCodeError(f"{self.module} line {node.lineno}: imports pkm outside a kernel "
                                      f"branch; the remote code cannot hold it.")
            self.blocks.append((text, isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))))
            self.defined |= _top_level_names(node)

    def _statement_without_kernels(self, node: ast.stmt) -> tuple[str, bool]:
        """The statement's source with kernel branches and package-only methods cut out; and
        whether an import of pkm is left in it."""
        start, end = _first_line(node), node.end_lineno
        edits: list[tuple[int, int, list[str]]] = []  # (first line, end line, replacement), 0-based
        for sub in ast.walk(node):
            if isinstance(sub, ast.If) and _is_switch_test(sub.test):
                if sub.orelse and isinstance(sub.orelse[0], ast.If) and \
                        self.lines[sub.orelse[0].lineno - 1].lstrip().startswith("elif"):
                    raise RemoteCodeError(f"{self.module} line {sub.lineno}: an elif after a kernel switch; "
                                          f"write it as if/else.")
                keep: list[str] = []
                if sub.orelse:
                    shift = sub.orelse[0].col_offset - sub.col_offset
                    for line in self.lines[_first_line(sub.orelse[0]):sub.end_lineno]:
                        keep.append(line[shift:] if line[:shift].strip() == "" else line.lstrip())
                edits.append((sub.lineno - 1, sub.end_lineno, keep))
            elif isinstance(sub, ast.ClassDef):
                for item in sub.body:
                    if isinstance(item, ast.FunctionDef) and item.name in _PACKAGE_ONLY_METHODS:
                        edits.append((_first_line(item), item.end_lineno, []))
        removed = [(a, b) for a, b, _ in edits]
        pkm_left = any(
            _is_pkm_import(sub) and not any(a <= sub.lineno - 1 < b for a, b in removed) for sub in ast.walk(node)
        )
        lines = self.lines[start:end]
        for a, b, keep in sorted(edits, key=lambda e: e[0], reverse=True):
            if any(a2 < a and b <= b2 for a2, b2 in removed):
                continue  # inside a region cut out already
            lines[a - start:b - start] = keep
        return "\n".join(lines) + "\n", pkm_left


def _top_level_names(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    return {t.id for t in targets if isinstance(t, ast.Name)}


def _generate(file_name: str, modules: tuple[str, ...], elsewhere: dict[str, str]) -> str:
    """One generated file from ``modules``; ``elsewhere``: pkm module -> the generated file that
    holds it (for the relative imports)."""
    parts = [_Module(m) for m in modules]
    imports: list[str] = []
    relative: dict[str, list[str]] = {}
    for part in parts:
        imports += [i for i in part.imports if i not in imports]
        for module, names in part.pkm_names.items():
            if module in modules:
                continue
            if module not in elsewhere:
                raise RemoteCodeError(f"{part.module} imports {module}, which the remote code does not hold.")
            target = relative.setdefault(elsewhere[module], [])
            target += [n for n in names if n not in target]
    seen: dict[str, str] = {}
    for part in parts:
        for name in part.defined:
            if name in seen:
                raise RemoteCodeError(f"{name} is defined in both {seen[name]} and {part.module}; "
                                      f"{file_name} holds both.")
            seen[name] = part.module
    sources = ", ".join(f"pkm/{m.split('.')[-1]}.py" for m in modules)
    out = [
        f'"""Generated by pkm.remote_code (pkm-bert) from {sources}:\n'
        f'the pure-torch path only, no import of pkm, for ``from_pretrained(folder, trust_remote_code=True)``.\n'
        f'Do not edit; a BertPkm model\'s ``save_pretrained(folder)`` writes it again."""\n',
        "from __future__ import annotations\n",
        "\n".join(imports) + "\n",
    ]
    for target, names in relative.items():
        out.append(f"from .{os.path.splitext(target)[0]} import {', '.join(names)}\n")
    for part in parts:
        out.append(f"\n# {'-' * 96}\n# from pkm/{part.module.split('.')[-1]}.py\n# {'-' * 96}\n\n")
        previous_is_def = False
        for i, (block, is_def) in enumerate(part.blocks):
            if i and (is_def or previous_is_def):
                out.append("\n\n")  # two blank lines around a def/class, as in the source
            out.append(block.rstrip("\n") + "\n")
            previous_is_def = is_def
    text = "".join(out)
    _check(file_name, text, {name for part in parts for name in part.dropped})
    return text


def _check(file_name: str, text: str, dropped: set[str]) -> None:
    tree = ast.parse(text, file_name)
    compile(tree, file_name, "exec")
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            bad = [n for n in names if n.split(".")[0] in ("pkm", "triton") and getattr(node, "level", 0) == 0]
            if bad:
                raise RemoteCodeError(f"{file_name} line {node.lineno} still imports {bad}.")
        if isinstance(node, ast.Name) and node.id in dropped:
            raise RemoteCodeError(f"{file_name} line {node.lineno} uses {node.id}, which was left out as "
                                  f"kernel-only code.")


def remote_code_sources() -> dict[str, str]:
    """{file name: generated source} for the two remote-code files."""
    holder = {m: name for name, modules in _FILES.items() for m in modules}
    return {name: _generate(name, modules, holder) for name, modules in _FILES.items()}


def write_remote_code(folder: str | os.PathLike) -> None:
    """Write the remote-code files into a saved model folder and its config.json's ``auto_map``."""
    folder = os.fspath(folder)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{folder} has no config.json: save the model there first.")
    for name, text in remote_code_sources().items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(text)
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["auto_map"] = auto_map()
    with open(config_path, "w", encoding="utf-8") as f:  # transformers' own layout
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
