"""KV-cache sampling: one jitted prefill, then one jitted `lax.while_loop` of decode steps.

Prompts of different lengths share a batch: they are right-padded to a common length, and
row b's next token goes to cache slot (= position) len_b, len_b + 1, ... so each row
attends only to its own prompt and tokens (see Attention._update_cache). The loop ends
when every row has produced an end-of-sequence token or the token limit is reached.
Params keep the shardings of training (same mesh and logical-axis rules); the cache is
sharded over batch and kv heads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maxtrain.data.jsonl import read_jsonl
from maxtrain.errors import UserError
from maxtrain.model.config import ModelConfig
from maxtrain.model.transformer import Transformer

log = logging.getLogger("maxtrain.generate")
_PROMPT_BUCKET = 16  # prompt lengths round up to a multiple of this: fewer distinct compiles


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        """UserErrors for settings that make no sense."""
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")


def filtered_logits(logits_BxV: jax.Array, s: Sampling) -> jax.Array:
    """Logits divided by the temperature, with tokens outside top-k / the top-p nucleus set to -inf."""
    logits_BxV = logits_BxV.astype(jnp.float32) / s.temperature
    neg_inf = jnp.finfo(jnp.float32).min
    if s.top_k:
        kth_Bx1 = jax.lax.top_k(logits_BxV, min(s.top_k, logits_BxV.shape[-1]))[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, neg_inf, logits_BxV)
    if s.top_p < 1.0:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        # Keep a token while the mass strictly before it is below top_p (so at least one stays).
        mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        kept = jnp.sum(mass_before_BxV < s.top_p, axis=-1, keepdims=True)
        threshold_Bx1 = jnp.take_along_axis(sorted_BxV, kept - 1, axis=-1)
        logits_BxV = jnp.where(logits_BxV < threshold_Bx1, neg_inf, logits_BxV)
    return logits_BxV


def sample_tokens(logits_BxV: jax.Array, rng: jax.Array, s: Sampling) -> jax.Array:
    """Next token ids_B: argmax when temperature is 0, else a draw from the filtered distribution."""
    if s.temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, filtered_logits(logits_BxV, s), axis=-1).astype(jnp.int32)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype) -> dict:
    """Zeroed KV cache {"layers": {"attn": {"cached_k", "cached_v"}}}, each [L, B, K, T, H] (the "cache" collection).

    Heads come before slots (T) so attention reads a layer's keys and values as they lie.
    """
    shape = (cfg.num_layers, batch, cfg.kv_heads, length, cfg.dim_per_head)
    return {"layers": {"attn": {"cached_k": jnp.zeros(shape, dtype), "cached_v": jnp.zeros(shape, dtype)}}}


def _unstack_layers(tree, num_layers: int) -> list:
    """The per-layer trees of a tree of stacked [L, ...] leaves."""
    return [jax.tree.map(lambda x: x[layer], tree) for layer in range(num_layers)]


def _stack_layers(trees: list):
    """The tree of stacked [L, ...] leaves of per-layer trees (inverse of _unstack_layers)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


