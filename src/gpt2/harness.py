"""Our `GPT` as an lm-evaluation-harness model: any harness task, no Hugging Face export step.

lm-eval (EleutherAI's lm-evaluation-harness) turns every task into requests of three kinds and
asks a model object to answer them; `HarnessModel` answers them with our model and tokenizer:

``loglikelihood``
    (context, continuation) pairs: the log-probability of the continuation's tokens and whether
    each one is the most likely token (LAMBADA's ``acc``, every multiple-choice task).
``loglikelihood_rolling``
    whole documents, cut by the harness's own rolling windows into pairs like the above
    (WikiText's ``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``).
``generate_until``
    a prompt, stop strings and a token budget: the completion, by `gpt2.generate.complete`'s
    KV-cache decoding (greedy unless the task asks to sample).

The requests are encoded and windowed exactly as lm-eval's Hugging Face model (``--model hf``)
does it, so that the same weights give the same figures through either; the tests check that to
1e-4. Where the figures come from the same arithmetic, the work is less:

- the scoring passes take rows sorted by length, longest first, so that a batch pads to its first
  row and the rows of a batch are about as long;
- requests whose model inputs are the same tokens (a multiple-choice task's one-token answers,
  a LAMBADA word split differently) share one row;
- the output head and log-softmax run only at the positions whose tokens are scored, not at every
  context position (most of a LAMBADA row), which is where the Hugging Face path spends much of
  its time: a (rows x length x 50257) log-softmax.

Imports lm-eval at the top: `gpt2.commands.eval` imports this module only for ``--harness``, and
turns a missing lm-eval into one line saying what to install.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from gpt2.errors import UserError
from gpt2.generate import SamplingParams, complete
from gpt2.model import GPT
from gpt2.tokenizer import EOT_TEXT, GPT2Tokenizer, Tokenizer

# What lm-eval's Hugging Face model allows a task to generate when it names no budget.
DEFAULT_MAX_GEN_TOKS = 256

# Scored positions per output-head call: (HEAD_ROWS x 50257) float32 logits are 50 MB.
HEAD_ROWS = 256

# One pair to score: (the request's strings, or None for a rolling window), context ids,
# continuation ids; the harness's own shape for it.
Pair = tuple[tuple[str, str] | None, list[int], list[int]]


def final_hidden(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The last LayerNorm's output (B, T, C) for ``idx`` (B, T): `GPT.forward` without the
    output head, so that the head runs on the scored positions alone (see the module docstring).
    """
    t = model.transformer
    pos = torch.arange(idx.size(1), dtype=torch.long, device=idx.device)
    x = t.drop(t.wte(idx) + t.wpe(pos))
    for i, block in enumerate(t.h):
        x = block(x, None, i)
    return t.ln_f(x)


