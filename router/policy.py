"""Routing policy, pure Python and model-free: score → (tier, exit), per-request overrides, node
choice by health and load, escalation targets, and the handoff cost model of DESIGN.md. With a
calibrated confidence gate (`router.escalation.calibration`), a request the thresholds send to
an exit where nothing was certified starts at the next certified exit (else the deepest): the
gate there would only move it on after computing its prompt.

The router's request path reads: `plan = plan_route(topology, score, overrides)` →
`node = pick_node(loads_of(plan.candidates), rng)` → stream; on a HANDOFF chunk,
`plan_escalation(...)` → `pick_node(...)` → `choose_handoff_mode(...)` → move the state.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from ruyiflow.cluster.errors import (
    InvalidRequest,
    ModelMismatch,
    NodeUnavailable,
    Overloaded,
    RetryLater,
)
from ruyiflow.cluster.router_spec import HANDOFF_MODES, Threshold
from ruyiflow.cluster.topology import TIERS, Topology

RETRY_AFTER_S = 1.0  # the hint when every node that could serve a request is full

TOKEN_ID_BYTES = 4  # `tokens` mode sends uint32 ids


@dataclass(frozen=True)
class Overrides:
    """Per-request routing overrides (proto `Overrides`); None = let the policy decide."""

    exit: int | None = None
    tier: str | None = None
    node: str | None = None
    handoff_mode: str | None = None  # auto | hidden | tokens

    def __post_init__(self) -> None:
        if self.tier is not None and self.tier not in TIERS:
            raise InvalidRequest(f"unknown tier {self.tier!r}; tiers: {', '.join(TIERS)}")
        if self.handoff_mode is not None and self.handoff_mode not in HANDOFF_MODES:
            raise InvalidRequest(
                f"unknown handoff mode {self.handoff_mode!r}; modes: {', '.join(HANDOFF_MODES)}"
            )


NO_OVERRIDES = Overrides()


@dataclass(frozen=True)
class RoutePlan:
    """Where a request goes: the model, tier and exit, and the nodes that can serve it."""

    model: str
    tier: str
    exit: int
    candidates: tuple[str, ...]  # node names, topology order
    scored_exit: int | None = None  # the thresholds' exit, when the calibration skipped it


def threshold_for(score: float, thresholds: Sequence[Threshold]) -> Threshold:
    """The first threshold with `score < below` (the last one catches the rest)."""
    if not 0.0 <= score <= 1.0:
        raise ValueError(f"difficulty score {score} is outside [0, 1]")
    for threshold in thresholds:
        if score < threshold.below:
            return threshold
    return thresholds[-1]


def threshold_exit(score: float, thresholds: Sequence[Threshold]) -> int:
    """The exit of the threshold `score` falls in."""
    return threshold_for(score, thresholds).exit


def choose_exit(
    score: float,
    thresholds: Sequence[Threshold],
    overrides: Overrides,
    served: Mapping[int, Sequence[str]],
) -> tuple[str, int]:
    """(tier, exit) for a request. `served` maps each served exit to the tiers serving it,
    shallow tier first (`Topology.exit_tiers`). An exit override wins; a tier override picks that
    tier's exit closest to the thresholds' choice (ties: the deeper one); with no override the
    thresholds' exit is used (or the closest served one) on the shallowest tier serving it."""
    if overrides.exit is not None:
        exit_ = overrides.exit
        if exit_ not in served:
            raise InvalidRequest(f"unknown exit {exit_}; served exits: {sorted(served)}")
        tiers = served[exit_]
        if overrides.tier is not None and overrides.tier not in tiers:
            raise InvalidRequest(f"exit {exit_} is not served on tier {overrides.tier!r}")
        return overrides.tier or tiers[0], exit_
    wanted = threshold_exit(score, thresholds)
    exits = [e for e, tiers in served.items() if overrides.tier in (None, *tiers)]
    if not exits:
        raise InvalidRequest(f"no node on tier {overrides.tier!r} serves this model")
    exit_ = min(exits, key=lambda e: (abs(e - wanted), -e))
    return overrides.tier or served[exit_][0], exit_


