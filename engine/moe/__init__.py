"""Mixture-of-Experts families served like any other model: Hunyuan-A13B (`hunyuan_v1_moe`),
dots.llm1 (`dots1`) and DeepSeek-V3 style with MLA (`deepseek_v3`, JoyAI-LLM Flash).

    config.py      MoEConfig (+ MoERope, MLAConfig): the engine's config interface, one exit
    hf_config.py   config.json -> MoEConfig, refusing what is not implemented
    memory.py      weights + KV estimate before loading; refusal when it does not fit
    loader.py      lazy safetensors -> MoEModel; weights.py maps one layer's keys
    model.py       MoEModel: forward(works), new_cache(), switch_exit, branch_parameters
    attention.py   GQA with QK-norm before (dots1) or after (Hunyuan) RoPE
    mla.py         DeepSeek-V3 MLA over a cache of compressed latents
    moe_block.py   router -> routed + shared experts (kernels.route_experts / fused_moe)
    rope.py        default / linear / NTK-alpha / YaRN tables
    cache.py       MoECache
"""

from __future__ import annotations

from ruyiflow.engine.moe.hf_config import MODEL_TYPES, is_moe_config

__all__ = ["MODEL_TYPES", "is_moe_config"]
