"""The CPU decode kernel (r1lab/cpu/decode_kernel.py): the same products as torch's, used only where autograd does not
need them, and a clear fallback where it cannot be built."""

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import r1lab.model.layers
from r1lab.cpu import decode_kernel as decode_matmul
from r1lab.model.architecture import ModelConfig
from r1lab.model.transformer import CausalLM, KVCache

REPO = Path(__file__).resolve().parents[1]
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


# ---------------------------------------------------------------- a build cache nobody else can plant a library in

STAND_IN = """extern "C" void few_rows_linear(const float *x, const float *w, const float *b, float *y, long rows,
                                long n_out, long k, int threads) {
    for (long r = 0; r < rows; r++)
        for (long o = 0; o < n_out; o++) {
            float s = b ? b[o] : 0.0f;
            for (long i = 0; i < k; i++) s += x[r * k + i] * w[o * k + i];
            y[r * n_out + o] = s;
        }
}
"""  # the kernel's signature in a few lines: builds in a second where the real one takes many


@pytest.fixture
def caches(monkeypatch, tmp_path):
    """torch's build cache (TORCH_EXTENSIONS_DIR) and r1lab's private one, both fresh; the kernel not loaded yet,
    built from the stand-in source."""
    shared, home = tmp_path / "shared", tmp_path / "home-cache"
    shared.mkdir()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(shared))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    monkeypatch.setattr(decode_matmul, "_loaded", {})
    source = tmp_path / "stand_in.cpp"
    source.write_text(STAND_IN)
    monkeypatch.setattr(decode_matmul, "SOURCE", source)
    monkeypatch.setattr(decode_matmul, "FLAGS", ["-O1", "-fopenmp"])
    return shared, home / "r1lab" / "torch_extensions"


def compiled(path, source: str) -> None:
    """path replaced by a shared library built from C++ source, as someone else might plant it."""
    src = path.with_name("planted.cpp")
    src.write_text(source)
    subprocess.run([shutil.which("c++") or "g++", "-shared", "-fPIC", "-o", str(path), str(src)], check=True)
    src.unlink()


def built_in_another_process(tag: str) -> Path:
    """The stand-in kernel built and loaded by another r1lab process (this one's torch has not seen it, as at the
    start of a run): its library, which ninja's records say is up to date."""
    code = (f"import r1lab.cpu.decode_kernel as k; k.SOURCE = k.Path({str(decode_matmul.SOURCE)!r}); "
            f"k.FLAGS = {decode_matmul.FLAGS!r}; k.cpu_tag = lambda: {tag!r}; assert k.available()")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    [library] = Path(os.environ["TORCH_EXTENSIONS_DIR"]).glob(f"r1lab_decode_{tag}/*.so")
    return library


def test_a_cache_others_can_write_to_is_refused_for_a_private_one(caches, monkeypatch):
    shared, private = caches
    shared.chmod(0o777)  # e.g. a TORCH_EXTENSIONS_DIR under /tmp made by someone with umask 0
    with pytest.warns(RuntimeWarning) as said:
        directory = decode_matmul.build_directory("r1lab_decode_x")
    [line] = [str(w.message) for w in said]
    assert f"{shared} is writable by other users (mode 777)" in line
    assert f"built in {private / 'r1lab_decode_x'} instead" in line
    assert directory == (private / "r1lab_decode_x").resolve() and stat.S_IMODE(directory.stat().st_mode) == 0o700


@pytest.mark.parametrize("what", ["a group-writable file", "a sticky world-writable parent", "another user's file"])
def test_what_is_safe_and_what_is_not(caches, what):
    shared, _ = caches
    directory = shared / "r1lab_decode_x"
    directory.mkdir(mode=0o700)
    planted = directory / "r1lab_decode_x.so"
    planted.write_bytes(b"")
    if what == "a group-writable file":
        planted.chmod(0o664)
        assert "is writable by other users (mode 664)" in decode_matmul.planting_risk(directory)
    elif what == "a sticky world-writable parent":  # as /tmp: nobody can move or replace another's entry there
        shared.chmod(0o1777)
        assert decode_matmul.planting_risk(directory) is None
    else:
        if os.getuid() != 0:
            pytest.skip("only root can give a file to another user")
        os.chown(planted, 65534, 65534)
        assert "belongs to another user (uid 65534)" in decode_matmul.planting_risk(directory)


def test_with_no_safe_cache_decode_takes_torchs_path_with_one_line(caches, monkeypatch):
    shared, private = caches
    shared.chmod(0o777)
    private.parent.parent.mkdir(parents=True)
    private.parent.parent.chmod(0o777)
    with pytest.warns(RuntimeWarning, match="not available .*no safe build cache") as said:
        assert not decode_matmul.available()
    assert len(said) == 1 and not list(shared.rglob("*.so")) and not list(private.parent.parent.rglob("*.so"))


@pytest.mark.slow
@needs_kernel
@pytest.mark.parametrize("planted", ["wrong symbols", "truncated"])
def test_a_foreign_or_corrupt_library_is_rebuilt_once(caches, monkeypatch, planted):
    tag = f"planted-{planted.split()[0]}"  # a library this process has never built
    library = built_in_another_process(tag)
    if planted == "wrong symbols":  # loaded as it was, it would end the run with an AttributeError
        compiled(library, 'extern "C" void not_the_kernel() {}\n')
    else:  # loaded as it was, dlopen would fail, every run
        library.write_bytes(library.read_bytes()[: library.stat().st_size // 2])
    monkeypatch.setattr(decode_matmul, "cpu_tag", lambda: tag)
    expected = "does not define few_rows_linear" if planted == "wrong symbols" else "is not a readable shared library"
    with pytest.warns(RuntimeWarning, match=f"cached CPU decode kernel .* {expected}.*; rebuilding it$"):
        assert decode_matmul.available()
    assert decode_matmul.library_problem(library) is None  # rebuilt in place
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    torch.testing.assert_close(decode_matmul.linear(x, w, None), x @ w.t())  # and it is the kernel that runs


@needs_kernel
def test_a_library_still_wrong_after_the_rebuild_leaves_torchs_path(caches, monkeypatch):
    monkeypatch.setattr(decode_matmul, "cpu_tag", lambda: "never-right")
    monkeypatch.setattr(decode_matmul, "library_problem", lambda path: "does not define few_rows_linear")
    with pytest.warns(RuntimeWarning, match="not available .*does not define few_rows_linear after it was built"):
        assert not decode_matmul.available()
