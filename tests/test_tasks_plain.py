"""`maxtrain tasks plain`: the task suite solved in plain text for pretraining a base that has the
skills (the finetuning-methods table's base); every line is right and no held-out prompt appears."""

import json

from maxtrain.cli import main
from maxtrain.tasks.synthetic import PLAIN_FORMS, TASKS, plain_records


def _check(line: str) -> None:
    """Re-solve one plain line ("reverse d h b -> b h d") and compare with the answer it states."""
    prompt, answer = line.split(" -> ")
    task, given = prompt.split(" ", 1)
    if task == "reverse":
        assert answer.split() == given.split()[::-1]
    elif task == "sort":
        assert answer.split() == sorted(given.split())
    elif task == "add":
        a, b = given.split(" + ")
        assert int(answer.replace(" ", "")) == int(a.replace(" ", "")) + int(b)
    else:
        key, table = given.split(" in ")
        words = table.split()
        assert {words[i]: words[i + 2] for i in range(0, len(words), 3)}[key] == answer, line


def test_plain_lines_are_solved_and_cover_every_task():
    docs = plain_records(20, seed=3, lines=8)
    lines = [line for d in docs for line in d["text"].split("\n")]
    assert len(lines) == 160
    for line in lines:
        _check(line)
    assert set(PLAIN_FORMS) == set(TASKS)
    assert sum(line.startswith("reverse ") for line in lines) == 40  # tasks in turn


def test_plain_excludes_held_out_prompts(tmp_path):
    assert main(["tasks", "make", str(tmp_path), "--train", "40", "--eval", "400"]) == 0
    held = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert main(["tasks", "plain", str(tmp_path / "plain.jsonl"), "--docs", "300", "--exclude", str(tmp_path / "eval.jsonl")]) == 0
    text = "\n".join(json.loads(line)["text"] for line in (tmp_path / "plain.jsonl").read_text().splitlines())
    lines = set(text.split("\n"))
    assert len(lines) > 1000
    held_lines = {PLAIN_FORMS[r["task"]](r["instruction"], r["output"]) for r in held}
    assert not held_lines & lines
    # without the exclusion the same draw meets held-out prompts (the check above is not vacuous)
    free = {line for d in plain_records(300, seed=100) for line in d["text"].split("\n")}
    assert held_lines & free


def test_plain_bad_input_is_one_line(tmp_path, capsys):
    assert main(["tasks", "plain", str(tmp_path / "p.jsonl"), "--exclude", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["tasks", "plain", str(tmp_path / "p.jsonl"), "--tasks", "reverse,divide"]) == 2
    assert "divide" in capsys.readouterr().err
