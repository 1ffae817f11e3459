"""Training a byte-level BPE vocabulary, GPT-2 style.

1. Pre-tokenize the corpus with the same pattern the encoder uses and count each distinct word
   (special tokens are cut out first: they are never learned from text).
2. Every word starts as its bytes; ids 0..255 are the bytes themselves.
3. Repeat until the vocabulary is full: find the adjacent pair of tokens that occurs most often
   (each word weighted by its count), make it a new token, and replace it in every word.

Counting every pair again after each merge would cost the whole corpus per merge. Instead the
pair counts are kept up to date: a merge only changes the words that hold the merged pair
(`PairIndex.words_with`), so only their pairs are subtracted and added back. The most frequent
pair comes from a heap whose stale entries are skipped when popped.

Ties are broken by the pair's bytes (the smaller wins), so training is deterministic and does not
depend on the order of the input or of Python's hashing.
"""

from __future__ import annotations

import heapq
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable

import regex
from tqdm.auto import tqdm

from gpt2.bpe import BPETokenizer
from gpt2.errors import UserError
from gpt2.tokenizer import GPT2_PATTERN

log = logging.getLogger(__name__)

Pair = tuple[int, int]


def count_words(
    texts: Iterable[str], pattern: str = GPT2_PATTERN, special_tokens: Iterable[str] = ()
) -> Counter[str]:
    """How often each pre-tokenized word occurs in ``texts``; special tokens are left out."""
    words = regex.compile(pattern)
    specials = sorted(special_tokens, key=len, reverse=True)
    splitter = regex.compile("|".join(regex.escape(s) for s in specials)) if specials else None
    counts: Counter[str] = Counter()
    for text in texts:
        for part in splitter.split(text) if splitter else (text,):
            counts.update(words.findall(part))
    return counts


class PairIndex:
    """The words as lists of token ids, how often each adjacent pair occurs, and which words
    hold each pair."""

    def __init__(self, word_counts: dict[str, int]) -> None:
        self.words: list[list[int]] = [list(w.encode("utf-8")) for w in word_counts]
        self.freqs: list[int] = list(word_counts.values())
        self.counts: defaultdict[Pair, int] = defaultdict(int)
        self.words_with: defaultdict[Pair, set[int]] = defaultdict(set)
        for w, (word, freq) in enumerate(zip(self.words, self.freqs, strict=True)):
            for pair in zip(word, word[1:], strict=False):
                self.counts[pair] += freq
                self.words_with[pair].add(w)

    def merge(self, pair: Pair, new_id: int) -> set[Pair]:
        """Replace ``pair`` by ``new_id`` in every word holding it; return the pairs whose
        counts changed."""
        changed: set[Pair] = set()
        for w in self.words_with.pop(pair, ()):
            old = self.words[w]
            new = merge_ids(old, pair, new_id)
            if len(new) == len(old):
                continue  # a stale entry: an earlier merge already took this pair apart
            freq = self.freqs[w]
            for p in zip(old, old[1:], strict=False):
                self.counts[p] -= freq
                changed.add(p)
            for p in zip(new, new[1:], strict=False):
                self.counts[p] += freq
                self.words_with[p].add(w)
                changed.add(p)
            self.words[w] = new
        self.counts.pop(pair, None)
        changed.discard(pair)
        return changed


def merge_ids(word: list[int], pair: Pair, new_id: int) -> list[int]:
    """``word`` with each occurrence of ``pair`` replaced by ``new_id``, left to right."""
    out: list[int] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_bpe(
    word_counts: dict[str, int],
    vocab_size: int,
    special_tokens: Iterable[str] = (),
    pattern: str = GPT2_PATTERN,
    name: str = "bpe",
    show_progress: bool = True,
) -> BPETokenizer:
    """A vocabulary of ``vocab_size`` ids: 256 bytes, the merges learned from ``word_counts``
    (words from `count_words`), then the special tokens."""
    specials = list(dict.fromkeys(special_tokens))
    n_merges = vocab_size - 256 - len(specials)
    if n_merges < 0:
        raise UserError(
            f"vocabulary size {vocab_size} is below the 256 bytes + {len(specials)} special token(s) = {256 + len(specials)}"
        )
    tokens: list[bytes] = [bytes([b]) for b in range(256)]  # id -> bytes
    token_id: dict[bytes, int] = {t: i for i, t in enumerate(tokens)}
    index = PairIndex(word_counts)
    # Max-heap by count, ties to the smaller pair of byte strings: entries (-count, bytes, bytes, pair).
    heap = [(-c, tokens[a], tokens[b], (a, b)) for (a, b), c in index.counts.items() if c > 0]
    heapq.heapify(heap)
    merges: list[tuple[bytes, bytes]] = []
    with tqdm(total=n_merges, unit="merge", desc="training BPE", disable=not show_progress) as bar:
        while len(tokens) < 256 + n_merges and heap:
            neg_count, first, second, pair = heapq.heappop(heap)
            if index.counts.get(pair, 0) != -neg_count:
                continue  # stale: the count changed after this entry was pushed
            merges.append((first, second))
            new_id = token_id.get(first + second)
            if new_id is None:
                new_id = token_id[first + second] = len(tokens)
                tokens.append(first + second)
                bar.update(1)
            # else the same bytes were already made from another split: the merge reuses that id
            for p in index.merge(pair, new_id):
                if index.counts[p] > 0:
                    heapq.heappush(heap, (-index.counts[p], tokens[p[0]], tokens[p[1]], p))
    if len(tokens) < 256 + n_merges:
        log.warning("the corpus ran out of pairs: a vocabulary of %d instead of %d",
                    len(tokens) + len(specials), vocab_size)  # fmt: skip
    special_ids = {s: len(tokens) + j for j, s in enumerate(specials)}
    return BPETokenizer(token_id, merges, special_tokens=special_ids, pattern=pattern, name=name)
