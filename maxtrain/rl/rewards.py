"""Rewards of RL runs: train.rl.rewards built into one function from completions to numbers.

    rewards = build_rewards(cfg.train.rl.rewards, mesh=exp.mesh, rules=cfg.mesh.rules)
    total, parts = rewards(prompts, completions, records)   # total [n], {name: [n]} float32

Four kinds (maxtrain/rl/config.py): exact_match against a record field, a format regex, a
Python function `module:function` (TRL's calling convention: record fields as keyword lists,
a chat prompt's completion as [{"role": "assistant", "content": text}], so existing reward
functions work unchanged) and a reward model trained by maxtrain (maxtrain/reward_model.py). The total
is the weighted sum; each reward is also returned alone under its name, for the metrics.

Everything that can be checked before the first rollout is checked in build_rewards (a bad
regex, a function that cannot be imported, a duplicate name), so a run fails in its first
second, not after minutes of sampling. What a user's function returns is checked on every
call: a wrong length, a non-number or NaN is one UserError line naming the reward.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
from typing import Any, Callable, Sequence

import numpy as np

from maxtrain.errors import UserError

# Record keys a reward function does not receive as keyword fields: the prompt is its first
# argument already, and keys named like the positional parameters would collide with them.
_NOT_FIELDS = ("prompt", "prompts", "completions")


def _first_line(text: str, limit: int = 200) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


class _ExactMatch:
    def __init__(self, cfg, where: str, label: str):
        self.field, self.where, self.label = cfg.field, where, label

    def __call__(self, prompts, completions, records) -> np.ndarray:
        out = np.zeros(len(completions), np.float32)
        for i, (c, rec) in enumerate(zip(completions, records)):
            if not isinstance(rec, dict) or self.field not in rec:
                keys = ", ".join(map(str, rec)) if isinstance(rec, dict) else type(rec).__name__
                raise UserError(f"{self.label}: a prompt record has no field {self.field!r} (it has: {keys}); add "
                                f"{self.field!r} to every record or set {self.where}.field to the answer's key")
            out[i] = float(c.strip() == str(rec[self.field]).strip())
        return out


class _Format:
    def __init__(self, cfg, where: str, label: str):
        try:
            self.regex = re.compile(cfg.pattern)
        except re.error as e:
            raise UserError(f"{label}: {where}.pattern {cfg.pattern!r} is not a regular expression ({e}); "
                            "fix the pattern") from None

    def __call__(self, prompts, completions, records) -> np.ndarray:
        return np.asarray([self.regex.fullmatch(c.strip()) is not None for c in completions], np.float32)


def import_reward_function(spec: str, where: str) -> Callable:
    """The callable `module:function` names, imported from sys.path or the current directory.

    where: the config path of the setting, for the error messages.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name.strip() or not attr.strip() or ":" in attr:
        raise UserError(f"{where}.function={spec!r} must be 'module:function' (e.g. my_rewards:correct_answer)")
    module_name, attr = module_name.strip(), attr.strip()
    cwd = os.getcwd()
    # The `maxtrain` console script's sys.path lacks the current directory (python -m has it);
    # a reward module next to the config is the common case, so look there last.
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise UserError(f"{where}.function={spec!r}: no module {module_name!r} on sys.path or in the current "
                            f"directory ({cwd}); put {module_name.split('.')[0]}.py there, add its folder to "
                            "PYTHONPATH or install it") from None
        raise UserError(f"{where}.function={spec!r}: importing {module_name!r} raised ModuleNotFoundError: "
                        f"{_first_line(e)}; install what it imports") from None
    except Exception as e:  # any error in the user's module is theirs to fix
        raise UserError(f"{where}.function={spec!r}: importing {module_name!r} raised {type(e).__name__}: "
                        f"{_first_line(e)}; fix the module") from None
    finally:
        if added:
            sys.path.remove(cwd)
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            found = getattr(module, "__file__", None) or module_name
            raise UserError(f"{where}.function={spec!r}: {found} has no {attr!r}; check the function's name")
        fn = getattr(fn, part)
    if not callable(fn):
        raise UserError(f"{where}.function={spec!r} is a {type(fn).__name__}, not a function")
    return fn


def record_fields(records: Sequence[dict]) -> dict[str, list]:
    """Every record key (but the prompt) -> its values over the batch, in order (None where a record lacks it)."""
    keys: dict[str, None] = {}
    for rec in records:
        if isinstance(rec, dict):
            keys.update(dict.fromkeys(k for k in rec if k not in _NOT_FIELDS))
    return {k: [rec.get(k) if isinstance(rec, dict) else None for rec in records] for k in keys}


