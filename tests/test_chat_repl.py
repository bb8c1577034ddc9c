"""``generate.py chat=true``: history, /system, /reset, end-of-turn stops, context trimming, and a real pipe."""

from __future__ import annotations

import io
import subprocess
import sys

from llm_lightning.prompts import get_template
from llm_lightning.tools.chat import _fit, chat
from tests.train_runner import REPO


def test_history_system_and_reset(default_model):
    model, tokenizer = default_model
    lines = ["What is the capital of France?", "And of Italy?", "/system You are a pirate.", "Hi", "/reset",
             "/bogus", "Bye", "/exit", "never read"]
    out, log = io.StringIO(), io.StringIO()
    transcript = chat(model, tokenizer, get_template("auto", tokenizer), lines, out=out, log=log, max_new_tokens=12)
    assert len(transcript) == 4
    first, second, third, fourth = transcript
    assert "Paris" in first["reply"]
    assert second["messages"] == [{"role": "user", "content": "What is the capital of France?"},
                                  {"role": "assistant", "content": first["reply"]},
                                  {"role": "user", "content": "And of Italy?"}]
    assert third["messages"] == [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"}]
    assert fourth["messages"] == [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Bye"}]
    assert out.getvalue() == "".join(turn["reply"] + "\n" for turn in transcript)
    assert "<|im_end|>" not in out.getvalue()  # each reply stopped at the end-of-turn token
    assert "[conversation cleared]" in log.getvalue() and "unknown command /bogus" in log.getvalue()


def test_oldest_exchanges_are_dropped_to_fit_the_context(default_model):
    _, tokenizer = default_model
    template = get_template("auto", tokenizer)
    messages = [{"role": "system", "content": "Be brief."}]
    for index in range(6):
        messages += [{"role": "user", "content": f"Question {index}? " * 20},
                     {"role": "assistant", "content": f"Answer {index}. " * 20}]
    messages.append({"role": "user", "content": "Last question?"})
    room = len(tokenizer.encode(template.prompt(messages[:1] + messages[-5:]), bos=True))
    fitted = _fit(messages, template, tokenizer, room)
    assert fitted == messages[:1] + messages[-5:]


def test_chat_through_a_pipe():
    result = subprocess.run([sys.executable, "generate.py", "chat=true", "max_new_tokens=8"], cwd=REPO,
                            input="What is the capital of France?\n/reset\nName a color.\n", capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    replies = result.stdout.splitlines()
    assert len(replies) == 2 and all(replies) and "Paris" in replies[0]
    assert "[conversation cleared]" in result.stderr and "Traceback" not in result.stderr
