"""Write calibrated `router.thresholds`, `router.escalation` and the gate's risk calibration
(`router.escalation.calibration`) into topology YAML text.

The edit is surgical: the file is composed with marks and only the thresholds list, the
escalation values and the calibration block are replaced, so every other line, comments
included, stays as it was; comments inside the old thresholds list or calibration are lost.
The result is re-parsed and must equal the intended topology; if it does not (an unusual
layout), the whole file is re-dumped from its data, which loses all comments
(`UpdatedText.kept_comments` says which happened).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

import yaml

from ruyiflow.cluster.calibration import Calibration
from ruyiflow.cluster.router_spec import EscalationSpec, Threshold
from ruyiflow.cluster.topology import Topology
from ruyiflow.cluster.topology_yaml import parse_topology
from ruyiflow.engine.errors import RuyiflowError


def format_scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)  # strings quoted: a name like "123" must stay a string


def threshold_fields(threshold: Threshold) -> dict[str, object]:
    """The entry as YAML would spell it: `below` (omitted when infinite), `exit`, then any other
    field that differs from its default (e.g. `model`)."""
    out: dict[str, object] = {}
    if math.isfinite(threshold.below):
        out["below"] = threshold.below
    out["exit"] = threshold.exit
    for f in dataclasses.fields(threshold):
        value = getattr(threshold, f.name)
        if f.name not in ("below", "exit") and value != f.default:
            out[f.name] = value
    return out


def flow_mapping(fields: dict[str, object]) -> str:
    return "{" + ", ".join(f"{k}: {format_scalar(v)}" for k, v in fields.items()) + "}"


def escalation_fields(spec: EscalationSpec) -> dict[str, object]:
    return {"enabled": spec.enabled, "window": spec.window, "threshold": spec.threshold}


def calibration_lines(calibration: Calibration) -> list[str]:
    """The calibration as block YAML lines (relative indentation, exits in flow style)."""
    lines = []
    for f in dataclasses.fields(calibration):
        value = getattr(calibration, f.name)
        if f.name == "exits":
            lines.append("exits:")
            for entry in value:
                fields = {"exit": entry.exit, "measure": entry.measure}
                fields["threshold"] = entry.threshold
                if entry.probe is not None:
                    fields["probe"] = entry.probe
                lines.append(f"  - {flow_mapping(fields)}")
        elif value is not None or f.default is dataclasses.MISSING:
            lines.append(f"{f.name}: {format_scalar(value)}")
    return lines


def calibration_data(calibration: Calibration) -> dict[str, object]:
    return yaml.safe_load("\n".join(calibration_lines(calibration)))


@dataclass(frozen=True)
class RouterUpdate:
    """What calibration changes under `router:` (None: left as it is); `scalars` are other
    plain router fields (e.g. `target_cloud_share`, where the topology has that field)."""

    thresholds: tuple[Threshold, ...] | None
    escalation: EscalationSpec | None = None
    scalars: dict[str, object] = field(default_factory=dict)
    calibration: Calibration | None = None


def fragment(update: RouterUpdate) -> str:
    """The YAML fragment of the calibrated router settings (what `--write` puts in the file)."""
    lines = ["router:"]
    lines += [f"  {k}: {format_scalar(v)}" for k, v in update.scalars.items()]
    if update.thresholds is not None:
        lines.append("  thresholds:")
        lines += [f"    - {flow_mapping(threshold_fields(t))}" for t in update.thresholds]
    if update.escalation is not None or update.calibration is not None:
        lines.append("  escalation:")
    if update.escalation is not None:
        fields = escalation_fields(update.escalation)
        lines += [f"    {k}: {format_scalar(v)}" for k, v in fields.items()]
    if update.calibration is not None:
        lines.append("    calibration:")
        lines += [f"      {line}" for line in calibration_lines(update.calibration)]
    return "\n".join(lines) + "\n"


def _key(mapping: yaml.MappingNode, name: str) -> tuple[yaml.Node, yaml.Node] | None:
    for key, value in mapping.value:
        if isinstance(key, yaml.ScalarNode) and key.value == name:
            return key, value
    return None


def _end_of_content(text: str, index: int) -> int:
    """Back over trailing whitespace: block nodes end where the next token starts."""
    while index > 0 and text[index - 1] in " \t\r\n":
        index -= 1
    return index


def _end_of_line(text: str, index: int) -> int:
    newline = text.find("\n", index)
    return len(text) if newline < 0 else newline


def _scalar_edit(text: str, node: yaml.Node, replacement: str) -> tuple[int, int, str]:
    """Replace a scalar, keeping a trailing comment in its column where there is room."""
    start, end = node.start_mark.index, node.end_mark.index
    gap_end = end
    while gap_end < len(text) and text[gap_end] in " \t":
        gap_end += 1
    if gap_end < len(text) and text[gap_end] == "#" and gap_end > end:
        width = gap_end - start  # value plus the spaces before the comment
        return start, gap_end, replacement.ljust(width - 1) + " "
    return start, end, replacement


def surgical_edit(text: str, update: RouterUpdate) -> str:
    """`text` with the thresholds list, escalation values and router scalars replaced in place
    (missing keys are added after the thresholds list)."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    router = _key(root, "router")[1]
    thresholds_key, node = _key(router, "thresholds")
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement), applied last first
    start = node.start_mark.index
    if node.flow_style:
        end = node.end_mark.index
    else:
        end = _end_of_content(text, node.value[-1].end_mark.index)
    if update.thresholds is not None:
        items = [flow_mapping(threshold_fields(t)) for t in update.thresholds]
        if node.flow_style:
            edits.append((start, end, "[" + ", ".join(items) + "]"))
        else:
            indent = "\n" + " " * node.start_mark.column
            edits.append((start, end, indent.join(f"- {item}" for item in items)))
    after_thresholds = _end_of_line(text, end)
    router_indent = "\n" + " " * thresholds_key.start_mark.column
    for name, value in update.scalars.items():
        found = _key(router, name)
        if found is None:
            line = f"{router_indent}{name}: {format_scalar(value)}"
            edits.append((after_thresholds, after_thresholds, line))
        else:
            edits.append(_scalar_edit(text, found[1], format_scalar(value)))
    if update.escalation is not None:
        wanted = escalation_fields(update.escalation)
        found = _key(router, "escalation")
        if found is None:
            line = f"{router_indent}escalation: {flow_mapping(wanted)}"
            edits.append((after_thresholds, after_thresholds, line))
        elif found[1].flow_style or not isinstance(found[1], yaml.MappingNode):
            edits.append((found[1].start_mark.index, found[1].end_mark.index, flow_mapping(wanted)))
        else:
            mapping = found[1]
            for name, value in wanted.items():
                entry = _key(mapping, name)
                if entry is not None:
                    edits.append(_scalar_edit(text, entry[1], format_scalar(value)))
                else:
                    at = _end_of_line(text, _end_of_content(text, mapping.end_mark.index))
                    column = mapping.value[0][0].start_mark.column
                    edits.append((at, at, "\n" + " " * column + f"{name}: {format_scalar(value)}"))
    if update.calibration is not None:
        edits.append(_calibration_edit(text, router, router_indent, after_thresholds, update))
    for start, end, replacement in sorted(edits, key=lambda e: e[0], reverse=True):
        text = text[:start] + replacement + text[end:]
    return text