class _Function:
    def __init__(self, cfg, where: str, label: str):
        self.fn, self.label = import_reward_function(cfg.function, where), label

    def __call__(self, prompts, completions, records) -> np.ndarray:
        n = len(completions)
        # TRL's convention: a chat prompt's completion is the assistant message, a text prompt's the text.
        given = [[{"role": "assistant", "content": c}] if isinstance(p, list) else c for p, c in zip(prompts, completions)]
        try:
            out = self.fn(list(prompts), given, **record_fields(records))
        except Exception as e:
            said = _first_line(e)
            raise UserError(f"{self.label} raised {type(e).__name__}{': ' + said if said else ''}; fix the function") from None
        if isinstance(out, np.ndarray) and out.ndim != 1:
            raise UserError(f"{self.label} returned an array of shape {out.shape}; return one number per completion "
                            f"({n})")
        if isinstance(out, (str, bytes, dict)) or not isinstance(out, (Sequence, np.ndarray)):
            raise UserError(f"{self.label} returned {type(out).__name__}; return a list of one number per "
                            f"completion ({n})")
        if len(out) != n:
            raise UserError(f"{self.label} returned {len(out)} values for {n} completions; return one number per "
                            "completion")
        values = np.zeros(n, np.float32)
        for i, v in enumerate(out):
            try:
                if v is None or isinstance(v, (str, bytes)):
                    raise TypeError
                x = float(v)
            except (TypeError, ValueError):
                raise UserError(f"{self.label} returned a non-number at index {i} ({_first_line(repr(v), 60)}); "
                                "return floats") from None
            if not math.isfinite(x):
                raise UserError(f"{self.label} returned {x} at index {i}; return finite numbers") from None
            values[i] = x
        return values


class _Model:
    def __init__(self, cfg, where: str, label: str, *, mesh, rules):
        from maxtrain.reward_model import RewardModel

        self.label = label
        try:
            self.model = RewardModel.load(cfg.path, mesh=mesh, rules=rules)
        except UserError as e:
            raise UserError(f"{label}: {e}") from None

    def __call__(self, prompts, completions, records) -> np.ndarray:
        # Chat-message prompts go on as they are: the reward model renders them with its own template.
        scores = np.asarray(self.model.score(list(prompts), list(completions)), np.float32)
        if not np.isfinite(scores).all():
            raise UserError(f"{self.label} scored a completion {scores[~np.isfinite(scores)][0]}; the reward model's "
                            "weights are broken (retrain it, or check its checkpoint)")
        return scores


# One row per reward type of maxtrain/rl/config.py: (cfg, where, label, mesh=, rules=) -> reward.
_KINDS: dict[str, Callable] = {
    "exact_match": lambda cfg, where, label, **_: _ExactMatch(cfg, where, label),
    "format": lambda cfg, where, label, **_: _Format(cfg, where, label),
    "function": lambda cfg, where, label, **_: _Function(cfg, where, label),
    "model": _Model,
}


def _default_name(cfg) -> str:
    if cfg.name:
        return cfg.name
    if cfg.type == "function":
        return cfg.function.rpartition(":")[2].rpartition(".")[2].strip() or "function"
    return cfg.type


class RewardSet:
    """The run's rewards as one function: (prompts, completions, records) -> (total, {name: reward}).

    names: the metric names, in config order, unique.
    """

    def __init__(self, rewards: Sequence[tuple[str, float, Callable]]):
        self._rewards = tuple(rewards)
        self.names: tuple[str, ...] = tuple(name for name, _, _ in self._rewards)
        self.weights: tuple[float, ...] = tuple(float(w) for _, w, _ in self._rewards)

    def __len__(self) -> int:
        return len(self._rewards)

    def __call__(self, prompts: list, completions: list[str],
                 records: list[dict]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(total [n] float32 = sum of weight x reward, {name: reward [n] float32}).

        prompts: each record's prompt as the record has it (a string or chat messages);
        completions: the decoded completions (no EOS); records: the prompts' records, one per
        completion (a group's record repeats). Model rewards are collective across processes:
        every process calls this at the same point with its own rows.
        """
        n = len(completions)
        if len(prompts) != n or len(records) != n:
            raise ValueError(f"rewards need one prompt and record per completion ({len(prompts)} prompts, "
                             f"{len(records)} records, {n} completions)")
        total = np.zeros(n, np.float32)
        parts: dict[str, np.ndarray] = {}
        for name, weight, reward in self._rewards:
            values = np.asarray(reward(prompts, completions, records), np.float32)
            parts[name] = values
            total += np.float32(weight) * values
        return total, parts


def build_rewards(cfgs: Sequence[Any], *, mesh=None, rules=None) -> RewardSet:
    """The RewardSet of train.rl.rewards: imports functions, compiles patterns, loads reward models.

    mesh, rules: where model rewards put their params (default: every device, default rules).
    """
    if not cfgs:
        raise UserError("train.rl.rewards is empty; add at least one reward, e.g. "
                        "train.rl.rewards=[{type: exact_match, field: answer}] or [{type: function, function: my_rewards:score}]")
    seen: dict[str, int] = {}
    rewards = []
    for i, cfg in enumerate(cfgs):
        where = f"train.rl.rewards[{i}]"
        name = _default_name(cfg)
        if name in seen:
            raise UserError(f"two rewards are named {name!r} (train.rl.rewards[{seen[name]}] and [{i}]); set a "
                            "distinct `name` on each")
        seen[name] = i
        detail = getattr(cfg, "function", None) or getattr(cfg, "path", None)  # what the user wrote, for errors
        label = f"reward {name!r}" + (f" ({detail})" if detail else "")
        fn = _KINDS[cfg.type](cfg, where, label, mesh=mesh, rules=rules)
        rewards.append((name, cfg.weight, fn))
    return RewardSet(rewards)
