"""One MoE decoder layer's weights from checkpoint keys (names as released, moe.md §1.4/§2.4/§3.4).

    attention  GQA: self_attn.{q,k,v,o}_proj (or Hunyuan's fused qkv_proj), per-head norms
               Hunyuan `query_layernorm`/`key_layernorm`, dots1 `q_norm`/`k_norm`
               MLA: self_attn.{q_a_proj, q_a_layernorm, q_b_proj | q_proj, kv_a_proj_with_mqa,
               kv_a_layernorm, kv_b_proj, o_proj}
    ffn        dense: mlp.{gate,up,down}_proj; MoE: router `mlp.gate.wg` (Hunyuan) or `mlp.gate`
               + `mlp.gate.e_score_correction_bias`, experts `mlp.experts.{e}.*`, shared
               `mlp.shared_mlp.*` (Hunyuan) or `mlp.shared_experts.*`

q/k/v and gate/up are fused at load (fewer, larger matmuls); router and correction bias stay
float32 (the routers run in fp32); DeepSeek's interleaved rope rows are de-interleaved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ruyiflow.engine.moe.attention import GQAWeights
from ruyiflow.engine.moe.config import MoEConfig
from ruyiflow.engine.moe.mla import MLAWeights
from ruyiflow.engine.moe.model import MoELayer
from ruyiflow.engine.moe.moe_block import DenseFFN, MoEFFN, Routing
from ruyiflow.engine.moe.rope import deinterleave_rows

if TYPE_CHECKING:
    from ruyiflow.engine.weights import KeyReader


def _gate_up(keys: KeyReader, prefix: str, inter: int, hidden: int) -> torch.Tensor:
    """[2I, hidden], gate rows first. Some Hunyuan checkpoints fuse `gate_and_up_proj` with the
    rows the other way round, [up; gate] (moe.md §1.4)."""
    fused = f"{prefix}.gate_and_up_proj.weight"
    if keys.has(fused):
        up_gate = keys.take(fused, (2 * inter, hidden))
        return torch.cat([up_gate[inter:], up_gate[:inter]])
    return torch.cat(
        [
            keys.take(f"{prefix}.gate_proj.weight", (inter, hidden)),
            keys.take(f"{prefix}.up_proj.weight", (inter, hidden)),
        ]
    )


def _dense(keys: KeyReader, prefix: str, inter: int, hidden: int) -> DenseFFN:
    return DenseFFN(
        _gate_up(keys, prefix, inter, hidden),
        keys.take(f"{prefix}.down_proj.weight", (hidden, inter)),
    )


def _gqa(keys: KeyReader, att: str, c: MoEConfig) -> GQAWeights:
    hid, d = c.hidden_size, c.head_dim
    q_rows, kv_rows = c.num_heads * d, c.num_kv_heads * d
    if keys.has(f"{att}.qkv_proj.weight"):
        # Hunyuan fused layout: per KV head, its q heads then its k and its v head
        group = c.num_heads // c.num_kv_heads
        qkv = keys.take(f"{att}.qkv_proj.weight", (q_rows + 2 * kv_rows, hid))
        qkv = qkv.view(c.num_kv_heads, group + 2, d, hid)
        w_qkv = torch.cat(
            [
                qkv[:, :group].reshape(q_rows, hid),
                qkv[:, group].reshape(kv_rows, hid),
                qkv[:, group + 1].reshape(kv_rows, hid),
            ]
        )
    else:
        w_qkv = torch.cat(
            [
                keys.take(f"{att}.q_proj.weight", (q_rows, hid)),
                keys.take(f"{att}.k_proj.weight", (kv_rows, hid)),
                keys.take(f"{att}.v_proj.weight", (kv_rows, hid)),
            ]
        )
    q_norm = k_norm = None
    if c.qk_norm != "none":
        q_name, k_name = (
            ("query_layernorm", "key_layernorm")
            if c.family == "hunyuan_v1_moe"
            else ("q_norm", "k_norm")
        )
        q_norm = keys.take(f"{att}.{q_name}.weight", (d,))
        k_norm = keys.take(f"{att}.{k_name}.weight", (d,))
    return GQAWeights(w_qkv, keys.take(f"{att}.o_proj.weight", (hid, q_rows)), q_norm, k_norm)


def _mla(keys: KeyReader, att: str, c: MoEConfig) -> MLAWeights:
    m, hid, heads = c.mla, c.hidden_size, c.num_heads
    q_out = heads * m.qk_head_dim
    kv_a = keys.take(f"{att}.kv_a_proj_with_mqa.weight", (m.latent_dim, hid))
    if m.q_lora_rank is None:
        q_in, w_qb, q_norm = keys.take(f"{att}.q_proj.weight", (q_out, hid)), None, None
    else:
        q_in = keys.take(f"{att}.q_a_proj.weight", (m.q_lora_rank, hid))
        q_norm = keys.take(f"{att}.q_a_layernorm.weight", (m.q_lora_rank,))
        w_qb = keys.take(f"{att}.q_b_proj.weight", (q_out, m.q_lora_rank))
    if c.rope.interleaved:
        kv_a = deinterleave_rows(kv_a, 1, m.qk_rope_head_dim)
        if w_qb is not None:
            w_qb = deinterleave_rows(w_qb, heads, m.qk_rope_head_dim)
        else:
            q_in = deinterleave_rows(q_in, heads, m.qk_rope_head_dim)
    return MLAWeights(
        w_in=torch.cat([q_in, kv_a]),
        q_norm=q_norm,
        w_qb=w_qb,
        kv_norm=keys.take(f"{att}.kv_a_layernorm.weight", (m.kv_lora_rank,)),
        w_kvb=keys.take(
            f"{att}.kv_b_proj.weight", (heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)
        ),
        w_o=keys.take(f"{att}.o_proj.weight", (hid, heads * m.v_head_dim)),
    )


def _moe(keys: KeyReader, mlp: str, c: MoEConfig) -> MoEFFN:
    hid, inter, num = c.hidden_size, c.moe_intermediate_size, c.num_experts
    shared_inter = c.shared_intermediate_size
    slots = shared_inter // inter if shared_inter % inter == 0 else 0  # shared as expert slices
    w_gate_up = torch.empty(num + slots, 2 * inter, hid, dtype=keys.dtype, device=keys.device)
    w_down = torch.empty(num + slots, hid, inter, dtype=keys.dtype, device=keys.device)
    if keys.has(f"{mlp}.experts.gate_up_proj"):  # transformers-5 in-memory layout
        w_gate_up[:num] = keys.take(f"{mlp}.experts.gate_up_proj", (num, 2 * inter, hid))
        w_down[:num] = keys.take(f"{mlp}.experts.down_proj", (num, hid, inter))
    else:
        for e in range(num):
            w_gate_up[e] = _gate_up(keys, f"{mlp}.experts.{e}", inter, hid)
            w_down[e] = keys.take(f"{mlp}.experts.{e}.down_proj.weight", (hid, inter))
    shared = None
    if shared_inter:
        name = "shared_mlp" if c.family == "hunyuan_v1_moe" else "shared_experts"
        dense = _dense(keys, f"{mlp}.{name}", shared_inter, hid)
        if slots:
            gate, up = dense.w_gate_up[:shared_inter], dense.w_gate_up[shared_inter:]
            for s in range(slots):
                part = slice(s * inter, (s + 1) * inter)
                w_gate_up[num + s] = torch.cat([gate[part], up[part]])
                w_down[num + s] = dense.w_down[:, part]
        else:
            shared = dense
    if c.family == "hunyuan_v1_moe":
        router, bias = keys.take(f"{mlp}.gate.wg.weight", (num, hid), torch.float32), None
    else:
        router = keys.take(f"{mlp}.gate.weight", (num, hid), torch.float32)
        bias = keys.take(f"{mlp}.gate.e_score_correction_bias", (num,), torch.float32)
    routing = Routing(
        c.num_experts_per_tok,
        c.scoring,
        c.norm_topk_prob,
        c.routed_scaling_factor,
        c.num_groups,
        c.topk_groups,
    )
    return MoEFFN(router, bias, w_gate_up, w_down, routing, slots, shared)


def build_layer(keys: KeyReader, index: int) -> MoELayer:
    c: MoEConfig = keys.config
    prefix = f"model.layers.{index}"
    att = f"{prefix}.self_attn"
    attn = _mla(keys, att, c) if c.mla is not None else _gqa(keys, att, c)
    if c.is_moe_layer(index):
        ffn = _moe(keys, f"{prefix}.mlp", c)
    else:
        ffn = _dense(keys, f"{prefix}.mlp", c.intermediate_size, c.hidden_size)
    return MoELayer(
        input_norm=keys.take(f"{prefix}.input_layernorm.weight", (c.hidden_size,)),
        post_norm=keys.take(f"{prefix}.post_attention_layernorm.weight", (c.hidden_size,)),
        attn=attn,
        ffn=ffn,
    )