class Generator:
    """Batched generation for one model: params (sharded), mesh, compute dtype; compiles once per shape."""

    def __init__(self, cfg: ModelConfig, params: Any, *, mesh: jax.sharding.Mesh, rules, dtype=jnp.float32):
        self.cfg, self.params, self.mesh, self.rules, self.dtype = cfg, params, mesh, rules, dtype
        # Unrolled layers: a decode step then reads each layer's weights and cache from its own
        # buffer (see _decode), where a scan slices (copies) them out of the stacked arrays.
        self.model = Transformer(cfg, dtype=dtype, decode=True, unroll_layers=True)
        self._compiled: dict = {}

    def _forward(self, params, cache, tokens_BxS, positions_BxS):
        with nn.logical_axis_rules(self.rules):
            hidden_BxSxD, mutated = self.model.apply(
                {"params": params, "cache": cache}, tokens_BxS, positions_BxS, return_hidden=True, mutable=["cache"]
            )
        return hidden_BxSxD, mutated["cache"]

    def _logits(self, params, hidden_BxD):
        with nn.logical_axis_rules(self.rules):
            return self.model.apply({"params": params}, hidden_BxD[:, None], method=Transformer.logits)[:, 0]

    def _prefill(self, params, cache, tokens_BxP, lengths_B):
        positions_BxP = jnp.broadcast_to(jnp.arange(tokens_BxP.shape[1]), tokens_BxP.shape)
        hidden_BxPxD, cache = self._forward(params, cache, tokens_BxP, positions_BxP)
        last_BxD = hidden_BxPxD[jnp.arange(tokens_BxP.shape[0]), lengths_B - 1]
        return self._logits(params, last_BxD), cache

    def _decode(self, params, cache, logits_BxV, lengths_B, rng, *, s: Sampling, eos_ids: tuple[int, ...], pad_id: int):
        batch = logits_BxV.shape[0]
        eos_E = jnp.asarray(eos_ids or (-1,), jnp.int32)

        def cond(carry):
            i, _, _, _, done_B, _, _ = carry
            return (i < s.max_new_tokens) & ~jnp.all(done_B)

        # The loop keeps each layer's weights and cache in a buffer of its own and stacks them
        # only as the model's input: with the layers unrolled, XLA folds slice(concatenate(...))
        # away, so every layer reads its weights and keys/values as they lie and the cache
        # scatter writes in place. Stacked [L, ...] arrays would instead be sliced, i.e. copied,
        # layer by layer at every step: the weights and the whole cache, several times the
        # work of a small batch's decode step.
        layer_params = _unstack_layers(params["layers"], self.cfg.num_layers)

        def body(carry):
            i, layer_caches, logits_BxV, positions_B, done_B, rng, out_BxN = carry
            rng, step_rng = jax.random.split(rng)
            tokens_B = jnp.where(done_B, pad_id, sample_tokens(logits_BxV, step_rng, s))
            out_BxN = out_BxN.at[:, i].set(tokens_B)
            done_B = done_B | jnp.isin(tokens_B, eos_E)
            step_params = {**params, "layers": _stack_layers(layer_params)}
            step_cache = {**cache, "layers": _stack_layers(layer_caches)}
            hidden_Bx1xD, step_cache = self._forward(step_params, step_cache, tokens_B[:, None], positions_B[:, None])
            layer_caches = _unstack_layers(step_cache["layers"], self.cfg.num_layers)
            logits_BxV = self._logits(step_params, hidden_Bx1xD[:, 0])
            return i + 1, layer_caches, logits_BxV, positions_B + 1, done_B, rng, out_BxN

        out_BxN = jnp.full((batch, s.max_new_tokens), pad_id, jnp.int32)
        layer_caches = _unstack_layers(cache["layers"], self.cfg.num_layers)
        init = (jnp.int32(0), layer_caches, logits_BxV, lengths_B, jnp.zeros((batch,), bool), rng, out_BxN)
        steps, layer_caches, *_, out_BxN = jax.lax.while_loop(cond, body, init)
        # The cache goes out as well, so the donated input cache has a use (an unused donation
        # is a JAX warning).
        return out_BxN, steps, {**cache, "layers": _stack_layers(layer_caches)}

    def _functions(self, batch: int, prompt_len: int, s: Sampling, eos_ids, pad_id):
        s = dataclasses.replace(s, seed=0)  # the seed is an argument, not part of the program
        key = (batch, prompt_len, s, eos_ids, pad_id)
        if key not in self._compiled:
            decode = jax.jit(lambda p, c, lg, ln, r: self._decode(p, c, lg, ln, r, s=s, eos_ids=eos_ids, pad_id=pad_id), donate_argnums=1)
            self._compiled[key] = (jax.jit(self._prefill, donate_argnums=1), decode)
        return self._compiled[key]

    def _cache_sharding(self, shape):
        from jax.sharding import NamedSharding

        from maxtrain.mesh import logical_to_spec

        axes = ("layers", "activation_batch", "kv_heads", "activation_length", "head_dim")
        return NamedSharding(self.mesh, logical_to_spec(axes, shape, self.mesh, self.rules))

    def sample(self, params, tokens_BxP: np.ndarray, lengths_B: np.ndarray, s: Sampling, rng: jax.Array, *,
               eos_ids: Sequence[int] = (), pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
        """(new tokens [B, max_new_tokens] (pad after a row's end), decode steps run) for right-padded prompts.

        params: any weights of this model, e.g. a training run's current ones (same shardings;
        nothing is copied). Every process passes the same prompts; the output stays on the
        devices, sharded over the batch like the cache. One compile per (batch, prompt width).
        """
        batch, prompt_len = tokens_BxP.shape
        from maxtrain.finetune.registry import virtual_tokens

        cache_len = virtual_tokens(self.cfg) + prompt_len + s.max_new_tokens
        prefill, decode = self._functions(batch, prompt_len, s, tuple(int(e) for e in eos_ids), int(pad_id))
        with jax.set_mesh(self.mesh):
            shape = (self.cfg.num_layers, batch, self.cfg.kv_heads, cache_len, self.cfg.dim_per_head)
            cache = jax.device_put(init_cache(self.cfg, batch, cache_len, self.dtype), self._cache_sharding(shape))
            logits, cache = prefill(params, cache, jnp.asarray(tokens_BxP), jnp.asarray(lengths_B))
            out, steps, _ = decode(params, cache, logits, jnp.asarray(lengths_B), rng)
        return out, steps

    def generate(self, prompts: Sequence[Sequence[int]], s: Sampling, *, eos_ids: Sequence[int] = (), pad_id: int = 0) -> list[list[int]]:
        """New tokens for each prompt (ids), ending with the first end-of-sequence token when one is produced."""
        s.check()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("every prompt needs at least one token")
        lengths = np.array([len(p) for p in prompts], np.int32)
        longest = int(lengths.max())
        from maxtrain.finetune.registry import virtual_tokens

        virtual = virtual_tokens(self.cfg)  # a soft prompt or prefix takes cache slots 0..P-1 (positions shift by P)
        limit = self.cfg.max_seq_len - virtual if self.cfg.positions == "learned" else None
        if limit is not None and longest + s.max_new_tokens > limit:
            raise UserError(
                f"prompt ({longest} tokens) + --max-new-tokens {s.max_new_tokens} exceeds the model's "
                f"{limit} learned positions; shorten the prompt or ask for fewer tokens"
            )
        prompt_len = -(-longest // _PROMPT_BUCKET) * _PROMPT_BUCKET
        if limit is not None:
            prompt_len = min(prompt_len, limit - s.max_new_tokens)  # padded positions must exist too
        tokens = np.full((len(prompts), prompt_len), pad_id, np.int32)
        for row, p in enumerate(prompts):
            tokens[row, : len(p)] = p
        out, steps = self.sample(self.params, tokens, lengths, s, jax.random.PRNGKey(s.seed), eos_ids=eos_ids, pad_id=pad_id)
        out = np.asarray(out)[:, : int(steps)]
        results = []
        for row in out:
            ids = row.tolist()
            ends = [i for i, t in enumerate(ids) if t in set(eos_ids)]
            results.append(ids[: ends[0] + 1] if ends else ids)
        return results


def load_generator(path: str, *, dtype: str = "auto", devices=None) -> tuple[Generator, Any, dict]:
    """(Generator, tokenizer or None, metadata) for a run dir, a checkpoint step dir or an export.

    devices: the mesh's devices (default: all), params sharded over them by the default mesh rules.
    """
    from maxtrain.checkpoint.params import load_params_onto, model_config_of
    from maxtrain.checkpoint.source import resolve_model
    from maxtrain.config import MeshConfig
    from maxtrain.experiment import compute_dtype
    from maxtrain.mesh import build_mesh

    source = resolve_model(path)  # once: a run that checkpoints meanwhile does not switch steps under us
    meta = source.metadata()
    cfg = model_config_of(meta)  # LoRA runs generate with their adapters; a head is loaded but unused
    mesh_cfg = MeshConfig()
    mesh = build_mesh(mesh_cfg, devices)
    params = load_params_onto(source.params_dir.parent, cfg, mesh, mesh_cfg.rules)
    generator = Generator(cfg, params, mesh=mesh, rules=mesh_cfg.rules, dtype=compute_dtype(dtype))
    return generator, source.tokenizer(), meta


def special_ids(tokenizer, meta: dict) -> tuple[list[int], int, bool]:
    """(end-of-sequence ids, pad id, whether prompts start with BOS) for a checkpoint's tokenizer."""
    hf = meta.get("hf_tokenizer")
    if hf is not None:
        eos = list(hf.get("eos_token_id") or ([tokenizer.eos_id] if tokenizer else []))
        pad = hf.get("pad_token_id")
        return eos, pad if pad is not None else (eos[0] if eos else 0), bool(hf.get("add_bos"))
    return [tokenizer.eos_id], tokenizer.pad_id, True  # maxtrain packs every document as BOS + text + EOS


def continuation(tokenizer, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """The text the new tokens add after the prompt (with the space a word-initial piece carries).

    Decoding the new tokens alone would drop that leading space (sentencepiece strips it at
    the start of a text); the difference of two decodes keeps it.
    """
    before = tokenizer.decode(list(prompt_ids))
    after = tokenizer.decode(list(prompt_ids) + list(new_ids))
    return after[len(before):] if after.startswith(before) else tokenizer.decode(list(new_ids))


def _read_prompts(ns: argparse.Namespace) -> list[str]:
    if ns.prompts is None:
        return [ns.prompt]
    prompts = []
    hint = 'pass a JSON Lines file with one {"prompt": ...} per line'
    for n, record in read_jsonl(ns.prompts, what="prompts file", hint=hint):
        text = record if isinstance(record, str) else record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise UserError(f"{ns.prompts}:{n} has no string \"prompt\" field")
        prompts.append(text)
    return prompts


def _cmd_generate(ns: argparse.Namespace) -> int:
    sampling = Sampling(ns.max_new_tokens, ns.temperature, ns.top_k, ns.top_p, ns.seed)
    sampling.check()
    prompts = _read_prompts(ns)
    generator, tokenizer, meta = load_generator(ns.checkpoint)
    if tokenizer is None:
        from maxtrain.checkpoint.source import resolve_model

        resolve_model(ns.checkpoint).require_tokenizer()  # raises, naming where it looked
    if not generator.cfg.causal:
        raise UserError("this model is an encoder (model.causal: false) and cannot generate text; use `maxtrain fill-mask`")
    eos, pad, add_bos = special_ids(tokenizer, meta)
    ids = [([tokenizer.bos_id] if add_bos else []) + tokenizer.encode(p) for p in prompts]
    outputs = []
    for start in range(0, len(ids), ns.batch_size):
        outputs += generator.generate(ids[start : start + ns.batch_size], sampling, eos_ids=eos, pad_id=pad)
    for prompt, prompt_ids, new in zip(prompts, ids, outputs):
        text = continuation(tokenizer, prompt_ids[int(add_bos):], [t for t in new if t not in eos])
        if ns.prompts is not None:
            print(json.dumps({"prompt": prompt, "completion": text, "new_tokens": len(new)}))
        else:  # the completion alone, so it is never mistaken for the prompt; --echo shows both
            print(prompt + text if ns.echo else text)
    sys.stdout.flush()
    return 0


def register_commands(sub) -> None:
    """Add `maxtrain generate` to the CLI's subparsers."""
    p = sub.add_parser("generate", help="sample text from a checkpoint with a KV cache")
    p.add_argument("--checkpoint", required=True,
                   help="run dir (newest checkpoint), checkpoint step dir, or export (maxtrain export / convert from-hf)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompts", help="JSON Lines file of {\"prompt\": ...}; prints one JSON line per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 disables")
    p.add_argument("--top-p", type=float, default=1.0, help="1 disables")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--echo", action="store_true", help="--prompt: print the prompt before the completion")
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together (--prompts)")
    p.set_defaults(func=_cmd_generate)

