"""Load topology.yaml into `router.topology.Topology`, reporting errors with file positions.

The file is composed (`yaml.SafeLoader`, no Python tags) into a node tree that keeps marks; each
value is converted to the annotated field type of its dataclass, strictly (bool is not int,
unknown keys and duplicate keys are errors), recording the mark of every field path. Errors from
the dataclasses' own validation come back with a relative path, which is joined to the prefix
and mapped to a position: `topology.yaml:12:14: nodes[1].tier: 'fog' is not one of edge, cloud`.

Layout: `models` is a mapping name → ModelSpec fields; `nodes` and `links` are lists; `router` a
mapping. See the shipped topology.yaml.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ruyiflow.cluster.errors import TopologyError
from ruyiflow.cluster.node_spec import NodeSpec
from ruyiflow.cluster.router_spec import RouterSpec
from ruyiflow.cluster.topology import LinkSpec, ModelSpec, TlsSpec, Topology
from ruyiflow.cluster.units import parse_bandwidth

_TOP_KEYS = ("models", "nodes", "router", "links", "tls")
_PARSERS = {(LinkSpec, "bandwidth"): parse_bandwidth}  # fields that accept a string spelling
_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def load_topology(path: str | Path) -> Topology:
    """Read and validate the topology file at `path`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TopologyError(f"cannot read topology: {exc.strerror}", position=str(path)) from None
    return parse_topology(text, source=str(path))


def parse_topology(text: str, source: str = "<string>") -> Topology:
    """Validate topology YAML `text`; `source` names it in error positions."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark
            position = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
            raise TopologyError(f"invalid YAML: {exc.problem}", position=position) from None
        return _Builder(loader, source).topology(root)
    finally:
        loader.dispose()


class _Builder:
    """Converts composed YAML nodes to dataclasses, remembering each field path's mark."""

    def __init__(self, loader: yaml.SafeLoader, source: str) -> None:
        self.loader = loader
        self.source = source
        self.marks: dict[str, yaml.Mark] = {}

    def error(self, path: str, problem: str, node: yaml.Node | None = None) -> TopologyError:
        mark = node.start_mark if node is not None else self._mark_of(path)
        position = f"{self.source}:{mark.line + 1}:{mark.column + 1}" if mark else self.source
        return TopologyError(problem, path, position)

    def _mark_of(self, path: str) -> yaml.Mark | None:
        while path:  # nearest recorded ancestor: a.b[2].c → a.b[2] → a.b → a
            if path in self.marks:
                return self.marks[path]
            path = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", path)
        return self.marks.get("")

    def topology(self, root: yaml.Node | None) -> Topology:
        if root is None:
            raise TopologyError("empty topology file", position=self.source)
        top = self.mapping(root, "")
        for key in top:
            if key not in _TOP_KEYS:
                raise self.error(
                    key, f"unknown section; expected {', '.join(_TOP_KEYS)}", top[key][0]
                )
        for key in ("models", "nodes", "router"):
            if key not in top:
                raise self.error("", f"missing required section {key!r}")
        models = tuple(
            self.build(ModelSpec, value, f"models.{name}", name=name)
            for name, (_, value) in self.mapping(top["models"][1], "models").items()
        )
        nodes = self.build_list(NodeSpec, top["nodes"][1], "nodes")
        router = self.build(RouterSpec, top["router"][1], "router")
        links = self.build_list(LinkSpec, top["links"][1], "links") if "links" in top else ()
        tls = self.build(TlsSpec, top["tls"][1], "tls") if "tls" in top else None
        try:
            return Topology(models, nodes, router, links, source=self.source, tls=tls)
        except TopologyError as exc:
            raise self.error(exc.path, exc.problem) from None

    def mapping(self, node: yaml.Node, path: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """key → (key node, value node) of a mapping node; keys must be unique strings."""
        self.marks[path] = node.start_mark
        if not isinstance(node, yaml.MappingNode):
            raise self.error(path, "expected a mapping", node)
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.loader.construct_object(key_node)
            sub = f"{path}.{key}" if path else str(key)
            if not isinstance(key, str):
                raise self.error(sub, "keys must be strings", key_node)
            if key in out:
                raise self.error(sub, f"duplicate key {key!r}", key_node)
            out[key] = (key_node, value_node)
        return out

    def build(self, cls: type, node: yaml.Node, path: str, **given: Any) -> Any:
        """Dataclass `cls` from a mapping node; `given` fields come from elsewhere (e.g. keys)."""
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in given}
        values = dict(given)
        for key, (key_node, value_node) in self.mapping(node, path).items():
            if key not in fields:
                expected = ", ".join(fields)
                raise self.error(f"{path}.{key}", f"unknown field; expected {expected}", key_node)
            values[key] = self.convert(hints[key], value_node, f"{path}.{key}", (cls, key))
        for name, spec in fields.items():
            required = spec.default is dataclasses.MISSING
            if required and spec.default_factory is dataclasses.MISSING and name not in values:
                raise self.error(f"{path}.{name}", "missing required field", node)
        try:
            return cls(**values)
        except TopologyError as exc:
            raise self.error(f"{path}.{exc.path}" if exc.path else path, exc.problem) from None

    def build_list(self, cls: type, node: yaml.Node, path: str) -> tuple[Any, ...]:
        self.marks[path] = node.start_mark
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(path, "expected a list", node)
        return tuple(self.build(cls, item, f"{path}[{i}]") for i, item in enumerate(node.value))

    def convert(self, tp: Any, node: yaml.Node, path: str, owner: tuple[type, str]) -> Any:
        """Value of annotated type `tp` from `node`, strictly typed."""
        self.marks[path] = node.start_mark
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (types.UnionType, typing.Union):
            if node.tag == "tag:yaml.org,2002:null" and type(None) in args:
                return None
            (inner,) = [a for a in args if a is not type(None)]
            return self.convert(inner, node, path, owner)
        if dataclasses.is_dataclass(tp):
            return self.build(tp, node, path)
        if origin is tuple:
            if not isinstance(node, yaml.SequenceNode):
                raise self.error(path, "expected a list", node)
            items = node.value
            fixed = not (len(args) == 2 and args[1] is Ellipsis)
            if fixed and len(items) != len(args):
                raise self.error(path, f"expected a list of {len(args)} items", node)
            kinds = args if fixed else [args[0]] * len(items)
            return tuple(
                self.convert(k, item, f"{path}[{i}]", owner)
                for i, (k, item) in enumerate(zip(kinds, items, strict=True))
            )
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(path, f"expected {_TYPE_NAMES.get(tp, tp)}", node)
        value = self.loader.construct_object(node)
        parser = _PARSERS.get(owner)
        if parser is not None and isinstance(value, str):
            try:
                return parser(value)
            except TopologyError as exc:
                raise self.error(path, exc.problem, node) from None
        return self.scalar(tp, value, path, node)

    def scalar(self, tp: type, value: Any, path: str, node: yaml.Node) -> Any:
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if tp is float and is_number:
            return float(value)
        if type(value) is tp:
            return value
        got = "null" if value is None else f"{type(value).__name__} {value!r}"
        raise self.error(path, f"expected {_TYPE_NAMES.get(tp, tp)}, got {got}", node)
