"""A small conversation set for proving that chat fine-tuning works: train.jsonl and heldout.jsonl.

    python scripts/make_chat_tasks.py --out data/chat-tasks            # seed 0, the recipe's set
    python scripts/make_chat_tasks.py --out /tmp/t --seed 1 --train-per-task 500

Each line is one conversation in OpenAI's messages form, ``{"messages": [{"role": "user", ...},
{"role": "assistant", ...}]}``: a question of one of the task families below and its one right
answer, so that a model's reply can be scored by exact match (docs/chat.md, "A recipe that shows
it works"). The same seed and sizes give the same bytes.

The tasks are chosen for a tiny model with GPT-2's tokenizer, trained for minutes on a CPU: each
is an operation a few attention layers can learn once and apply to inputs never seen, rather
than a table to memorise. GPT-2's BPE hides letters inside tokens (``" cat"`` is one id) and
makes most numbers under 1000 one token each (``" 82"``), so letters and digits are written
apart with spaces (``c a t``, ``3 7``), which gives one token per letter or digit. The lists to
copy or reverse have one length (three words, four letters): with GPT-2's learned absolute
positions, the position to copy from is then the same in every question of a family, which a
small model finds within a few hundred steps; with lengths that vary it must first grow an
induction circuit (match a token, look one further), which took it far longer (bench/NOTES.md).
Counting keeps lists of two to five words, since the length is what it asks about.

Two-digit addition (``add``, digits spaced) is here for the curious but not in the default set:
a table of carries to learn, it stays far below the others in the same minutes.

Held-out instances are disjoint from training: no training conversation holds a held-out list of
words (in any order), a held-out letter string or a held-out pair of numbers, and no held-out
question is also a training question. The words themselves come from one list of common words
for both sets: a model this small learns to copy only tokens it has learned to write.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from gpt2.errors import UserError  # noqa: E402
from gpt2.files import make_folder, write_text  # noqa: E402

# Common English words that GPT-2 writes as one token after a space (" apple").
WORDS = (  # noqa: SIM905 (a paragraph of words reads better than 167 quoted strings)
    "apple bread chair cloud dance eagle field glass heart house juice knife lemon light metal "
    "money night ocean paper piano plant queen radio river salad sheep shirt smile snake spoon "
    "stone storm sugar table tiger torch train truck water whale wheel wind wolf world bank bird "
    "boat book bell box cake card cat coat corn cow cup desk dog door dream drum duck egg face "
    "farm fire fish flag floor frog game gate gift girl goat gold grass hand hat hill horse ice "
    "iron jam key king lake lamp leaf lion lock map milk moon mouse nest nose oil owl pen pig pipe "
    "rain ring road rock roof rose salt sand seed ship shoe silk sky snow sock song star sun tea "
    "tent toy tree wall wave wing wood yard bean bone bus cheese clock cookie crown fork fruit "
    "garden hammer honey island jacket ladder magnet needle orange pencil pillow pocket rabbit "
    "rocket saddle shadow silver sister spider stamp sword thread tower valley violin wagon "
    "window winter"
).split()
LETTERS = "abcdefghijklmnopqrstuvwxyz"
LIST_WORDS = 3  # words in a list to repeat or reverse
COUNT_WORDS = (2, 5)  # fewest and most words in a list to count
STRING_LETTERS = 4  # letters in a string to capitalise or spell backwards
HELDOUT_PAIR_FRACTION = 0.1  # of the number pairs, kept out of every training conversation

Conversation = dict[str, list[dict[str, str]]]


def conversation(question: str, answer: str) -> Conversation:
    """One user question and the assistant's answer, as a fine-tuning line holds them."""
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


class Pools:
    """What the train and held-out sets draw from, split once so that they cannot overlap."""

    def __init__(self, rng: random.Random) -> None:
        pairs = [(a, b) for a in range(10, 100) for b in range(10, 100) if a < b]
        rng.shuffle(pairs)
        cut = round(len(pairs) * HELDOUT_PAIR_FRACTION)
        self.pairs = {"heldout": pairs[:cut], "train": pairs[cut:]}
        self.heldout_strings: set[str] = set()  # letter strings the held-out set used
        self.heldout_lists: set[frozenset[str]] = set()  # word lists it used, as sets

    def letters(self, rng: random.Random, split: str) -> list[str]:
        """A string of `STRING_LETTERS` letters; a training one is never a held-out one."""
        while True:
            s = "".join(rng.choice(LETTERS) for _ in range(STRING_LETTERS))
            if split == "heldout":
                self.heldout_strings.add(s)
                return list(s)
            if s not in self.heldout_strings:
                return list(s)

    def word_list(self, rng: random.Random, split: str, n: int) -> list[str]:
        """``n`` distinct words; a training list never has a held-out list's words."""
        while True:
            words = rng.sample(WORDS, n)
            if split == "heldout":
                self.heldout_lists.add(frozenset(words))
                return words
            if frozenset(words) not in self.heldout_lists:
                return words

    def pair(self, rng: random.Random, split: str) -> tuple[int, int]:
        """Two numbers 10..99, in random order, from the split's pairs."""
        a, b = rng.choice(self.pairs[split])
        return (a, b) if rng.random() < 0.5 else (b, a)