def plan_route(
    topology: Topology,
    score: float,
    overrides: Overrides = NO_OVERRIDES,
    across_models: bool = True,
) -> RoutePlan:
    """Apply thresholds and overrides to the topology; raises InvalidRequest on unknown
    exit/tier/node or an impossible combination. `across_models=False` (a prompt of token ids)
    keeps the request on the routed model even where a threshold names another."""
    thresholds = topology.router.thresholds
    if overrides.node is not None:
        try:
            node = topology.node(overrides.node)
        except KeyError:
            names = ", ".join(n.name for n in topology.nodes)
            raise InvalidRequest(f"unknown node {overrides.node!r}; nodes: {names}") from None
        if overrides.tier is not None and overrides.tier != node.tier:
            raise InvalidRequest(
                f"node {node.name!r} is on tier {node.tier!r}, not {overrides.tier!r}"
            )
        if overrides.exit is not None and overrides.exit not in node.exits:
            raise InvalidRequest(f"node {node.name!r} does not serve exit {overrides.exit}")
        served = {e: (node.tier,) for e in node.exits}
        tier, exit_ = choose_exit(score, thresholds, overrides, served)
        return RoutePlan(node.model, tier, exit_, (node.name,))
    model = topology.routed_model
    if overrides.exit is None and across_models:
        # A threshold may name another model (the hardest scores -> an MoE cloud node); a tier
        # override that model has no node on keeps the request on the routed model.
        wanted = topology.threshold_model(threshold_for(score, thresholds))
        tiers = {t for ts in topology.exit_tiers(wanted).values() for t in ts}
        if overrides.tier is None or overrides.tier in tiers:
            model = wanted
    tier, exit_ = choose_exit(score, thresholds, overrides, topology.exit_tiers(model))
    scored = None
    if overrides.exit is None:
        start = gate_start_exit(topology, model, exit_)
        tiers = topology.exit_tiers(model).get(start, ())
        if start != exit_ and overrides.tier in (None, *tiers):
            scored, exit_, tier = exit_, start, overrides.tier or tiers[0]
    names = tuple(n.name for n in topology.nodes_serving(model, exit_, tier))
    return RoutePlan(model, tier, exit_, names, scored)


def gate_start_exit(topology: Topology, model: str, exit_: int) -> int:
    """Where a request routed to `exit_` of `model` starts under the calibrated gate (itself
    without one): `Calibration.start_exit` over the exits the topology serves."""
    escalation = topology.router.escalation
    if escalation.calibration is None or not escalation.enabled or model != topology.routed_model:
        return exit_
    return escalation.calibration.start_exit(exit_, tuple(topology.exit_tiers(model)))


def escalation_exit(served_exits: Sequence[int], from_exit: int, suggested: int) -> int | None:
    """Exit to escalate to: `suggested` if served, else the shallowest served exit deeper than
    it, else the deepest served exit deeper than `from_exit`; None if nothing is deeper."""
    deeper = sorted(e for e in served_exits if e > from_exit)
    if not deeper:
        return None
    at_least = [e for e in deeper if e >= suggested]
    return at_least[0] if at_least else deeper[-1]


def plan_escalation(
    topology: Topology, model: str, from_exit: int, suggested: int
) -> RoutePlan | None:
    """Destination of an escalation within `model` (same weights, so `hidden` stays possible);
    None when no deeper exit is served. Candidates may include the source node."""
    tiers = topology.exit_tiers(model)
    exit_ = escalation_exit(list(tiers), from_exit, suggested)
    if exit_ is None:
        return None
    names = tuple(n.name for n in topology.nodes_serving(model, exit_))
    return RoutePlan(model, tiers[exit_][0], exit_, names)


def plan_escalation_across(topology: Topology, model: str) -> RoutePlan | None:
    """Where a request escalates when `model` serves nothing deeper: the model of the hardest
    threshold, when that is another model (e.g. Ruyi -> MoE). Only text crosses models."""
    hardest = topology.router.thresholds[-1]
    other = topology.threshold_model(hardest)
    if other == model:
        return None
    tiers = topology.exit_tiers(other)
    names = tuple(n.name for n in topology.nodes_serving(other, hardest.exit))
    return RoutePlan(other, tiers[hardest.exit][0], hardest.exit, names)