def _calibration_edit(
    text: str, router: yaml.MappingNode, router_indent: str, anchor: int, update: RouterUpdate
) -> tuple[int, int, str]:
    """Replace (or add) `calibration:` under a block-style `router.escalation`."""
    found = _key(router, "escalation")
    if found is None:  # a new escalation mapping holding only the calibration
        lines = ["escalation:", "  calibration:"]
        lines += [f"    {line}" for line in calibration_lines(update.calibration)]
        return anchor, anchor, router_indent + router_indent.join(lines)
    mapping = found[1]
    if not isinstance(mapping, yaml.MappingNode) or mapping.flow_style or not mapping.value:
        raise ValueError("escalation is not a block mapping")  # redumped instead
    entry = _key(mapping, "calibration")
    column = mapping.value[0][0].start_mark.column
    if entry is None:
        at = _end_of_line(text, _end_of_content(text, mapping.end_mark.index))
        lines = ["calibration:"] + [f"  {line}" for line in calibration_lines(update.calibration)]
        return at, at, "".join("\n" + " " * column + line for line in lines)
    key, value = entry
    body = "".join(
        "\n" + " " * (column + 2) + line for line in calibration_lines(update.calibration)
    )
    if value.start_mark.line == key.start_mark.line:  # `calibration: null` or a flow mapping
        start = text.index(":", key.end_mark.index) + 1
        return start, value.end_mark.index, body
    # a block mapping: keep the key's line (and any comment on it), replace what follows
    return _end_of_line(text, key.end_mark.index), _end_of_content(text, value.end_mark.index), body


def redumped(text: str, update: RouterUpdate) -> str:
    """`text`'s data re-dumped with the new settings (comments lost)."""
    data = yaml.safe_load(text)
    data["router"].update(update.scalars)
    if update.thresholds is not None:
        data["router"]["thresholds"] = [threshold_fields(t) for t in update.thresholds]
    escalation = data["router"].get("escalation") or {}
    if update.escalation is not None:
        escalation.update(escalation_fields(update.escalation))
    if update.calibration is not None:
        escalation["calibration"] = calibration_data(update.calibration)
    if escalation:
        data["router"]["escalation"] = escalation
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


@dataclass(frozen=True)
class UpdatedText:
    text: str
    kept_comments: bool


def updated_topology(topology: Topology, update: RouterUpdate) -> Topology:
    """`topology` with the update applied (validated by the dataclasses)."""
    router = dataclasses.replace(topology.router, **update.scalars)
    if update.thresholds is not None:
        router = dataclasses.replace(router, thresholds=update.thresholds)
    escalation = update.escalation or router.escalation
    if update.escalation is not None and update.calibration is None:  # the old one stays
        escalation = dataclasses.replace(escalation, calibration=router.escalation.calibration)
    if update.calibration is not None:
        escalation = dataclasses.replace(escalation, calibration=update.calibration)
    router = dataclasses.replace(router, escalation=escalation)
    return dataclasses.replace(topology, router=router)


def update_topology_text(text: str, topology: Topology, update: RouterUpdate) -> UpdatedText:
    """New YAML text for `topology` (parsed from `text`) with the calibrated settings; the
    result is verified by parsing it back."""
    expected = updated_topology(topology, update)
    for kept_comments, edit in ((True, surgical_edit), (False, redumped)):
        try:
            new_text = edit(text, update)
            if parse_topology(new_text) == expected:
                return UpdatedText(new_text, kept_comments)
        except (ValueError, TypeError, KeyError, AttributeError, yaml.YAMLError):
            continue  # an unusual layout: try the next way
    raise RuyiflowError("could not write the calibrated settings into the topology file")
