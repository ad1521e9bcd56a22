"""The supported architectures, one declarative :class:`Family` per ``config.model_type``.

Adding a family: add one entry to ``FAMILIES`` below and one tiny config to ``TINY_CONFIGS``;
the conformance suite (``tests/test_families.py``) then runs every invariant against it.
"""

from __future__ import annotations

import dataclasses

from .base import Experts, Family, TextInside

_LLAMA_ATTN = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
_SWIGLU = {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_PRE_NORMS = ("input_layernorm", "post_attention_layernorm")


def _moe(model_type: str, experts: Experts, extra: str) -> Family:
    # Llama-like attention; the MLP is a router plus fused experts (offsite.families.moe), so the
    # family has no dense MLP linears: LoRA targets attention, GradOT prunes experts channel-wise.
    return Family(model_type, layers="model.layers", final_norm="model.norm", attention=_LLAMA_ATTN, mlp={},
                  norms=_PRE_NORMS, experts=experts, extra=extra)


def _llama_like(model_type: str, norms=_PRE_NORMS, extra: str = "") -> Family:
    # Llama, Mistral, Qwen2/3 and Gemma share module names; they differ only in details that live
    # inside HF's own modules (biases, q/k norms, embedding scaling), which offsite never touches.
    return Family(model_type, layers="model.layers", final_norm="model.norm", attention=_LLAMA_ATTN,
                  mlp=_SWIGLU, norms=norms, extra=extra)


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in [
        _llama_like("llama", extra="GQA; RMSNorm; RoPE"),
        _llama_like("mistral", extra="sliding-window attention"),
        _llama_like("qwen2", extra="q/k/v biases; config.layer_types"),
        _llama_like("qwen3", extra="per-head q_norm/k_norm inside self_attn; config.layer_types"),
        _llama_like("gemma", extra="embeddings scaled by sqrt(hidden); RMSNorm(1+w); tied head"),
        dataclasses.replace(
            _llama_like("gemma2", norms=_PRE_NORMS + ("pre_feedforward_layernorm", "post_feedforward_layernorm"),
                        extra="soft-capping; alternating sliding/full attention in config.layer_types"),
            logit_softcap="final_logit_softcapping"),
        dataclasses.replace(
            _llama_like("gemma3_text", norms=_PRE_NORMS + ("pre_feedforward_layernorm", "post_feedforward_layernorm"),
                        extra="q_norm/k_norm; five sliding layers per full one in config.layer_types; "
                              "local and global RoPE; embeddings scaled; tied head"),
            logit_softcap="final_logit_softcapping"),
        dataclasses.replace(_llama_like("smollm3", extra="RoPE only where config.no_rope_layers says 1; "
                                                         "config.layer_types"),
                            per_layer=("layer_types", "no_rope_layers")),
        _llama_like("olmo2", norms=("post_attention_layernorm", "post_feedforward_layernorm"),
                    extra="norms after attention and MLP (none before); q_norm/k_norm over all heads"),
        _llama_like("olmo3", norms=("post_attention_layernorm", "post_feedforward_layernorm"),
                    extra="OLMo 2's layer; sliding/full attention in config.layer_types"),
        dataclasses.replace(_llama_like("granite", extra="embedding, residual and attention multipliers inside "
                                                         "HF's modules; logits divided by logits_scaling"),
                            logit_divisor="logits_scaling"),
        Family("glm4", layers="model.layers", final_norm="model.norm", attention=_LLAMA_ATTN,
               mlp={"gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj"},
               norms=_PRE_NORMS + ("post_self_attn_layernorm", "post_mlp_layernorm"),
               extra="fused gate_up_proj rows [gate; up]; norms before and after attention and MLP; "
                     "partial RoPE; q/k/v biases"),
        _moe("mixtral", Experts(), "fused experts gate_up [E, 2I, H]; top-k softmax router mlp.gate"),
        _moe("qwen2_moe", Experts(shared="mlp.shared_expert", sparse_step=True),
             "fused experts + a sigmoid-gated shared expert; dense MLP where mlp_only_layers / "
             "decoder_sparse_step say; q/k/v biases"),
        _moe("qwen3_moe", Experts(sparse_step=True), "fused experts (moe_intermediate_size); q_norm/k_norm; "
             "dense MLP where mlp_only_layers / decoder_sparse_step say"),
        _moe("olmoe", Experts(), "fused experts; q_norm/k_norm over all heads"),
        _moe("gpt_oss", Experts(router="mlp.router", in_out=True, interleaved=True, biases=True),
             "fused experts stored [E, H, 2I] with gate/up interleaved and biases; clamped gating; router bias; "
             "attention sinks; sliding/full attention in config.layer_types"),
        Family("phi3", layers="model.layers", final_norm="model.norm",
               attention={"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj"},
               mlp={"gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj"}, norms=_PRE_NORMS,
               qkv_layout="concat", extra="fused qkv_proj rows [q; k; v]; fused gate_up_proj rows [gate; up]"),
        Family("phi", layers="model.layers", final_norm="model.final_layernorm",
               attention={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                          "o": "self_attn.dense"},
               mlp={"up": "mlp.fc1", "down": "mlp.fc2"}, norms=("input_layernorm",), parallel_residual=True,
               extra="partial rotary; biases everywhere"),
        Family("opt", layers="model.decoder.layers", final_norm="model.decoder.final_layer_norm",
               attention={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                          "o": "self_attn.out_proj"},
               mlp={"up": "fc1", "down": "fc2"}, norms=("self_attn_layer_norm", "final_layer_norm"),
               extra="learned positions; project_in/project_out when word_embed_proj_dim != hidden"),
        Family("gpt2", layers="transformer.h", final_norm="transformer.ln_f",
               attention={"qkv": "attn.c_attn", "o": "attn.c_proj"}, mlp={"up": "mlp.c_fc", "down": "mlp.c_proj"},
               norms=("ln_1", "ln_2"), qkv_layout="concat", conv1d=True,
               extra="Conv1D weights are [in, out]; learned positions wpe"),
        Family("gpt_neox", layers="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm",
               attention={"qkv": "attention.query_key_value", "o": "attention.dense"},
               mlp={"up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"}, norms=_PRE_NORMS,
               qkv_layout="per_head", parallel_residual=True, extra="fused qkv interleaved per head"),
        Family("falcon", layers="transformer.h", final_norm="transformer.ln_f",
               attention={"qkv": "self_attention.query_key_value", "o": "self_attention.dense"},
               mlp={"up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"}, norms=("input_layernorm",),
               qkv_layout="falcon", parallel_residual=True,
               extra="qkv layout depends on new_decoder_architecture / multi_query"),
        Family("bloom", layers="transformer.h", final_norm="transformer.ln_f",
               attention={"qkv": "self_attention.query_key_value", "o": "self_attention.dense"},
               mlp={"up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"}, norms=_PRE_NORMS,
               qkv_layout="per_head", extra="ALiBi positions; embedding LayerNorm"),
        Family("gptj", layers="transformer.h", final_norm="transformer.ln_f",
               attention={"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.out_proj"},
               mlp={"up": "mlp.fc_in", "down": "mlp.fc_out"}, norms=("ln_1",), parallel_residual=True,
               extra="rotary on rotary_dim; biases on MLP only"),
    ]
}

