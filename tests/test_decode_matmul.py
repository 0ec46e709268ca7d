"""The CPU decode kernel (r1lab/cpu/decode_kernel.py): the same products as torch's, used only where autograd does not
need them, and a clear fallback where it cannot be built."""

import shutil
import sys

import pytest
import torch

import r1lab.model.layers
from r1lab.cpu import decode_kernel as decode_matmul
from r1lab.model.architecture import ModelConfig
from r1lab.model.transformer import CausalLM, KVCache

HAS_COMPILER = sys.platform.startswith("linux") and bool(shutil.which("cc") or shutil.which("gcc"))
needs_kernel = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")


def reference(x, w, b):
    y = x.double() @ w.double().t()
    return (y if b is None else y + b.double()).float()


@needs_kernel
def test_the_kernel_is_built_where_a_compiler_is():
    # on Linux with a compiler a missing kernel is a bug (decode silently 1.3x slower), not a skip
    assert decode_matmul.available()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 20, 32])  # one, part of, exactly and past the kernel's group of 8
@pytest.mark.parametrize("n_out,k", [(1, 5), (7, 16), (64, 33), (1001, 896), (130, 4864)])  # odd rows, tails
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_equals_the_product(rows, n_out, k, bias):
    g = torch.Generator().manual_seed(rows * 1000 + n_out)
    x, w = torch.randn(rows, k, generator=g), torch.randn(n_out, k, generator=g)
    b = torch.randn(n_out, generator=g) if bias else None
    y = decode_matmul.linear(x, w, b)
    assert y is not None and y.shape == (rows, n_out) and y.is_contiguous()
    torch.testing.assert_close(y, reference(x, w, b), rtol=1e-5, atol=1e-5 * k**0.5)


@needs_kernel
def test_every_thread_count_gives_the_same_bits():
    """Each output is summed by one thread in one order: splitting the rows among threads changes nothing."""
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(8, 896, generator=g), torch.randn(999, 896, generator=g), torch.randn(999, generator=g)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(decode_matmul.linear(x, w, b))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@needs_kernel
def test_a_non_contiguous_input_is_read_right():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(40, 8, generator=g).t(), torch.randn(33, 40, generator=g)  # x (8, 40), column-major
    y = decode_matmul.linear(x, w, None)
    torch.testing.assert_close(y, reference(x, w, None), rtol=1e-5, atol=1e-5)


def test_it_declines_what_autograd_or_its_layout_needs():
    w, x = torch.randn(16, 32), torch.randn(4, 32)
    assert decode_matmul.linear(x, w.t().contiguous().t(), None) is None  # a transposed (strided) weight
    assert decode_matmul.linear(x.bfloat16(), w.bfloat16(), None) is None
    assert decode_matmul.linear(x, torch.randn(16, 16), None) is None  # a shape that does not match
    trained = torch.nn.Parameter(w.clone())
    assert decode_matmul.linear(x, trained, None) is None  # autograd must see the product
    assert decode_matmul.linear(x.requires_grad_(), w, None) is None
    if HAS_COMPILER:
        with torch.no_grad():
            assert decode_matmul.linear(x, trained, None) is not None


def test_a_few_rows_product_that_needs_gradients_still_gets_them():
    """A LoRA or small-batch training forward over a few rows goes through torch's products, with gradients."""
    torch.manual_seed(0)
    layer = r1lab.model.layers.Linear(32, 24, bias=True)
    layer.weight.requires_grad_(False)  # a frozen base weight, as under LoRA
    x = torch.randn(3, 1, 32, requires_grad=True)
    layer(x).square().sum().backward()
    expected = torch.nn.functional.linear(x.detach(), layer.weight, layer.bias)
    assert x.grad is not None and layer.bias.grad is not None
    torch.testing.assert_close(layer.bias.grad, 2 * expected.sum((0, 1)))


def test_without_a_compiler_decode_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(decode_matmul, "_loaded", {})
    monkeypatch.setattr(decode_matmul, "cpu_tag", lambda: "no-compiler")  # a library not built before
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    with pytest.warns(RuntimeWarning, match="decode kernel is not available"):
        assert not decode_matmul.available()
    w, x = torch.randn(16, 32), torch.randn(4, 32)
    torch.testing.assert_close(decode_matmul.few_rows_linear(x, w, None), x @ w.t())  # torch's path instead
    assert list(tmp_path.rglob("*.so")) == []


def test_a_compile_error_is_reported_and_leaves_no_library(monkeypatch, tmp_path):
    monkeypatch.setattr(decode_matmul, "_loaded", {})
    monkeypatch.setattr(decode_matmul, "cpu_tag", lambda: "compile-error")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(decode_matmul, "FLAGS", ["--no-such-flag-r1lab"])
    if not HAS_COMPILER:
        pytest.skip("no C compiler on this machine")
    with pytest.warns(RuntimeWarning, match="decode kernel is not available"):
        assert not decode_matmul.available()
    assert list(tmp_path.rglob("*.so")) == []  # no partial library left to be loaded later


def test_it_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(decode_matmul, "_loaded", {})
    monkeypatch.setenv("R1LAB_DECODE_KERNEL", "0")
    assert not decode_matmul.available()
    assert decode_matmul.linear(torch.randn(2, 8), torch.randn(4, 8), None) is None


@needs_kernel
def test_the_library_is_built_once_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert decode_matmul._load() is not None
    [first] = tmp_path.rglob("*.so")
    stamp = first.stat().st_mtime_ns
    assert decode_matmul._load() is not None and list(tmp_path.rglob("*.so")) == [first]
    assert first.stat().st_mtime_ns == stamp
    monkeypatch.setattr(decode_matmul, "cpu_tag", lambda: "another-cpu")  # -march=native: one library per CPU
    assert decode_matmul._load() is not None and len(list(tmp_path.rglob("*.so"))) == 2


def test_without_the_fast_paths_the_model_takes_torchs_products(monkeypatch):
    """model/ runs on torch alone: nothing installed, a decode step's product is F.linear's."""
    monkeypatch.setattr(r1lab.model.layers, "FAST_PATHS", r1lab.model.layers.FastPaths())
    layer = r1lab.model.layers.Linear(32, 24, bias=True)
    x = torch.randn(4, 1, 32)
    with torch.no_grad():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


@needs_kernel
def test_a_decode_step_gives_torchs_logits(monkeypatch):
    """The engine's decode step (static shapes, the LM head's few rows) with and without the kernel."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = CausalLM(cfg).eval()
    B, P = 5, 6
    ids = torch.randint(0, 300, (B, P))

    def step_logits():
        cache = KVCache(cfg, B, P + 1, torch.float32, torch.device("cpu"))
        mask = torch.ones(B, 1, 1, P + 1, dtype=torch.bool)
        with torch.no_grad():
            model.forward_cached(ids, torch.arange(P).expand(B, P), cache, 0, torch.ones(B, P, dtype=torch.bool))
            return model.decode_step(ids[:, -1:], torch.full((B, 1), P), cache, torch.tensor([P]), mask)

    assert decode_matmul.available()
    with_kernel = step_logits()
    monkeypatch.setitem(decode_matmul._loaded, "kernel", None)
    torch.testing.assert_close(with_kernel, step_logits(), rtol=1e-5, atol=1e-5)
