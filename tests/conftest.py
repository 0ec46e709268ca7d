import os
from pathlib import Path

import pytest
import torch

from r1lab.cpu.process import install_fast_paths

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the cores shared between pytest-xdist's workers (`make test-fast` runs one per core): one thread each on 2 cores
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))

# every command installs the CPU fast paths at process set-up (r1lab/cpu/process.py); the tests run with them too
install_fast_paths()


@pytest.fixture(scope="session")
def sharp_engine():
    """A factory of engines over a tiny random model with sharp distributions (a wrong key attended, or another
    prompt, changes the tokens) and no stop ids (each test chooses its own): a fresh one per call."""
    from r1lab.engine.engine import Engine
    from r1lab.model.architecture import ModelConfig
    from r1lab.model.tokenizer import build_tiny_tokenizer
    from r1lab.model.transformer import CausalLM

    def make() -> Engine:
        torch.manual_seed(0)
        tok = build_tiny_tokenizer()
        cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
        model = CausalLM(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3)
        tok.eos_ids = set()
        return Engine(model.eval(), tok)

    return make


@pytest.fixture
def tiny_config_kwargs():
    return dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A very small base model pretrained for a few seconds: it already writes the <think>/<answer> format."""
    from r1lab.commands.pretrain import pretrain
    from r1lab.config import PretrainConfig

    def build(out: Path) -> Path:
        cfg = PretrainConfig(out=str(out), task_options={"min_terms": 3, "max_terms": 4}, documents=3000, steps=80,
                             batch_size=32, lr=1e-2, warmup_steps=5, hidden_size=64, num_layers=2, num_heads=2,
                             num_kv_heads=1, intermediate_size=128)
        return pretrain(cfg, log=lambda *_: None)

    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp("base"))
    # pytest-xdist's workers of one run share the model: the first to need it trains it, the others wait and read it
    from filelock import FileLock  # the dev extras' (make test-openenv runs without workers)

    shared = tmp_path_factory.getbasetemp().parent / "tiny_base"
    with FileLock(f"{shared}.lock"):
        if not (shared / "path").exists():
            (shared / "path").parent.mkdir(exist_ok=True)
            (shared / "path").write_text(str(build(shared / "run")))
    return Path((shared / "path").read_text())


# The fast tier's longest files (a few seconds to 16 s each on a 2-core machine), run first: each file runs on one
# worker (`--dist loadfile`), so one started last would keep its worker busy after the others had finished. The
# torchrun smoke test leads them.
LONGEST_FIRST = ["test_distributed.py", "test_mtp.py", "test_sandbox.py", "test_reward_functions.py",
                 "test_speculative_serve.py", "test_verifiers_env.py", "test_serve.py", "test_deepseek_v3.py"]


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order
