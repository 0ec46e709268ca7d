"""The Python API: r1lab.grpo / sft / evaluate run what the commands run, with reward callables from a module or the
running script reaching the reward workers; settings checked as on the command line."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import r1lab

REPO = Path(__file__).resolve().parents[1]


def test_import_r1lab_stays_light():
    code = "import sys, r1lab; print('torch' in sys.modules, 'r1lab.commands.api' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split() == ["False", "False"]
    assert callable(r1lab.grpo) and callable(r1lab.sft) and callable(r1lab.evaluate)
    with pytest.raises(AttributeError):
        r1lab.no_such_api


def test_the_commands_start_without_torch_distributed_tensor():
    # ~0.7 s of every command's start (sympy and DTensor's op tables): loaded by FSDP or a checkpoint's optimizer state
    # when they are used, and looked up, not imported, by the DTensor checks (r1lab.model.layers.is_dtensor)
    code = ("import sys, r1lab.cli, r1lab.commands.api, r1lab.train.grpo, r1lab.train.sharding, r1lab.serve.app; "
            "print(sorted({m for m in sys.modules if m.startswith(('torch.distributed.tensor', "
            "'torch.distributed.fsdp', 'torch.distributed.checkpoint'))})[:3])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_grpo_with_a_reward_callable_from_a_module(tiny_base, tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def brevity(completion, problem):\n    return -len(completion) / 100\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from my_rewards import brevity

    model = r1lab.grpo({"model": str(tiny_base), "steps": 1}, rewards=[(brevity, 0.5)], prompts_per_step=2,
                       samples_per_prompt=2, max_new_tokens=6, eval_every=0, out=str(tmp_path / "run"), device="cpu")
    assert (Path(model) / "model.safetensors").exists()
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["reward/brevity"] < 0 and metrics["scorer_errors"] == 0
    figures = r1lab.evaluate(model=str(model), problems=2, samples=2, max_new_tokens=6, out=str(tmp_path / "e.json"))
    assert figures["n_problems"] == 2 and "pass@1" in figures


def test_functions_the_workers_cannot_import_and_unknown_settings_are_refused(tiny_base):
    def nested(completion, problem):
        return 0.0

    for fn, message in ((lambda c, p: 0.0, "top level"), (nested, "top level"), (42, "not callable")):
        with pytest.raises(ValueError, match=message):
            r1lab.grpo(model=str(tiny_base), rewards=[fn])
    with pytest.raises(ValueError, match="unknown setting 'learning_rate'"):
        r1lab.grpo(learning_rate=1e-6)
    with pytest.raises(ValueError, match="lr"):
        r1lab.grpo(model=str(tiny_base), lr=float("nan"))


@pytest.mark.slow
def test_a_reward_defined_in_the_running_script(tiny_base, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import json, r1lab

        def says_four(completion, problem):
            return float("4" in completion)

        if __name__ == "__main__":  # the reward workers import this file: training runs only here
            r1lab.grpo(model={str(tiny_base)!r}, steps=1, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=6,
                       eval_every=0, out={str(tmp_path / "run")!r}, device="cpu", rewards=[says_four])
    """))
    subprocess.run([sys.executable, str(script)], cwd=tmp_path, check=True, capture_output=True, timeout=600,
                   env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert "reward/says_four" in metrics and metrics["scorer_errors"] == 0
    saved = json.loads(json.dumps(__import__("yaml").safe_load((tmp_path / "run" / "config.yaml").read_text())))
    assert list(saved["reward_functions"]) == [f"{script.resolve()}:says_four"]
