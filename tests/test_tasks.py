"""The synthetic task suite: answers are right, held-out prompts never appear in training."""

import json

import pytest

from maxtrain.tasks.synthetic import TASKS, write_suite


def _check_answer(rec):
    words = rec["instruction"].split(": ", 1)[1].split()
    out = rec["output"].split()
    task = rec["task"]
    if task == "reverse":
        return out == words[::-1]
    if task == "sort":
        return out == sorted(words)
    if task == "add":
        plus = words.index("+")
        return "".join(out) == str(int("".join(words[:plus])) + int("".join(words[plus + 1 :])))
    key = rec["instruction"].split()[1]  # "lookup KEY in: k = v k = v ..."
    table = dict(zip(words[0::3], words[2::3]))
    return out == [table[key]]


def test_suite_answers_are_right_and_held_out_prompts_are_unseen(tmp_path):
    paths = write_suite(tmp_path, train=2000, eval=200, seed=0)
    train, held_out = ([json.loads(line) for line in paths[k].read_text().splitlines()] for k in ("train", "eval"))
    assert len(train) == 2000 and len(held_out) == 200
    assert {r["task"] for r in held_out} == set(TASKS)
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in held_out}
    assert all(_check_answer(r) for r in train + held_out)
    cls_train, cls_eval = ([json.loads(line) for line in paths[k].read_text().splitlines()] for k in ("cls_train", "cls_eval"))
    assert not {r["text"] for r in cls_train} & {r["text"] for r in cls_eval}
    assert {r["label"] for r in cls_eval} == {0, 1, 2}


def test_asking_for_more_prompts_than_a_task_has_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="cannot draw"):
        write_suite(tmp_path, train=1100, eval=20, seed=0, tasks=("add",))  # add has 1000 prompts
