"""Model loading: dtype choice, 4-bit QLoRA layers, trained-output loading."""

from __future__ import annotations

import platform

import pytest
import torch

from medtune import config as config_mod
from medtune import models
from conftest import tiny_config_tree


def _cfg(model_dir, **train):
    tree = tiny_config_tree(model_dir)
    tree["train"].update(train)
    return config_mod.from_dict(tree)


def test_auto_dtype_is_bf16_only_where_native():
    expected = torch.bfloat16 if models.native_bf16() else torch.float32
    assert models.resolve_dtype("auto") == expected
    assert models.resolve_dtype("float16") == torch.float16
    if torch.cuda.is_available():
        return
    if platform.machine() == "x86_64":  # native: AVX512-BF16 or AMX in the CPU's flags
        assert models.native_bf16() == bool(models.cpu_flags() & {"avx512_bf16", "amx_bf16"})


@pytest.mark.parametrize("flags, native", [
    ({"avx2", "fma"}, False),
    ({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq"}, False),  # oneDNN says yes, but emulates: slower
    ({"avx512f", "avx512_bf16"}, True),
    ({"avx512f", "amx_tile", "amx_bf16"}, True),
])
def test_auto_takes_bf16_on_x86_only_where_the_cpu_computes_it(monkeypatch, flags, native):
    monkeypatch.setattr(models.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(models, "cpu_flags", lambda: flags)
    assert models.native_bf16(torch.device("cpu")) is native
    assert models.resolve_dtype("auto") == (torch.bfloat16 if native else torch.float32)


def test_lora_loads_in_the_resolved_dtype(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, dtype="float32")
    model = models.load_model(cfg.model, cfg.train)
    assert model.dtype == torch.float32 and model.config.use_cache is False
    cfg16 = _cfg(tiny_model_dir, dtype="bfloat16")
    assert models.load_model(cfg16.model, cfg16.train).dtype == torch.bfloat16


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_qlora_loads_bitsandbytes_4bit_layers(tiny_model_dir, quant_type):
    from bitsandbytes.nn import Linear4bit

    cfg = _cfg(tiny_model_dir, method="qlora", quantization={"quant_type": quant_type, "double_quant": True,
                                                             "compute_dtype": "float32"})
    model = models.load_model(cfg.model, cfg.train)
    four_bit = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(four_bit) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert all(m.weight.quant_type == quant_type for m in four_bit)
    assert four_bit[0].weight.quant_state.nested  # double quantization
    assert four_bit[0].compute_dtype == torch.float32
    # the packed 4-bit weight holds half a byte per parameter
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.numel() * 2 == q.in_features * q.out_features
    # unquantized load of the same config (merged export) gives plain Linear layers in the compute dtype
    plain = models.load_model(cfg.model, cfg.train, quantize=False)
    assert not any(isinstance(m, Linear4bit) for m in plain.modules()) and plain.dtype == torch.float32


@pytest.mark.parametrize("train, folded", [
    ({"dtype": "float32"}, True),
    ({"dtype": "bfloat16"}, False),  # bf16 weights would round much of the adapter's update away
    ({"method": "qlora", "quantization": {"compute_dtype": "float32"}}, False),  # 4-bit: re-quantizing is lossy
])
def test_an_adapter_is_folded_into_float32_weights_for_inference(tiny_model_dir, tmp_path, train, folded):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                   LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
                   ).save_pretrained(tmp_path / "adapter")
    cfg = _cfg(tiny_model_dir, **train)
    loaded = models.load_trained(cfg.model, cfg.train, tmp_path / "adapter")
    assert isinstance(loaded, PeftModel) is not folded
    kept_apart = PeftModel.from_pretrained(models.load_model(cfg.model, cfg.train), str(tmp_path / "adapter"))
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits.float()
        expected = kept_apart(input_ids=ids).logits.float()
        base = models.load_model(cfg.model, cfg.train)(input_ids=ids).logits.float()
    assert (expected - base).abs().max() > 0.1  # the adapter changes the answers
    assert (logits - expected).abs().max() < 1e-4