@dataclass(frozen=True)
class NodeLoad:
    """What the router knows about a node now (health checks + `Node.Info`)."""

    name: str
    healthy: bool = True
    draining: bool = False
    running: int = 0
    queued: int = 0
    outstanding_tokens: int = 0
    capacity: int | None = None  # streams it takes at once (batch + queue); None: unbounded
    batch: int | None = None  # streams it runs at once
    streams: int | None = None  # streams running or queued (None: running + queued)

    @property
    def is_available(self) -> bool:
        return self.healthy and not self.draining

    @property
    def num_streams(self) -> int:
        return self.running + self.queued if self.streams is None else self.streams

    @property
    def is_full(self) -> bool:
        """No room: the node would refuse another stream."""
        return self.capacity is not None and self.num_streams >= self.capacity

    @property
    def is_busy(self) -> bool:
        """A whole batch already waits behind the running one."""
        return self.batch is not None and self.num_streams >= 2 * self.batch

    def work_key(self) -> tuple[int, int, int, str]:
        """Ordering by outstanding work; the name makes ties deterministic."""
        return (self.outstanding_tokens, self.queued, self.running, self.name)


def choose_placement(
    order: Sequence[tuple[int, Sequence[NodeLoad]]], rng: random.Random
) -> tuple[int, NodeLoad]:
    """(exit, node) for a new request from `placement_order`'s entries with their loads: the
    first entry with an available node that is not busy, else the first with one that is not
    full. RetryLater (RESOURCE_EXHAUSTED) when every available node is full, NodeUnavailable
    when none is available."""
    fallback = None
    any_available = False
    for exit_, loads in order:
        available = [n for n in loads if n.is_available]
        any_available = any_available or bool(available)
        free = [n for n in available if not n.is_full]
        idle = [n for n in free if not n.is_busy]
        if idle:
            return exit_, pick_node(idle, rng)
        if free and fallback is None:
            fallback = exit_, pick_node(free, rng)
    if fallback is not None:
        return fallback
    if any_available:
        raise RetryLater(
            "every node that serves this exit or a deeper one is full; retry shortly",
            RETRY_AFTER_S,
        )
    raise NodeUnavailable("no healthy node serves this exit or a deeper one")


def placement_order(topology: Topology, plan: RoutePlan) -> list[tuple[int, tuple[str, ...]]]:
    """Where a request may start, best first: the plan's nodes, then other nodes serving the
    plan's exit, then nodes serving deeper exits of the same model, shallowest first (a full
    or down node sends a request deeper, never shallower: quality is not traded for load)."""
    order = [(plan.exit, plan.candidates)]
    others = tuple(
        n.name
        for n in topology.nodes_serving(plan.model, plan.exit)
        if n.name not in plan.candidates
    )
    if others:
        order.append((plan.exit, others))
    for exit_ in topology.exit_tiers(plan.model):
        if exit_ > plan.exit:
            order.append((exit_, tuple(n.name for n in topology.nodes_serving(plan.model, exit_))))
    return order


def pick_node(
    candidates: Sequence[NodeLoad], rng: random.Random, max_queued: int | None = None
) -> NodeLoad:
    """Power of two random choices: sample two available nodes, keep the one with less
    outstanding work. Unhealthy or draining nodes are never chosen (NodeUnavailable if none is
    left); nodes with `queued >= max_queued` are skipped (Overloaded if all are)."""
    available = [c for c in candidates if c.is_available]
    if not available:
        names = ", ".join(c.name for c in candidates) or "none"
        raise NodeUnavailable(f"no healthy node available (candidates: {names})")
    if max_queued is not None:
        available = [c for c in available if c.queued < max_queued]
        if not available:
            raise Overloaded(f"every candidate node has {max_queued} or more queued requests")
    if len(available) == 1:
        return available[0]
    first, second = rng.sample(available, 2)
    return min(first, second, key=NodeLoad.work_key)


