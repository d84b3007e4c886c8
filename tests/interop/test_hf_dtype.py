"""A bf16 Hugging Face checkpoint stays bf16 through ``convert --from-hf``, the loader ``moelab
generate`` uses (``moelab.quantize.load``) and ``from_transformers``: no silent float32 copy that
doubles the memory."""

import torch
from safetensors import safe_open

from moelab.cli import main
from moelab.interop import from_transformers
from moelab.runfolder import load

from hf_models import hf_model

OLMOE = dict(num_key_value_heads=4, intermediate_size=24, num_experts=6, num_experts_per_tok=2,
             norm_topk_prob=False)


def _bf16_dir(tmp_path):
    model = hf_model("olmoe", OLMOE).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model


def test_convert_from_hf_keeps_bf16(tmp_path, capsys):
    src, hf = _bf16_dir(tmp_path)
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert main(["convert", "--from-hf", str(src), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    with safe_open(str(tmp_path / "run" / "model.safetensors"), framework="pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    # every weight as stored; only the router bias buffer, which moelab keeps in float32, is not
    assert {d for k, d in dtypes.items() if not k.endswith("expert_bias")} == {torch.bfloat16}
    model = load(tmp_path / "run")
    params = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in params.items() if ".router." not in n} == {torch.bfloat16}
    # bit for bit: the run's weights are the checkpoint's
    ours = from_transformers(hf)
    for name, p in ours.named_parameters():
        assert torch.equal(p.float(), model.get_parameter(name).float()), name
    # and generation runs in bf16 (``moelab generate`` loads runs this way)
    out = model.generate([[1, 2, 3]], max_new_tokens=4, temperature=0)
    assert len(out.tokens[0]) == 4 and model.embed.weight.dtype == torch.bfloat16


def test_from_transformers_keeps_the_dtype():
    hf = hf_model("olmoe", OLMOE).to(torch.bfloat16)
    ours = from_transformers(hf)
    assert ours.embed.weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in ours.named_parameters() if ".router." not in n} == {torch.bfloat16}
    # copies, not shared storage
    hf_embed = hf.get_input_embeddings().weight
    assert ours.embed.weight.data_ptr() != hf_embed.data_ptr()
    tokens = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        ref = hf(tokens).logits.float()
        got = ours(tokens).logits.float()
    assert (got - ref).norm() < 0.05 * ref.norm()
