"""The oracle against Hugging Face transformers at full depth: random tiny configs and SmolLM2."""
import pytest
import torch
import transformers

import reference


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def tiny_hf_llama(heads=6, kv_heads=2, tied=False, rope_parameters=None, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=heads * 16, intermediate_size=136, num_hidden_layers=3,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16,
        max_position_embeddings=512, tie_word_embeddings=tied, rms_norm_eps=1e-6,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 5000.0})
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # HF initialises norms to 1: make them matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

CASES = {
    "gqa1-untied": dict(heads=4, kv_heads=4),
    "gqa3-untied": dict(heads=6, kv_heads=2),
    "gqa4-tied": dict(heads=8, kv_heads=2, tied=True),
    "gqa3-llama3-rope": dict(heads=6, kv_heads=2, rope_parameters=LLAMA3_ROPE),
}


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_hf_on_random_configs(case):
    from d3kernels import LlamaConfig  # only to read the HF config the same way users do

    hf = tiny_hf_llama(**CASES[case])
    cfg = LlamaConfig.from_hf_dict(hf.config.to_dict())
    weights = {k: v.double() for k, v in hf.state_dict().items()}
    ids = torch.randint(0, cfg.vocab_size, (2, 150))  # past original_max_position_embeddings
    with torch.no_grad():
        expected = hf(ids).logits
    got = reference.llama_forward(weights, cfg, ids)
    assert rel_err(got, expected) <= 1e-4


def test_reference_matches_hf_on_smollm2(hf_smollm2, smollm2_f64, smollm2_tokenizer):
    ids = torch.tensor([smollm2_tokenizer.encode("The capital of France is Paris, and the "
                                                 "capital of Italy is")])
    with torch.no_grad():
        expected = hf_smollm2(ids).logits
    got = reference.llama_forward(smollm2_f64.state_dict(), smollm2_f64.config, ids)
    assert rel_err(got, expected) <= 1e-4
    assert got[0, -1].argmax() == expected[0, -1].argmax()