@dataclass(frozen=True)
class ModeCost:
    """Estimated cost of one handoff mode."""

    num_bytes: int
    transfer_s: float  # RTT + bytes / bandwidth
    compute_s: float  # destination prefill work before the next token

    @property
    def total_s(self) -> float:
        return self.transfer_s + self.compute_s


@dataclass(frozen=True)
class HandoffDecision:
    """The chosen mode and both estimates (hidden is None across models), for logs/metrics."""

    mode: str  # "hidden" | "tokens"
    tokens: ModeCost
    hidden: ModeCost | None
    is_forced: bool

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def hidden_state_bytes(
    num_tokens: int,
    hidden_size: int,
    trunk_layers: int,
    kv_heads: int,
    head_dim: int,
    dtype_bytes: int,
) -> int:
    """Bytes of a `hidden` state: per token the boundary hidden state plus K and V of every
    trunk layer: T × (hidden + 2 × trunk_layers × kv_heads × head_dim) × dtype_bytes."""
    per_token = hidden_size + 2 * trunk_layers * kv_heads * head_dim
    return num_tokens * per_token * dtype_bytes


def choose_handoff_mode(
    num_tokens: int,
    hidden_size: int,
    trunk_layers: int,
    kv_heads: int,
    head_dim: int,
    dtype_bytes: int,
    bandwidth_bytes_per_s: float,
    rtt_ms: float,
    dest_prefill_tokens_per_s: float,
    same_model: bool,
    *,
    dest_layers: int,
    requested: str = "auto",
) -> HandoffDecision:
    """Pick `hidden` or `tokens` for moving a request of `num_tokens` context (DESIGN.md).

    `trunk_layers` is the source exit e (layers 0..e-1 whose KV is sent); `dest_layers` is how
    many layers the destination exit e' runs (e' trunk layers + its branch layer = e' + 1), and
    `dest_prefill_tokens_per_s` its measured prefill speed over all of them. `hidden` sends the
    state and the destination computes only its layers from e; `tokens` sends 4T bytes and the
    destination prefills all `dest_layers`. Across models only `tokens` is valid: requesting
    `hidden` raises ModelMismatch. `auto` takes the lower estimated total (ties: tokens).
    """
    if requested not in HANDOFF_MODES:
        raise InvalidRequest(f"unknown handoff mode {requested!r}")
    if dest_prefill_tokens_per_s <= 0 or bandwidth_bytes_per_s <= 0:
        raise ValueError("prefill speed and bandwidth must be positive")
    if not 0 <= trunk_layers < dest_layers:
        raise ValueError(f"trunk_layers {trunk_layers} must be below dest_layers {dest_layers}")
    rtt_s = rtt_ms / 1000.0
    prefill_s = num_tokens / dest_prefill_tokens_per_s

    def cost(num_bytes: int, layer_fraction: float) -> ModeCost:
        transfer_s = rtt_s + (
            0.0 if math.isinf(bandwidth_bytes_per_s) else num_bytes / bandwidth_bytes_per_s
        )
        return ModeCost(num_bytes, transfer_s, prefill_s * layer_fraction)

    tokens = cost(TOKEN_ID_BYTES * num_tokens, 1.0)
    if not same_model:
        if requested == "hidden":
            raise ModelMismatch("`hidden` handoff needs the same model on both nodes; use tokens")
        return HandoffDecision("tokens", tokens, None, is_forced=requested == "tokens")
    num_bytes = hidden_state_bytes(
        num_tokens, hidden_size, trunk_layers, kv_heads, head_dim, dtype_bytes
    )
    hidden = cost(num_bytes, (dest_layers - trunk_layers) / dest_layers)
    if requested != "auto":
        return HandoffDecision(requested, tokens, hidden, is_forced=True)
    mode = "hidden" if hidden.total_s < tokens.total_s else "tokens"
    return HandoffDecision(mode, tokens, hidden, is_forced=False)
