"""The exported file, re-read with gguf.GGUFReader: tensor names, shapes and types, hyperparameter
and tokenizer keys; bf16 keeps the weights bit for bit; llama.cpp's quantiser writes the k-quants."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

import moelab  # noqa: E402
from moelab.data.tokenizer import train_bpe  # noqa: E402
from moelab.interop.gguf import export_gguf  # noqa: E402
from moelab.interop.llamacpp import LlamaCpp  # noqa: E402

TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.vocab_size=320", "model.ffn_hidden=96",
        "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_hidden=32", "model.max_seq_len=64"]


@pytest.fixture(scope="module")
def tokenizer_json():
    text = open(moelab.__file__.rsplit("/", 1)[0] + "/config.py", encoding="utf-8").read()
    return train_bpe([text], 300).to_str()


def _model(preset, *extra):
    torch.manual_seed(0)
    more = ["model.moe.num_experts=8"] if preset.startswith("deepseek") else []
    return moelab.build(preset, TINY + more + list(extra)).eval()


def _read(path):
    r = gguf.GGUFReader(str(path))
    fields = {k: f for k, f in r.fields.items()}
    tensors = {t.name: t for t in r.tensors}
    return fields, tensors


def _value(field):
    v = field.contents()
    return v


@pytest.mark.parametrize("preset,extra,arch,layer_tensors", [
    ("dense", ["model.n_kv_heads=2"], "llama",
     {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"}),
    ("mixtral", [], "llama", {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate_inp",
                              "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}),
    ("moe", ["model.qk_norm=full", "model.moe.renormalize=false"], "olmoe",
     {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm", "ffn_norm",
      "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}),
    ("moe", ["model.moe.num_shared_experts=1", "model.moe.shared_expert_gate=true", "model.moe.renormalize=false"],
     "qwen2moe", {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate_inp",
                  "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_shexp", "ffn_up_shexp",
                  "ffn_down_shexp", "ffn_gate_inp_shexp"}),
])
def test_names_shapes_types_and_keys(preset, extra, arch, layer_tensors, tmp_path, tokenizer_json):
    model = _model(preset, *extra)
    cfg = model.config
    done = export_gguf(model, tmp_path / "m.gguf", type="bf16", tokenizer_json=tokenizer_json)
    assert done.arch == arch
    fields, tensors = _read(done.path)
    assert _value(fields["general.architecture"]) == arch
    assert _value(fields[f"{arch}.block_count"]) == cfg.n_layers
    assert _value(fields[f"{arch}.embedding_length"]) == cfg.d_model
    assert _value(fields[f"{arch}.context_length"]) == cfg.max_seq_len
    assert _value(fields[f"{arch}.attention.head_count"]) == cfg.n_heads
    assert _value(fields[f"{arch}.attention.head_count_kv"]) == cfg.kv_heads
    assert _value(fields[f"{arch}.rope.freq_base"]) == pytest.approx(cfg.rope_theta)
    assert _value(fields[f"{arch}.attention.layer_norm_rms_epsilon"]) == pytest.approx(cfg.norm_eps)
    if cfg.moe_layer_indices():
        assert _value(fields[f"{arch}.expert_count"]) == cfg.moe.num_experts
        assert _value(fields[f"{arch}.expert_used_count"]) == cfg.moe.top_k
    # tokenizer: byte-level BPE with the gpt-2 pre-tokenizer, every embedding row named
    assert _value(fields["tokenizer.ggml.model"]) == "gpt2"
    assert _value(fields["tokenizer.ggml.pre"]) == "gpt-2"
    assert len(_value(fields["tokenizer.ggml.tokens"])) == cfg.vocab_size
    assert _value(fields["tokenizer.ggml.eos_token_id"]) == 0
    assert _value(fields["tokenizer.ggml.add_bos_token"]) is False
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(cfg.n_layers) for n in layer_tensors}
    assert set(tensors) == expected
    assert list(tensors["token_embd.weight"].shape) == [cfg.d_model, cfg.vocab_size]    # GGUF: (ne0, ne1)
    B = gguf.GGMLQuantizationType
    for name, t in tensors.items():
        vector = len(t.shape) == 1 or "ffn_gate_inp" in name
        assert t.tensor_type == (B.F32 if vector else B.BF16), name
    if cfg.moe_layer_indices():
        e = tensors["blk.0.ffn_gate_exps.weight"]
        assert list(e.shape) == [cfg.d_model, cfg.moe.expert_hidden, cfg.moe.num_experts]
        # gate rows of expert 1, bit for bit (bf16 weights are stored as they are)
        ours = model.blocks[0].ffn.experts.w_gate_up[1, :cfg.moe.expert_hidden].to(torch.bfloat16)
        raw = np.asarray(e.data).reshape(-1).view(np.uint16)                   # the reader returns bytes
        stored = raw.reshape(cfg.moe.num_experts, cfg.moe.expert_hidden, cfg.d_model)[1]
        assert np.array_equal(stored, ours.view(torch.int16).numpy().view(np.uint16))


def test_deepseek2_keys_and_mla_tensors(tmp_path):
    model = _model("deepseek-v3", "model.n_layers=3")
    cfg = model.config
    done = export_gguf(model, tmp_path / "m.gguf", type="f32")
    fields, tensors = _read(done.path)
    a = cfg.mla
    assert done.arch == "deepseek2"
    assert _value(fields["deepseek2.leading_dense_block_count"]) == 1
    assert _value(fields["deepseek2.attention.kv_lora_rank"]) == a.kv_lora_rank
    assert _value(fields["deepseek2.attention.q_lora_rank"]) == a.q_lora_rank
    assert _value(fields["deepseek2.attention.key_length_mla"]) == a.qk_nope_head_dim + a.qk_rope_head_dim
    assert _value(fields["deepseek2.expert_gating_func"]) == gguf.ExpertGatingFuncType.SIGMOID
    assert _value(fields["deepseek2.expert_weights_scale"]) == pytest.approx(cfg.moe.routed_scaling)
    assert _value(fields["deepseek2.expert_group_count"]) == cfg.moe.n_groups
    assert list(tensors["blk.1.attn_k_b.weight"].shape) == [a.qk_nope_head_dim, a.kv_lora_rank, cfg.n_heads]
    assert list(tensors["blk.1.attn_v_b.weight"].shape) == [a.kv_lora_rank, a.v_head_dim, cfg.n_heads]
    assert "blk.1.exp_probs_b.bias" in tensors and "blk.0.ffn_gate.weight" in tensors
    assert "tokenizer.ggml.tokens" not in fields and _value(fields["tokenizer.ggml.model"]) == "none"


def test_q8_0_and_llama_quantiser_types(tmp_path):
    model = _model("mixtral", "model.d_model=256", "model.moe.expert_hidden=256", "model.ffn_hidden=256")
    B = gguf.GGMLQuantizationType
    q8 = export_gguf(model, tmp_path / "q8.gguf", type="q8_0")
    _, tensors = _read(q8.path)
    assert tensors["blk.0.ffn_down_exps.weight"].tensor_type == B.Q8_0
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == B.F32        # the router stays float32
    k = export_gguf(model, tmp_path / "q4km.gguf", type="q4_k_m")
    _, tensors = _read(k.path)
    kinds = {t.tensor_type for t in tensors.values()}
    assert B.Q4_K in kinds and k.bytes < q8.bytes
    assert not list(tmp_path.glob(".*tmp*"))                                 # no temporary left behind
    engine = LlamaCpp(k.path, 64)
    assert engine.prefill([1, 2, 3]).shape == (model.config.vocab_size,)
    engine.close()
