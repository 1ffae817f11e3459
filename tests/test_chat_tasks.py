"""scripts/make_chat_tasks.py: the chat proof's conversation set is deterministic, well formed,
and its held-out instances never occur in training."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from gpt2.chat import check_messages

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_chat_tasks.py"


@pytest.fixture(scope="module")
def tasks():
    spec = importlib.util.spec_from_file_location("make_chat_tasks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sets(tasks):
    return tasks.make_sets(seed=0, train_per_task=600, heldout_per_task=40)


def question(c) -> str:
    return c["messages"][0]["content"]


def answer(c) -> str:
    return c["messages"][1]["content"]


def test_same_seed_same_bytes_other_seed_other_sets(tasks, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 0), (b, 0), (c, 1)):
        args = ["--out", str(out), "--seed", str(seed), "--train-per-task", "300"]
        assert tasks.main(args + ["--heldout-per-task", "20"]) == 0
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()
    lines = (a / "heldout.jsonl").read_text().splitlines()
    assert len(lines) == 20 * len(tasks.DEFAULT_TASKS)
    assert all(list(json.loads(line)) == ["messages"] for line in lines)
    assert len((a / "train.jsonl").read_text().splitlines()) == 300 * len(tasks.DEFAULT_TASKS)


def test_conversations_are_openai_messages_with_the_right_answer(tasks, sets):
    train, heldout = sets
    counts = {}
    for c in train + heldout:
        assert list(c) == ["messages"]
        assert [m["role"] for m in check_messages(c["messages"])] == ["user", "assistant"]
        name = tasks.task_of(question(c))
        counts[name] = counts.get(name, 0) + 1
        items = question(c).split(":", 1)[-1].rstrip("?").split()
        if name == "repeat":
            assert answer(c) == " ".join(items)
        elif name == "reverse_words":
            assert answer(c) == " ".join(items[::-1])
        elif name == "count_words":
            assert answer(c) == str(len(items))
        elif name == "uppercase":
            assert answer(c) == " ".join(items).upper()
        elif name == "reverse_letters":
            assert answer(c) == " ".join(items[::-1])
        elif name == "larger":
            a, b = map(int, re.findall(r"\d+", question(c)))
            assert answer(c) == str(max(a, b))
    assert counts == {name: 640 for name in tasks.DEFAULT_TASKS}


def test_heldout_instances_never_occur_in_training(tasks, sets):
    train, heldout = sets

    def instance(c):
        """What a question is about: its set of words, its letters, its pair of numbers."""
        name, text = tasks.task_of(question(c)), question(c)
        if name == "larger":
            return ("pair", frozenset(re.findall(r"\d+", text)))
        items = text.split(":", 1)[-1].rstrip("?").split()
        if name in ("uppercase", "reverse_letters"):
            return ("letters", "".join(items))
        return ("words", frozenset(items))

    seen = {instance(c) for c in train}
    assert not [question(c) for c in heldout if instance(c) in seen]
    assert not {question(c) for c in heldout} & {question(c) for c in train}
    assert len({question(c) for c in heldout}) == len(heldout)  # no question twice


def test_addition_on_request_and_bad_options_refused(tasks, tmp_path, capsys):
    train, heldout = tasks.make_sets(seed=3, train_per_task=50, heldout_per_task=5, tasks=["add"])
    for c in train + heldout:
        a, b = (int(n.replace(" ", "")) for n in re.findall(r"\d(?: \d)+", question(c)))
        assert answer(c) == " ".join(str(a + b))
    assert tasks.main(["--out", str(tmp_path), "--tasks", "divide"]) == 1
    assert "unknown task(s) divide" in capsys.readouterr().err
    assert tasks.main(["--out", str(tmp_path), "--train-per-task", "0"]) == 1
    assert not (tmp_path / "train.jsonl").exists()
