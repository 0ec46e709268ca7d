"""A new user's journey, as docs/your-model-and-data.md and docs/serving.md tell it, on a model directory written by
transformers 5 (chat_template.jinja, R1 tags as special tokens, model_type qwen2) and a GSM8K-style data file: GRPO
with the chat template, eval, SFT on prompt/completion rows, the report, and serving it to the OpenAI client's calls."""

import io
import json

import pytest

from r1lab.cli import main

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # whole commands, one after another

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def users_model_dir(path):
    """What `save_pretrained` writes for a user's small Qwen2 with its own BPE tokenizer and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<answer>", "</answer>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["Natalia sold clips to 48 of her friends. How many? #### 72 <think> </think>"] * 50,
                                trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                                     pad_token="<|endoftext|>", chat_template=CHATML)
    tokenizer.save_pretrained(path)
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
                                      tie_word_embeddings=True)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    assert (path / "chat_template.jinja").exists()  # where transformers 5 keeps the template
    return path


def test_own_model_gsm8k_grpo_eval_sft_report_serve_chat(tmp_path, monkeypatch, capsys):
    model = users_model_dir(tmp_path / "my-qwen2")
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": f"Natalia sold {n} clips. How many?", "answer": f"So {n}\n#### {n}"})
                            + "\n" for n in range(40)))
    run = tmp_path / "runs" / "my-run"
    small = ["--max-new-tokens", "6", "--device", "cpu"]
    main(["grpo", "--model", str(model), "--task", str(data), "--template", "chat", "--steps", "2",
          "--prompts-per-step", "2", "--samples-per-prompt", "2", "--eval-every", "1", "--eval-problems", "2",
          "--eval-samples", "2", "--out", str(run), *small])
    assert (run / "model" / "chat_template.jinja").read_text() == (model / "chat_template.jinja").read_text()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    main(["eval", "--model", str(run / "model"), "--task", str(data), "--template", "chat", "--problems", "2",
          "--samples", "2", *small])
    assert json.loads((run / "eval.json").read_text())["test"]["k"] == 2  # beside the run, not in its model
    main(["report", str(run)])
    assert "Held-out pass@1" in (run / "report" / "report.md").read_text()

    sft_data = tmp_path / "pc.jsonl"
    sft_data.write_text(json.dumps({"prompt": "Natalia sold 3 clips. How many?",
                                    "completion": "<think> 3 </think> <answer>3</answer>"}) + "\n")
    main(["sft", "--model", str(model), "--data", str(sft_data), "--steps", "1", "--batch-size", "1",
          "--out", str(tmp_path / "runs" / "sft"), "--device", "cpu"])
    assert (tmp_path / "runs" / "sft" / "model" / "model.safetensors").exists()

    testclient = pytest.importorskip("fastapi.testclient")
    from r1lab.serve.app import create_app

    with testclient.TestClient(create_app(run / "model", device="cpu")) as client:
        served = client.get("/v1/models").json()["data"][0]["id"]  # what docs/serving.md's snippet asks the server for
        reply = client.post("/v1/chat/completions", json={"model": served, "max_tokens": 4, "messages": [
            {"role": "user", "content": "Natalia sold 3 clips. How many?"}]})
    assert served == "my-run" and reply.status_code == 200, reply.text  # RUN/model is served as the run's name
    assert set(reply.json()["choices"][0]["message"]) >= {"content", "reasoning_content"}

    monkeypatch.setattr("sys.stdin", io.StringIO("Natalia sold 3 clips. How many?\n/quit\n"))
    main(["chat", "--model", str(run / "model"), "--max-tokens", "4", "--device", "cpu"])
    assert "you> Natalia sold 3 clips" in capsys.readouterr().out