class HarnessModel(TemplateLM):
    """An lm-eval model (`lm_eval.api.model.TemplateLM`) backed by our `GPT` and `Tokenizer`."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        batch_size: int = 8,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        show_progress: bool = True,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.tokenizer_ = tokenizer
        self.batch_size = batch_size
        self.max_length = model.config.block_size
        self.max_gen_toks = max_gen_toks
        self.vocab = tokenizer.vocab_size  # ids past it (a padded vocabulary) have no text
        self.show_progress = show_progress
        self._device = next(model.parameters()).device

    # ------------------------------------------------------------------ what lm-eval asks of it

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def eot_token_id(self) -> int:
        eot = self.tokenizer_.eot_token
        if eot is None:
            raise UserError(
                "this task needs an end-of-text token (an empty context, a rolling window) "
                "and the model's vocabulary has none"
            )
        return eot

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer_).__name__

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records in its results' ``config``."""
        return {
            "model_num_parameters": self.model.num_parameters(),
            "model_dtype": str(next(self.model.parameters()).dtype),
            "model_config": vars(self.model.config),
        }

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        """Token ids of ``string``. ``<|endoftext|>`` in the text is the special token, as
        Hugging Face's GPT-2 tokenizer reads it (tiktoken would refuse it)."""
        if isinstance(self.tokenizer_, GPT2Tokenizer):
            return self.tokenizer_.encode(string, allowed_special={EOT_TEXT})
        return self.tokenizer_.encode(string)

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer_.decode(ids)

    # ------------------------------------------------------------------ scoring

    def _loglikelihood_tokens(
        self, requests: list[Pair], disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, every token greedy) for each (context, continuation).

        A pair longer than the context window keeps its last ``block_size + 1`` tokens, as the
        harness's Hugging Face model does; the input is those minus the last token.
        """
        rows: dict[tuple[int, ...], list[int]] = defaultdict(list)  # model input -> requests
        targets: list[list[int]] = []
        for i, (_, context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise ValueError("a scored pair needs a context and a continuation")
            whole = (context + continuation)[-(self.max_length + 1) :]
            rows[tuple(whole[:-1])].append(i)
            targets.append(whole[-len(continuation) :])
        inputs = sorted(rows, key=len, reverse=True)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        bar = tqdm(
            total=len(requests),
            desc="loglikelihood",
            disable=disable_tqdm or not self.show_progress,
        )
        for start in range(0, len(inputs), self.batch_size):
            batch = inputs[start : start + self.batch_size]
            members = [(b, i) for b, key in enumerate(batch) for i in rows[key]]
            for (_, i), answer in zip(
                members, self._score_batch(batch, members, targets), strict=True
            ):
                results[i] = answer
                strings = requests[i][0]
                if strings is not None:
                    self.cache_hook.add_partial("loglikelihood", strings, answer)
            bar.update(len(members))
        bar.close()
        return results

    @torch.inference_mode()
    def _score_batch(
        self,
        batch: list[tuple[int, ...]],
        members: list[tuple[int, int]],
        targets: list[list[int]],
    ) -> list[tuple[float, bool]]:
        """One forward pass over the right-padded ``batch`` of inputs (longest first); then the
        head on each member request's scored positions only."""
        T = len(batch[0])
        idx = torch.zeros((len(batch), T), dtype=torch.long)  # padding id 0: causal, never read
        for b, ids in enumerate(batch):
            idx[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        hidden = final_hidden(self.model, idx.to(self.device))  # (B, T, C)
        rows, cols, target_ids = [], [], []
        for b, i in members:
            n, length = len(targets[i]), len(batch[b])
            rows += [b] * n
            cols += range(length - n, length)  # position t predicts token t + 1
            target_ids += targets[i]
        h = hidden[torch.tensor(rows), torch.tensor(cols)]  # (N, C)
        picked, greedy = self._score_positions(h, torch.tensor(target_ids, device=h.device))
        out, at = [], 0
        for _, i in members:
            n = len(targets[i])
            out.append((float(sum(picked[at : at + n])), all(greedy[at : at + n])))
            at += n
        return out

    def _score_positions(self, h: torch.Tensor, targets: torch.Tensor) -> tuple[list, list]:
        """log p(target) and whether it is the most likely id, at each of the (N, C) final
        hidden states ``h``: the head ``HEAD_ROWS`` rows at a time, with a log-sum-exp in place
        of a full log-softmax, so that no (N, V) tensor is made (a rolling window of GPT-2 is
        1024 x 50257 floats: 200 MB per row of the batch)."""
        picked, greedy = [], []
        for start in range(0, h.size(0), HEAD_ROWS):
            logits = self.model.lm_head(h[start : start + HEAD_ROWS])[:, : self.vocab].float()
            tgt = targets[start : start + HEAD_ROWS, None]  # (n, 1)
            logprob = logits.gather(1, tgt)[:, 0] - torch.logsumexp(logits, dim=-1)
            picked += logprob.tolist()
            greedy += (logits.argmax(dim=-1) == tgt[:, 0]).tolist()
        return picked, greedy

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of whole documents: every token scored once, in the harness's
        windows of ``block_size`` tokens (the first after end-of-text); all windows of all
        documents are batched together."""
        windows: list[Pair] = []
        owner: list[int] = []
        for r, req in enumerate(requests):
            (string,) = req.args
            pairs = get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owner, scores, strict=True):
            totals[r] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Completions until a stop string, end-of-text or the token budget, through our
        KV-cache decoding; requests with the same settings are decoded in batches."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        out: list[str] = [""] * len(requests)
        bar = tqdm(
            total=len(requests),
            desc="generate_until",
            disable=disable_tqdm or not self.show_progress,
        )
        for members in groups.values():
            gen_kwargs = requests[members[0]].args[1]
            params, until = self._sampling_params(gen_kwargs)
            budget = self.max_length - params.max_new_tokens
            if budget < 1:
                raise UserError(
                    f"the task asks for {params.max_new_tokens} new tokens; the model's context "
                    f"holds {self.max_length}"
                )
            # The prompt keeps its last tokens so that prompt + completion fit the context, as
            # lm-eval's Hugging Face model cuts it; the longest prompts go first.
            prompts = {i: self.tok_encode(requests[i].args[0])[-budget:] for i in members}
            order = sorted(members, key=lambda i: len(prompts[i]), reverse=True)
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                done = complete(self.model, [prompts[i] for i in chunk], params, self.tokenizer_)
                for i, c in zip(chunk, done, strict=True):
                    out[i] = postprocess_generated_text(c.text or "", until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                bar.update(len(chunk))
        bar.close()
        return out

    def _sampling_params(self, gen_kwargs: dict[str, Any]) -> tuple[SamplingParams, list[str]]:
        """Our decoding settings for a task's ``generation_kwargs``, and its stop strings."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        eot = self.tokenizer_.eot_token
        eos = EOT_TEXT if eot is not None else None
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 1.0)) > 0
        params = SamplingParams(
            max_new_tokens=int(kwargs["max_gen_toks"]),
            temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
            top_k=kwargs.get("top_k") if sample else None,
            top_p=float(kwargs.get("top_p", 1.0)) if sample else 1.0,
            # end-of-text ends a completion on its own; it never appears in the decoded text
            stop=tuple(s for s in until if s and s != eos),
            seed=int(kwargs["seed"]) if sample and "seed" in kwargs else None,
        ).validate()
        return params, until


def evaluate(
    lm: HarnessModel,
    tasks: Sequence[str],
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """lm-eval's results (``results``, ``configs``, ``versions``, ``n-shot``...) for ``tasks``.

    Task names are checked first, so that a typo costs one line rather than a traceback. With
    ``include_path``, tasks found there are loaded from it alone: indexing the harness's own
    thousands of task files takes seconds, and is only done when a task is not found there.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = (
        TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    )
    if manager is None or not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(
            f"unknown lm-eval task(s): {', '.join(unknown)} (`lm-eval ls tasks` lists them; "
            "--include-path DIR adds task YAML files of your own)"
        )
    results = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        batch_size=lm.batch_size,
    )
    if results is None:  # only a non-zero rank of a distributed run gets None
        raise UserError("lm-eval returned no results")
    return dict(results)


def jsonable(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` with what JSON cannot hold (numpy numbers, sets, functions in task configs)
    turned into JSON values the way lm-eval's own results file does it."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(results, default=handle_non_serializable))


def format_results(results: dict[str, Any]) -> str:
    """lm-eval's own table of the figures (and of the groups', when a task is a group)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table