def spaced(items: Sequence[object]) -> str:
    return " ".join(str(x) for x in items)


def repeat(p: Pools, rng: random.Random, split: str) -> Conversation:
    words = p.word_list(rng, split, LIST_WORDS)
    return conversation(f"Repeat after me: {spaced(words)}", spaced(words))


def reverse_words(p: Pools, rng: random.Random, split: str) -> Conversation:
    words = p.word_list(rng, split, LIST_WORDS)
    return conversation(f"Say these words in reverse order: {spaced(words)}", spaced(words[::-1]))


def count_words(p: Pools, rng: random.Random, split: str) -> Conversation:
    words = p.word_list(rng, split, rng.randint(*COUNT_WORDS))
    return conversation(f"How many words are in this list: {spaced(words)}?", str(len(words)))


def uppercase(p: Pools, rng: random.Random, split: str) -> Conversation:
    letters = p.letters(rng, split)
    return conversation(
        f"Write in capital letters: {spaced(letters)}", spaced(c.upper() for c in letters)
    )


def reverse_letters(p: Pools, rng: random.Random, split: str) -> Conversation:
    letters = p.letters(rng, split)
    return conversation(f"Spell backwards: {spaced(letters)}", spaced(letters[::-1]))


def larger(p: Pools, rng: random.Random, split: str) -> Conversation:
    a, b = p.pair(rng, split)
    return conversation(f"Which is larger, {a} or {b}?", str(max(a, b)))


def add(p: Pools, rng: random.Random, split: str) -> Conversation:
    a, b = p.pair(rng, split)
    return conversation(f"What is {spaced(str(a))} + {spaced(str(b))}?", spaced(str(a + b)))


Task = Callable[[Pools, random.Random, str], Conversation]
TASKS: dict[str, Task] = {
    "repeat": repeat,
    "reverse_words": reverse_words,
    "count_words": count_words,
    "uppercase": uppercase,
    "reverse_letters": reverse_letters,
    "larger": larger,
    "add": add,
}
DEFAULT_TASKS = ("repeat", "reverse_words", "count_words", "uppercase", "reverse_letters", "larger")
# Each family's question starts its own way, so that a scorer can tell them apart.
PREFIXES = {
    "repeat": "Repeat after me:",
    "reverse_words": "Say these words in reverse order:",
    "count_words": "How many words are in this list:",
    "uppercase": "Write in capital letters:",
    "reverse_letters": "Spell backwards:",
    "larger": "Which is larger,",
    "add": "What is ",
}


def task_of(question: str) -> str:
    """The family a generated question belongs to (by how it starts)."""
    for name, prefix in PREFIXES.items():
        if question.startswith(prefix):
            return name
    raise ValueError(f"not a generated question: {question!r}")


def make_split(
    pools: Pools,
    rng: random.Random,
    split: str,
    per_task: int,
    tasks: Sequence[str],
    avoid: set[str] = frozenset(),  # type: ignore[assignment]
) -> list[Conversation]:
    """``per_task`` distinct conversations of each task, none asking a question in ``avoid``,
    shuffled together."""
    out: list[Conversation] = []
    for name in tasks:
        seen: set[str] = set()
        tries = 0
        while len(seen) < per_task:
            tries += 1
            if tries > 50 * per_task + 1000:
                raise UserError(
                    f"task {name} has too few distinct {split} questions for {per_task}"
                )
            conv = TASKS[name](pools, rng, split)
            question = conv["messages"][0]["content"]
            if question in seen or question in avoid:
                continue
            seen.add(question)
            out.append(conv)
    rng.shuffle(out)
    return out


def make_sets(
    seed: int = 0,
    train_per_task: int = 4000,
    heldout_per_task: int = 50,
    tasks: Sequence[str] = DEFAULT_TASKS,
) -> tuple[list[Conversation], list[Conversation]]:
    """The train and held-out conversations for ``seed``; the held-out set is drawn first so
    that training can avoid everything it uses."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}; the tasks are {', '.join(TASKS)}")
    rng = random.Random(seed)
    pools = Pools(rng)
    heldout = make_split(pools, rng, "heldout", heldout_per_task, tasks)
    asked = {c["messages"][0]["content"] for c in heldout}
    train = make_split(pools, rng, "train", train_per_task, tasks, asked)
    return train, heldout


def jsonl(conversations: Sequence[Conversation]) -> str:
    return "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for train.jsonl and heldout.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-task", type=int, default=4000)
    parser.add_argument("--heldout-per-task", type=int, default=50)
    parser.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help=f"comma-separated, of {', '.join(TASKS)} (default: all but add)",
    )
    args = parser.parse_args(argv)
    try:
        if args.train_per_task < 1 or args.heldout_per_task < 1:
            raise UserError("--train-per-task and --heldout-per-task must be at least 1")
        tasks = [t for t in args.tasks.split(",") if t]
        train, heldout = make_sets(args.seed, args.train_per_task, args.heldout_per_task, tasks)
        out = make_folder(args.out)
        write_text(out / "train.jsonl", jsonl(train))
        write_text(out / "heldout.jsonl", jsonl(heldout))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{len(train)} training and {len(heldout)} held-out conversations in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
