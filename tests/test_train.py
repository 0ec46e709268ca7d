"""The shared training toolkit: the LM head's log-probs and their hand-written backward, the model's memory on load."""

import pytest
import torch

import r1lab.model.layers
from r1lab.model.architecture import ModelConfig
from r1lab.model.hf_format import load_model, save_model
from r1lab.model.layers import Linear
from r1lab.model.transformer import CausalLM
from r1lab.train.logprobs import token_logprobs
from r1lab.train.optimizer import make_optimizer


def tiny(tied: bool) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))


def reference_logprobs(model, hidden, targets, temperature):
    return torch.log_softmax(model.lm_head(hidden).float() / temperature, -1).gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("chunk_bytes", [1, 4 * 97 * 5, 1 << 30])  # one row per chunk, 5 rows, all at once
def test_head_logprobs_and_gradients_equal_autograd(tied, recompute, chunk_bytes):
    """Two backward passes accumulate (micro-batches); every parameter's gradient equals plain autograd's, the tied
    weight's included, and the tied weight's gradient hook fires once per backward with the whole gradient."""
    grads, logps, seen = [], [], []
    for ours in (False, True):
        model = tiny(tied)
        hook = model.model.embed_tokens.weight.register_post_accumulate_grad_hook(
            lambda p: seen.append(p.grad.clone()) if ours else None)
        for mb in range(2):
            ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(mb))
            hidden = model.hidden_states(ids)[:, :-1].reshape(-1, 16)
            targets, weights = ids[:, 1:].reshape(-1), torch.linspace(-1, 2, 24)
            logp = (token_logprobs(model, hidden, targets, 0.7, recompute=recompute, chunk_bytes=chunk_bytes)[0]
                    if ours else reference_logprobs(model, hidden, targets, 0.7))
            (logp * weights).sum().backward()
            logps.append(logp.detach())
        hook.remove()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert torch.allclose(torch.cat(logps[:2]), torch.cat(logps[2:]), atol=1e-6)
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name
    if tied:
        assert len(seen) == 2 and torch.allclose(seen[1], grads[1]["model.embed_tokens.weight"])


def test_head_logprobs_under_bf16_autocast_match_autograd():
    model = tiny(True)
    hidden, targets = torch.randn(20, 16, requires_grad=True), torch.randint(0, 97, (20,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = reference_logprobs(model, hidden, targets, 1.0)
        ours, entropy = token_logprobs(model, hidden, targets, with_entropy=True)
    assert ours.dtype == torch.float32 and torch.allclose(ours, ref, atol=1e-6) and entropy.shape == (20,)
    ref.sum().backward()
    expected, hidden.grad = hidden.grad.clone(), None
    ours.sum().backward()
    assert torch.allclose(hidden.grad, expected, atol=1e-3)


def test_loaded_weights_do_not_view_the_file(tmp_path):
    """load_model copies what it does not fuse, so that the file's memory map is released when loading ends (a view
    would keep every page read while loading counted in the process's memory)."""
    save_model(tiny(True), tmp_path)
    model = load_model(tmp_path)
    file_bytes = (tmp_path / "model.safetensors").stat().st_size
    for name, p in model.named_parameters():
        storage = p.untyped_storage()
        assert storage.nbytes() < file_bytes - 1024 and storage.data_ptr() == p.data_ptr(), name  # own storage


def test_adamw_is_fused():
    """The foreach AdamW builds temporaries as large as all the weights (1 GB at 0.5B parameters in float32)."""
    optimizer = make_optimizer(tiny(True), 1e-3, 0.0, 0.99)
    assert optimizer.defaults["fused"]


def _saved_bytes_and_grads(model, ids, mask):
    from r1lab.train.supervised import lm_loss_sum

    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lm_loss_sum(model, ids, mask)
    loss.backward()
    return sum(saved), loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_keeps_layer_inputs_only_and_gives_the_same_gradients():
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    ids = torch.randint(0, 64, (3, 40))
    mask = torch.ones_like(ids, dtype=torch.bool)
    plain_bytes, plain_loss, plain = _saved_bytes_and_grads(model, ids, mask)
    model.set_activation_checkpointing(True)
    kept_bytes, loss, grads = _saved_bytes_and_grads(model, ids, mask)
    assert loss == pytest.approx(plain_loss, abs=1e-6)
    assert grads.keys() == plain.keys()
    for name in grads:
        assert torch.allclose(grads[name], plain[name], atol=1e-6), name
    # kept in forward: each layer's input (3 x 40 x 32 floats) and the head's inputs, not the layers' insides
    assert kept_bytes < plain_bytes / 4, (kept_bytes, plain_bytes)
    with torch.no_grad():  # inference and the engine's cached passes never recompute
        model(ids)


def test_activation_checkpointing_is_refused_for_moe_models():
    cfg = ModelConfig.from_hf({"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 64, "hidden_size": 32,
                               "intermediate_size": 48, "moe_intermediate_size": 16, "num_hidden_layers": 2,
                               "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "num_experts": 4,
                               "num_experts_per_tok": 2})
    with pytest.raises(ValueError, match="dense models"):
        CausalLM(cfg).set_activation_checkpointing(True)


@pytest.mark.parametrize("bias", [True, False])
def test_projection_gradients_written_in_place_equal_autograd(bias, monkeypatch):
    """r1lab's Linear adds its weight and bias gradients into .grad in place: over two backward passes (GRPO's
    prompt and completion passes, micro-batches), with a 3-D input, they equal nn.functional.linear's through
    autograd, and so does the input's gradient."""
    monkeypatch.setattr(r1lab.model.layers, "IN_PLACE_GRAD_MIN", 0)  # the tiny weight takes the in-place path too
    torch.manual_seed(0)
    ours = Linear(6, 5, bias=bias)
    plain = torch.nn.Linear(6, 5, bias=bias)
    plain.load_state_dict(ours.state_dict())
    grads = []
    for layer in (ours, plain):
        x = torch.randn(2, 40, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
        for scale in (1.0, -0.5):
            y = layer(x)
            assert (type(y.grad_fn).__name__ == "_InPlaceGradLinearBackward") == (layer is ours)
            (y * torch.linspace(-1, 1, 5) * scale).sum().backward()
        grads.append([x.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_projection_of_a_frozen_weight_leaves_it_without_gradient(monkeypatch):
    """LoRA's frozen base: the input still gets its gradient, the weight none."""
    monkeypatch.setattr(r1lab.model.layers, "IN_PLACE_GRAD_MIN", 0)
    layer = Linear(4, 3)
    layer.requires_grad_(False)
    x = torch.randn(40, 4, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(40, 4))