# Multimodal folders whose language model is a supported family: ``offsite models extract-text`` writes
# that model alone as a stock causal-LM folder (the vision tower is not part of offsite-tuning).
TEXT_INSIDE: dict[str, TextInside] = {
    "gemma3": TextInside(text_config="text_config", backbone="model.language_model"),
}

_COMMON = dict(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_SMALL = dict(_COMMON, hidden_size=32, intermediate_size=64, num_attention_heads=4, max_position_embeddings=128)

# Tiny configs (a few thousand parameters) for tests and the conformance suite: keyword arguments
# of each family's HF config class. ``num_hidden_layers`` is filled in by ``tiny_config``.
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(_SMALL, num_key_value_heads=2),
    "mistral": dict(_SMALL, num_key_value_heads=2, sliding_window=16),
    "qwen2": dict(_SMALL, num_key_value_heads=2),
    "qwen3": dict(_SMALL, num_key_value_heads=2, head_dim=8),
    "gemma": dict(_SMALL, num_key_value_heads=2, head_dim=8),
    "gemma2": dict(_SMALL, num_key_value_heads=2, head_dim=8, sliding_window=16),
    "gemma3_text": dict(_SMALL, num_key_value_heads=2, head_dim=8, sliding_window=16, sliding_window_pattern=3),
    "smollm3": dict(_SMALL, num_key_value_heads=2, no_rope_layer_interval=3),
    "olmo2": dict(_SMALL, num_key_value_heads=2),
    "olmo3": dict(_SMALL, num_key_value_heads=2, sliding_window=16),
    # Multipliers away from 1, so a missing one shows in the conformance suite.
    "granite": dict(_SMALL, num_key_value_heads=2, embedding_multiplier=2.0, residual_multiplier=0.5,
                    attention_multiplier=0.25, logits_scaling=4.0),
    "glm4": dict(_SMALL, num_key_value_heads=2, head_dim=8),
    "mixtral": dict(_SMALL, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    # A dense-MLP layer in the middle (mlp_only_layers), so moving layers must carry the kind along.
    "qwen2_moe": dict(_SMALL, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=24, decoder_sparse_step=1, mlp_only_layers=[1]),
    "qwen3_moe": dict(_SMALL, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[1]),
    "olmoe": dict(_SMALL, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(_SMALL, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                    sliding_window=16),
    "phi3": dict(_SMALL, num_key_value_heads=4),
    "phi": dict(_SMALL),
    "opt": dict(_COMMON, hidden_size=32, ffn_dim=64, num_attention_heads=4, max_position_embeddings=128,
                word_embed_proj_dim=32),
    "gpt2": dict(_COMMON, n_embd=32, n_head=4, n_positions=128, n_inner=64),
    "gpt_neox": dict(_SMALL, rotary_pct=0.5),
    "falcon": dict(_COMMON, hidden_size=32, num_attention_heads=4),
    "bloom": dict(_COMMON, hidden_size=32, n_head=4),
    "gptj": dict(_COMMON, n_embd=32, n_head=4, n_positions=128, rotary_dim=4, n_inner=64),
}
