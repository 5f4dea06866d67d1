"""Jojo's embedded default corpus: seeded synthetic stories and ChatML chats with an exact entropy floor.

Nothing is downloaded. Every document is produced by a small *program* (a plain Python function) that
draws from explicit finite distributions and emits text. Two kinds of document exist:

* **stories** -- short children's stories (roughly 300-800 bytes, three paragraphs). A hero with a name
  and fixed pronouns, a friend, a coloured toy, a place, animals, feelings and a small problem that gets
  solved. The hero, the friend and the toy are introduced in the first paragraph and named again later, so a
  language model has to copy from its context, not only learn n-grams.
* **chats** -- ChatML dialogues (``<|im_start|>role\\n...<|im_end|>\\n`` per message): greetings, small
  talk, a user who says their name and later asks for it, "tell me a story (about X)", and questions about
  a small closed world (colours, animal sounds, opposites, plurals, counting, addition, subtraction).
  A question's answer is a fixed function of the question text (see `answer_question`); the randomness
  in a question lies only in the user's wording and the things asked about.

Entropy accounting
------------------
All randomness goes through two methods of a sampling context: ``g.choice(dist)`` (a `Dist`: finite
values with explicit probabilities) and ``g.randint(lo, hi)`` (uniform). Each draw adds ``-log2 p`` of the
drawn value to ``g.bits``; a distribution with a single value is not a random choice and adds nothing.
So ``Document.bits`` is ``-log2 P(choice sequence)``.

The grammar is written so that the text determines the choice sequence (it is *unambiguous*): the
probability of the text is then the probability of its unique choice sequence, ``Document.bits`` is
exactly ``-log2 P(text)``, and ``sum(bits) / sum(bytes)`` over a split is the exact entropy floor in bits
per byte (the expected code length of the best possible model). Stop decisions (how many scenes, how many
chat exchanges) and the story/chat choice of the mixed corpus are draws like any other, so the
information of where a document ends is counted too: an end-of-text token after a document carries no
information beyond the bits already counted.

Unambiguity is not taken on trust: `parse` re-runs the *same* program against a given text with a
backtracking search over every possible choice sequence (each draw is replaced by "try every value", each
emitted piece of text must match the text at the current position). It returns every choice sequence
that reproduces the text exactly; `score_text` requires exactly one and returns its bits. The tests check,
for hundreds of generated documents, that the parse is unique and equals the generator's own choices and
bits. To keep this search cheap, programs emit each drawn value soon after drawing it.
"""

from __future__ import annotations

import json
import math
import random
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any, NamedTuple

from jojo.tokenizer import EOT, IM_END, IM_START, parse_chatml, render_chat

__all__ = [
    "CHAT_ROLES",
    "EOT",
    "IM_END",
    "IM_START",
    "QA",
    "QA_KINDS",
    "Dist",
    "Document",
    "Parse",
    "Sample",
    "Sampler",
    "answer_question",
    "chat_program",
    "corpus_program",
    "entropy_floor_bpb",
    "generate_chats",
    "generate_corpus",
    "generate_stories",
    "heldout_questions",
    "iter_corpus_text",
    "parse",
    "parse_chatml",
    "question_program",
    "render_chat",
    "sample",
    "score_text",
    "story_program",
    "write_corpus",
    "write_documents",
]

CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Document:
    text: str  # the document text (chats include the ChatML markers literally); no <|endoftext|>
    bits: float  # exact information content, in bits
    kind: str  # "story" or "chat"


@dataclass(frozen=True)
class QA:
    question: str  # user message content
    answer: str  # the exact deterministic assistant answer
    kind: str  # "colour", "sound", "opposite", "plural", "count", "add", "sub"


# ----------------------------------------------------------------------------------------------------------
# Drawing machinery
# ----------------------------------------------------------------------------------------------------------


class Dist:
    """A finite distribution over ``values`` (uniform when ``weights`` is None).

    Probabilities are ``w / sum(weights)``; ``bits[i] = -log2 p[i]`` and the cumulative weights are
    precomputed so that a draw costs one ``random()`` and (when not uniform) one bisection.
    """

    __slots__ = ("values", "probs", "bits", "cum", "total", "n", "uniform")

    def __init__(self, values: Sequence[Any], weights: Sequence[float] | None = None):
        values = tuple(values)
        if not values:
            raise ValueError("a distribution needs at least one value")
        n = len(values)
        if weights is None:
            probs = (1.0 / n,) * n
            bits = (math.log2(n),) * n
            cum: tuple[float, ...] = ()
            total = float(n)
        else:
            weights = tuple(float(w) for w in weights)
            if len(weights) != n:
                raise ValueError(f"{n} values but {len(weights)} weights")
            if any(not (w > 0.0 and math.isfinite(w)) for w in weights):
                raise ValueError(f"weights must be positive and finite, got {weights}")
            total = math.fsum(weights)
            probs = tuple(w / total for w in weights)
            bits = tuple(-math.log2(p) for p in probs)
            cum = tuple(accumulate(weights))
        self.values = values
        self.probs = probs
        self.bits = bits
        self.cum = cum
        self.total = total
        self.n = n
        self.uniform = weights is None

    def entropy(self) -> float:
        """Shannon entropy in bits (0 for a single value)."""
        return 0.0 if self.n == 1 else math.fsum(p * b for p, b in zip(self.probs, self.bits))

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"Dist({list(zip(self.values, self.probs))!r})"


# -log2(n) for the uniform draws of `randint`, precomputed for the small ranges the grammar uses.
_LOG2 = tuple(math.log2(n) if n else 0.0 for n in range(64))


class Sampler:
    """Generation context: draws with ``rng`` and appends emitted text.

    ``say`` is the list's bound ``append`` (the hot path); ``record=True`` also keeps the drawn indices.
    """

    __slots__ = ("say", "_parts", "_random", "bits", "choices")

    def __init__(self, rng: random.Random, record: bool = False):
        self._parts: list[str] = []
        self.say: Callable[[str], None] = self._parts.append
        self._random = rng.random
        self.bits = 0.0
        self.choices: list[int] | None = [] if record else None

    def choice(self, dist: Dist) -> Any:
        n = dist.n
        if n == 1:
            return dist.values[0]
        if dist.uniform:
            i = int(self._random() * n)
        else:
            i = bisect_right(dist.cum, self._random() * dist.total)
        if i >= n:  # float safety; cannot normally happen
            i = n - 1
        self.bits += dist.bits[i]
        if self.choices is not None:
            self.choices.append(i)
        return dist.values[i]

    def randint(self, lo: int, hi: int) -> int:
        """Uniform integer in ``[lo, hi]``."""
        n = hi - lo + 1
        if n <= 1:
            if n == 1:
                return lo
            raise ValueError(f"empty range [{lo}, {hi}]")
        i = int(self._random() * n)
        if i >= n:
            i = n - 1
        self.bits += _LOG2[n] if n < 64 else math.log2(n)
        if self.choices is not None:
            self.choices.append(i)
        return lo + i

    def text(self) -> str:
        return "".join(self._parts)


class _Mismatch(Exception):
    """The replayed program emitted text that differs from the target."""


class _Branch(Exception):
    """The replayed program reached a draw beyond the forced prefix; ``n`` values are possible there."""

    def __init__(self, n: int):
        self.n = n


class _Replay:
    """Parsing context: replays a forced prefix of choice indices and checks every emission."""

    __slots__ = ("_text", "pos", "_forced", "_k", "bits")

    def __init__(self, text: str, forced: tuple[int, ...]):
        self._text = text
        self.pos = 0
        self._forced = forced
        self._k = 0
        self.bits = 0.0

    def say(self, piece: str) -> None:
        if not self._text.startswith(piece, self.pos):
            raise _Mismatch
        self.pos += len(piece)

    def _next(self, n: int) -> int:
        k = self._k
        if k == len(self._forced):
            raise _Branch(n)
        self._k = k + 1
        return self._forced[k]

    def choice(self, dist: Dist) -> Any:
        if dist.n == 1:
            return dist.values[0]
        i = self._next(dist.n)
        self.bits += dist.bits[i]
        return dist.values[i]

    def randint(self, lo: int, hi: int) -> int:
        n = hi - lo + 1
        if n <= 1:
            if n == 1:
                return lo
            raise ValueError(f"empty range [{lo}, {hi}]")
        i = self._next(n)
        self.bits += _LOG2[n] if n < 64 else math.log2(n)
        return lo + i


class Sample(NamedTuple):
    text: str
    bits: float
    result: Any  # whatever the program returned
    choices: tuple[int, ...] | None  # drawn indices (when recorded)


class Parse(NamedTuple):
    choices: tuple[int, ...]
    bits: float
    result: Any


def sample(program: Callable[..., Any], rng: random.Random, *args: Any, record: bool = False) -> Sample:
    """Run ``program(g, *args)`` once with a `Sampler` over ``rng``."""
    g = Sampler(rng, record=record)
    result = program(g, *args)
    return Sample(g.text(), g.bits, result, None if g.choices is None else tuple(g.choices))


def parse(program: Callable[..., Any], text: str, *args: Any, max_parses: int = 2) -> list[Parse]:
    """Every choice sequence (up to ``max_parses``) for which ``program(g, *args)`` emits exactly ``text``.

    Depth-first search over choice sequences: the program is re-run with a forced prefix of choices; at the
    first draw past the prefix it stops and each possible value becomes a child prefix; a run stops early as
    soon as an emitted piece does not match ``text``. The result is complete (every parse is found), so a
    single result proves that ``text`` determines its choices.
    """
    found: list[Parse] = []
    stack: list[tuple[int, ...]] = [()]
    end = len(text)
    while stack:
        forced = stack.pop()
        g = _Replay(text, forced)
        try:
            result = program(g, *args)
        except _Mismatch:
            continue
        except _Branch as branch:
            stack.extend(forced + (i,) for i in range(branch.n - 1, -1, -1))
            continue
        if g.pos == end:
            found.append(Parse(forced, g.bits, result))
            if len(found) >= max_parses:
                break
    return found


# ----------------------------------------------------------------------------------------------------------
# Shared vocabulary
# ----------------------------------------------------------------------------------------------------------


class _Who(NamedTuple):
    name: str
    subj: str  # she / he / they
    obj: str  # her / him / them
    poss: str  # her / his / their
    kind: str  # girl / boy / kid

    @property
    def Subj(self) -> str:  # capitalised pronoun, reads like the template
        return self.subj.capitalize()

    @property
    def Poss(self) -> str:
        return self.poss.capitalize()


_SHE = ("she", "her", "her", "girl")
_HE = ("he", "him", "his", "boy")
_THEY = ("they", "them", "their", "kid")
# A name fixes the pronouns, so pronouns cost no bits and are always consistent.
_PEOPLE = tuple(
    [_Who(n, *_SHE) for n in ("Mia", "Lily", "Anna", "Rosa", "Emma", "Zoe")]
    + [_Who(n, *_HE) for n in ("Tom", "Ben", "Leo", "Max", "Sam", "Jack")]
    + [_Who(n, *_THEY) for n in ("Alex", "Robin", "Kit", "Riley")]
)
_NAMES = Dist(_PEOPLE)
# The friend is any other person, uniformly: one precomputed distribution per hero.
_FRIENDS = {p.name: Dist([q for q in _PEOPLE if q is not p]) for p in _PEOPLE}
_COIN = Dist((False, True))

_COLOURS = Dist(("red", "blue", "green", "yellow", "pink", "purple", "white", "brown"))

# ----------------------------------------------------------------------------------------------------------
# Stories
# ----------------------------------------------------------------------------------------------------------

_ADJS = Dist(("little", "kind", "brave", "happy", "shy", "clever", "funny", "curious"))
_HOMES = Dist(
    ("by the sea", "in a small town", "on a farm", "near a big forest", "in a little house on a hill",
     "in a busy city")
)  # fmt: skip
_TOYS = Dist(("ball", "kite", "hat", "book", "drum", "boat", "teddy bear", "bike", "toy car", "doll"))
_TIMES = Dist(("day", "morning", "sunny day", "warm afternoon"))
_PLACES = Dist(("park", "beach", "forest", "lake", "garden", "zoo", "market", "river"))
_ANIMALS = Dist(("dog", "cat", "duck", "frog", "bird", "rabbit", "squirrel", "fox", "mouse", "puppy"))
_ANIMAL_SPOTS = Dist(("near a tree", "in the water", "under a bush", "on a rock", "in the grass"))
_SIGHTS = Dist(("clouds", "flowers", "birds", "big tree", "little boats"))
_GOOD = Dist(("happy", "excited", "proud", "glad", "calm"))
_BAD = Dist(("sad", "scared", "worried", "upset"))
_ACTIVITIES = Dist(
    ("ate some cake", "played a game", "sang a song", "sat in the sun", "had a picnic", "ran and jumped",
     "looked at the sky")
)  # fmt: skip
_FOODS = Dist(("cookie", "banana", "sandwich", "pear", "muffin"))
_FOUND_SPOTS = Dist(
    ("under a tree", "behind a big rock", "in the tall grass", "near the water", "under a bench")
)  # fmt: skip
_STUCK_SPOTS = Dist(("in the mud", "in a hole", "in a bush", "up a tree"))

_MIN_SCENES = 1
_MAX_SCENES = 5
_MORE_SCENES = Dist((True, False), (0.6, 0.4))


class _Cast(NamedTuple):
    hero: _Who
    friend: _Who
    colour: str
    toy: str


# Paragraph 1: who the hero is and where they live. Hero is None when the program draws it.


def _open_once(g, hero):
    g.say("Once upon a time, there was a ")
    adj = g.choice(_ADJS)
    hero = hero or g.choice(_NAMES)
    g.say(f"{adj} {hero.kind} named {hero.name}. {hero.Subj} lived ")
    g.say(g.choice(_HOMES) + ".")
    return hero


def _open_name(g, hero):
    hero = hero or g.choice(_NAMES)
    g.say(f"{hero.name} was a ")
    g.say(f"{g.choice(_ADJS)} {hero.kind} who lived ")
    g.say(g.choice(_HOMES) + ".")
    return hero


def _open_there(g, hero):
    g.say("There once was a ")
    adj = g.choice(_ADJS)
    hero = hero or g.choice(_NAMES)
    g.say(f"{adj} {hero.kind} called {hero.name}. {hero.Subj} lived ")
    g.say(g.choice(_HOMES) + ".")
    return hero


_OPENINGS = Dist((_open_once, _open_name, _open_there))


def _toy_had(g, hero):
    g.say(f" {hero.name} had a ")
    colour = g.choice(_COLOURS)
    g.say(colour + " ")
    toy = g.choice(_TOYS)
    g.say(toy + ".")
    return colour, toy


def _toy_loved(g, hero):
    g.say(f" {hero.Subj} had a ")
    colour = g.choice(_COLOURS)
    g.say(colour + " ")
    toy = g.choice(_TOYS)
    g.say(f"{toy} that {hero.subj} loved very much.")
    return colour, toy


def _toy_favourite(g, hero):
    g.say(f" {hero.Poss} favourite toy was a ")
    colour = g.choice(_COLOURS)
    g.say(colour + " ")
    toy = g.choice(_TOYS)
    g.say(toy + ".")
    return colour, toy


_TOY_SENTENCES = Dist((_toy_had, _toy_loved, _toy_favourite))


def _friend_named(g, hero):
    g.say(f" {hero.name} had a friend named ")
    friend = g.choice(_FRIENDS[hero.name])
    g.say(friend.name + ".")
    return friend


def _friend_best(g, hero):
    g.say(f" {hero.Poss} best friend was ")
    friend = g.choice(_FRIENDS[hero.name])
    g.say(friend.name + ".")
    return friend


def _friend_play(g, hero):
    g.say(f" {hero.name} liked to play with ")
    friend = g.choice(_FRIENDS[hero.name])
    g.say(friend.name + ".")
    return friend


_FRIEND_SENTENCES = Dist((_friend_named, _friend_best, _friend_play))


# Paragraph 2: an outing, a few scenes, a problem and how it is solved.


def _trip_went(g, c):
    g.say(f"One {g.choice(_TIMES)}, {c.hero.name} and {c.friend.name} went to the ")
    g.say(g.choice(_PLACES) + ".")


def _trip_took(g, c):
    g.say(f"One {g.choice(_TIMES)}, {c.hero.name} took the {c.toy} to the ")
    g.say(f"{g.choice(_PLACES)} with {c.friend.name}.")


_TRIPS = Dist((_trip_went, _trip_took))


def _pair(g, c):
    """One of the two children (1 bit) and the other one."""
    return (c.friend, c.hero) if g.choice(_COIN) else (c.hero, c.friend)


def _scene_saw(g, c):
    x, _ = _pair(g, c)
    g.say(f" {x.name} saw a ")
    g.say(f"{g.choice(_ANIMALS)} ")
    g.say(g.choice(_ANIMAL_SPOTS) + ".")


def _scene_look(g, c):
    x, y = _pair(g, c)
    g.say(f' {x.name} said, "{y.name}, look at the ')
    g.say(g.choice(_SIGHTS) + '!"')


def _scene_played(g, c):
    x, y = _pair(g, c)
    g.say(f" {x.name} and {y.name} played with the {c.toy}.")


def _scene_felt(g, c):
    x, _ = _pair(g, c)
    g.say(f" {x.name} felt ")
    g.say(g.choice(_GOOD) + ".")


def _scene_then(g, c):
    g.say(" Then they ")
    g.say(g.choice(_ACTIVITIES) + ".")


def _scene_gave(g, c):
    x, y = _pair(g, c)
    g.say(f" {x.name} gave {y.name} a ")
    g.say(f'{g.choice(_FOODS)}. "Thank you, {x.name}!" said {y.name}.')


def _scene_ran(g, c):
    x, y = _pair(g, c)
    g.say(f" {x.name} ran fast, and {y.name} ran after {x.obj}.")


_SCENES = Dist((_scene_saw, _scene_look, _scene_played, _scene_felt, _scene_then, _scene_gave, _scene_ran))


def _problem_lost(g, c):
    g.say(f" Suddenly, the {c.colour} {c.toy} was gone! {c.hero.name} felt ")
    g.say(f"{g.choice(_BAD)}. {c.friend.name} helped {c.hero.obj} look for it.")
    x, _ = _pair(g, c)
    g.say(f" At last, {x.name} found it ")
    g.say(g.choice(_FOUND_SPOTS) + ".")


def _problem_rain(g, c):
    g.say(f" Then it started to rain. {c.hero.name} and {c.friend.name} hid under a big tree.")
    x, _ = _pair(g, c)
    g.say(f' Soon the sun came out again, and {x.name} said, "Look, a rainbow!"')


def _problem_stuck(g, c):
    g.say(" A little ")
    animal = g.choice(_ANIMALS)
    g.say(f"{animal} was stuck ")
    g.say(g.choice(_STUCK_SPOTS) + ".")
    x, _ = _pair(g, c)
    g.say(f" {x.name} helped the {animal} get free. The {animal} was happy and ran away.")


_PROBLEMS = Dist((_problem_lost, _problem_rain, _problem_stuck))


# Paragraph 3: the ending.


def _end_home(g, c):
    g.say(f"In the end, {c.hero.name} and {c.friend.name} went home, tired and happy.")


def _end_night(g, c):
    g.say(f"That night, {c.hero.name} put the {c.colour} {c.toy} next to {c.hero.poss} bed and smiled.")


def _end_friends(g, c):
    g.say(f"From that day on, {c.hero.name} and {c.friend.name} were best friends.")


def _end_best_day(g, c):
    g.say(f'{c.hero.name} said, "This was the best day ever!"')


_ENDINGS = Dist((_end_home, _end_night, _end_friends, _end_best_day))


def story_program(g, hero: _Who | None = None) -> None:
    """One story: three paragraphs separated by a single newline.

    Paragraph 1: opening (3 templates; adjective, hero, home), the hero's toy (3 templates; colour, toy),
    the friend (3 templates; any other name). Paragraph 2: an outing (2 templates; time, place), then
    1-5 scenes (7 templates; after each scene past the first, continue with p=0.6 until 5), then one of 3
    problems with its resolution. Paragraph 3: one of 4 endings. ``hero`` is given when a chat asks for a
    story about someone (the name is then already in the context and not drawn).
    """
    hero = g.choice(_OPENINGS)(g, hero)
    colour, toy = g.choice(_TOY_SENTENCES)(g, hero)
    friend = g.choice(_FRIEND_SENTENCES)(g, hero)
    cast = _Cast(hero, friend, colour, toy)
    g.say("\n")
    g.choice(_TRIPS)(g, cast)
    n = 0
    while True:
        g.choice(_SCENES)(g, cast)
        n += 1
        if n >= _MAX_SCENES or (n >= _MIN_SCENES and not g.choice(_MORE_SCENES)):
            break
    g.choice(_PROBLEMS)(g, cast)
    g.say("\n")
    g.choice(_ENDINGS)(g, cast)


# ----------------------------------------------------------------------------------------------------------
# Closed-world questions (answers are deterministic functions of the question)
# ----------------------------------------------------------------------------------------------------------


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


_COLOUR_FORMS = Dist(
    (("What colour is ", "?"), ("What is the colour of ", "?"), ("Tell me the colour of ", "."))
)  # fmt: skip
_COLOUR_THINGS = Dist(
    (
        ("a banana", "yellow"), ("an apple", "red"), ("grass", "green"), ("the sky", "blue"),
        ("snow", "white"), ("a carrot", "orange"), ("a lemon", "yellow"), ("a frog", "green"),
        ("milk", "white"), ("a tomato", "red"), ("the sun", "yellow"), ("a leaf", "green"),
    )
)  # fmt: skip


def _ask_colour(g) -> str:
    pre, post = g.choice(_COLOUR_FORMS)
    g.say(pre)
    thing, colour = g.choice(_COLOUR_THINGS)
    g.say(thing + post)
    return f"{_cap(thing)} is {colour}."


_SOUND_FORMS = Dist(
    (("What sound does ", " make?"), ("What does ", " say?"), ("What noise does ", " make?"))
)  # fmt: skip
_SOUNDS = Dist(
    (
        ("a cow", "moo"), ("a dog", "woof"), ("a cat", "meow"), ("a duck", "quack"), ("a sheep", "baa"),
        ("a pig", "oink"), ("a horse", "neigh"), ("an owl", "hoot"), ("a frog", "ribbit"), ("a mouse", "squeak"),
    )
)  # fmt: skip


def _ask_sound(g) -> str:
    pre, post = g.choice(_SOUND_FORMS)
    g.say(pre)
    animal, sound = g.choice(_SOUNDS)
    g.say(animal + post)
    return f"{_cap(animal)} says {sound}."


_OPPOSITE_PAIRS = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("day", "night"),
    ("open", "closed"), ("wet", "dry"), ("full", "empty"), ("loud", "quiet"), ("in", "out"), ("young", "old"),
)  # fmt: skip
_OPPOSITE_FORMS = Dist(
    (("What is the opposite of ", "?"), ("What's the opposite of ", "?"), ("Tell me the opposite of ", "."))
)  # fmt: skip
_OPPOSITES = Dist([(a, b) for a, b in _OPPOSITE_PAIRS] + [(b, a) for a, b in _OPPOSITE_PAIRS])


def _ask_opposite(g) -> str:
    pre, post = g.choice(_OPPOSITE_FORMS)
    g.say(pre)
    word, other = g.choice(_OPPOSITES)
    g.say(word + post)
    return f"The opposite of {word} is {other}."


_PLURAL_FORMS = Dist(
    (("What is the plural of ", "?"), ("What is the plural of the word ", "?"),
     ("How do you say more than one ", "?"))
)  # fmt: skip
_PLURALS = Dist(
    (
        ("cat", "cats"), ("dog", "dogs"), ("box", "boxes"), ("fox", "foxes"), ("baby", "babies"),
        ("mouse", "mice"), ("child", "children"), ("foot", "feet"), ("man", "men"), ("sheep", "sheep"),
        ("fish", "fish"), ("leaf", "leaves"),
    )
)  # fmt: skip


def _ask_plural(g) -> str:
    pre, post = g.choice(_PLURAL_FORMS)
    g.say(pre)
    word, plural = g.choice(_PLURALS)
    g.say(word + post)
    return f"The plural of {word} is {plural}."


_COUNT_FORMS = Dist((("Count from ", "."), ("Can you count from ", "?"), ("Please count from ", ".")))
COUNT_START_MAX = 12  # counting starts at 0..12 and goes up 1..5 steps
COUNT_STEPS_MAX = 5


def _ask_count(g) -> str:
    pre, post = g.choice(_COUNT_FORMS)
    g.say(pre)
    a = g.randint(0, COUNT_START_MAX)
    g.say(f"{a} to ")
    b = a + g.randint(1, COUNT_STEPS_MAX)
    g.say(f"{b}{post}")
    return ", ".join(str(i) for i in range(a, b + 1)) + "."


ARITH_MAX = 10  # operands of additions and subtractions are 0..10; subtraction results are >= 0
_ADD_FORMS = Dist((("What is ", " plus "), ("What is ", " + "), ("How much is ", " plus ")))
_SUB_FORMS = Dist((("What is ", " minus "), ("What is ", " - "), ("How much is ", " minus ")))


def _ask_add(g) -> str:
    pre, op = g.choice(_ADD_FORMS)
    g.say(pre)
    a = g.randint(0, ARITH_MAX)
    g.say(f"{a}{op}")
    b = g.randint(0, ARITH_MAX)
    g.say(f"{b}?")
    return f"{a} plus {b} is {a + b}."


def _ask_sub(g) -> str:
    pre, op = g.choice(_SUB_FORMS)
    g.say(pre)
    a = g.randint(0, ARITH_MAX)
    g.say(f"{a}{op}")
    b = g.randint(0, a)
    g.say(f"{b}?")
    return f"{a} minus {b} is {a - b}."


_QA_TABLE = (
    ("colour", _ask_colour, 1.0),
    ("sound", _ask_sound, 1.0),
    ("opposite", _ask_opposite, 1.0),
    ("plural", _ask_plural, 1.0),
    ("count", _ask_count, 1.0),
    ("add", _ask_add, 1.5),
    ("sub", _ask_sub, 1.5),
)
QA_KINDS = tuple(kind for kind, _, _ in _QA_TABLE)
_QA_DIST = Dist([(kind, fn) for kind, fn, _ in _QA_TABLE], [w for _, _, w in _QA_TABLE])


def question_program(g) -> tuple[str, str]:
    """Emit one closed-world question; return ``(kind, answer)``. The answer uses no randomness."""
    kind, ask = g.choice(_QA_DIST)
    return kind, ask(g)


# ----------------------------------------------------------------------------------------------------------
# Chats
# ----------------------------------------------------------------------------------------------------------

_USER = f"{IM_START}user\n"
_TO_ASSISTANT = f"{IM_END}\n{IM_START}assistant\n"
_CLOSE = f"{IM_END}\n"

_HAS_SYSTEM = Dist((True, False), (0.25, 0.75))
_SYSTEM_PROMPTS = Dist(
    ("You are a helpful assistant.", "You are Jojo, a friendly assistant.",
     "You are a kind assistant for children.")
)  # fmt: skip
_MAX_EXCHANGES = 6
_MORE_EXCHANGES = Dist((True, False), (0.5, 0.5))

_GREETINGS = Dist(("Hi!", "Hello!", "Hey!", "Good morning!", "Hello there!"))
_GREETING_REPLIES = Dist(
    ("Hello! How can I help you today?", "Hi! What would you like to talk about?", "Hello! Nice to see you.")
)
_INTRO_FORMS = Dist((("My name is ", "."), ("I am ", "."), ("Hi! My name is ", ".")))
_RECALL_FORMS = Dist(("What is my name?", "Do you remember my name?"))
_SMALL_TALK = Dist(
    (
        ("How are you?", Dist(("I am fine, thank you!", "I am very well, thanks for asking."))),
        ("What is your name?", Dist(("My name is Jojo.",))),
        ("Thank you!", Dist(("You are welcome!",))),
        ("What is your favourite colour?", Dist([f"I like {c} best." for c in _COLOURS.values])),
        ("Can you help me?", Dist(("Of course! What do you need?",))),
        ("Do you like stories?", Dist(("Yes, I love stories!",))),
        ("What can you do?", Dist(("I can answer questions, count, add, subtract and tell stories.",))),
    )
)
_STORY_FORMS = Dist(
    (
        ("Tell me a story.", False),
        ("Please tell me a story.", False),
        ("Tell me a story about ", True),
        ("Can you tell me a story about ", True),
    )
)
_STORY_FORM_ENDS = {"Tell me a story about ": ".", "Can you tell me a story about ": "?"}
_BYES = Dist(("Bye!", "Goodbye!", "See you later!"))


def _ex_qa(g, name):
    _, answer = question_program(g)
    g.say(f"{_TO_ASSISTANT}{answer}{_CLOSE}")
    return name


def _ex_greet(g, name):
    g.say(g.choice(_GREETINGS) + _TO_ASSISTANT)
    g.say(g.choice(_GREETING_REPLIES) + _CLOSE)
    return name


def _ex_intro(g, name):
    pre, post = g.choice(_INTRO_FORMS)
    g.say(pre)
    who = g.choice(_NAMES)
    g.say(f"{who.name}{post}{_TO_ASSISTANT}Nice to meet you, {who.name}!{_CLOSE}")
    return who.name


def _ex_recall(g, name):
    g.say(g.choice(_RECALL_FORMS))
    g.say(f"{_TO_ASSISTANT}Your name is {name}.{_CLOSE}")
    return name


def _ex_small_talk(g, name):
    question, replies = g.choice(_SMALL_TALK)
    g.say(question + _TO_ASSISTANT)
    g.say(g.choice(replies) + _CLOSE)
    return name


def _ex_story(g, name):
    form, about = g.choice(_STORY_FORMS)
    g.say(form)
    hero = None
    if about:
        hero = g.choice(_NAMES)
        g.say(hero.name + _STORY_FORM_ENDS[form])
    g.say(_TO_ASSISTANT)
    story_program(g, hero)
    g.say(_CLOSE)
    return name


def _ex_bye(g, name):
    g.say(g.choice(_BYES) + _TO_ASSISTANT)
    g.say("Goodbye! Have a nice day." + _CLOSE)
    return name


# Which exchange comes next depends on the position and on whether the user has said their name.
_EX_FIRST = Dist((_ex_qa, _ex_greet, _ex_intro, _ex_small_talk, _ex_story), (6, 2, 1, 1.5, 0.6))
_EX_LATER = Dist((_ex_qa, _ex_intro, _ex_small_talk, _ex_story, _ex_bye), (6, 0.7, 1.5, 0.6, 1))
_EX_LATER_NAMED = Dist((_ex_qa, _ex_recall, _ex_small_talk, _ex_story, _ex_bye), (6, 0.7, 1.5, 0.6, 1))


def chat_program(g) -> None:
    """One ChatML dialogue.

    Optional system turn (p=0.25; 3 prompts), then 1-6 user/assistant exchanges. The first exchange is a
    question, greeting, introduction ("My name is Mia."), small talk or story request; later ones may also be
    a recall of the user's name (only once it was given) or a goodbye (which ends the chat). After each
    other exchange the chat continues with p=0.5 (up to 6 exchanges).
    """
    if g.choice(_HAS_SYSTEM):
        g.say(f"{IM_START}system\n")
        g.say(g.choice(_SYSTEM_PROMPTS) + _CLOSE)
    name = None
    n = 0
    while True:
        g.say(_USER)
        exchange = g.choice(_EX_FIRST if n == 0 else (_EX_LATER_NAMED if name else _EX_LATER))
        name = exchange(g, name)
        n += 1
        if exchange is _ex_bye or n >= _MAX_EXCHANGES or not g.choice(_MORE_EXCHANGES):
            break


def corpus_program(g, kind_dist: Dist) -> str:
    """A document of the mixed corpus: draw "chat" or "story" from ``kind_dist``, then that program."""
    kind = g.choice(kind_dist)
    if kind == "chat":
        chat_program(g)
    else:
        story_program(g)
    return kind


def _kind_dist(chat_fraction: float) -> Dist:
    if not 0.0 <= chat_fraction <= 1.0:
        raise ValueError(f"chat_fraction must be in [0, 1], got {chat_fraction}")
    if chat_fraction == 0.0:
        return Dist(("story",))
    if chat_fraction == 1.0:
        return Dist(("chat",))
    return Dist(("chat", "story"), (chat_fraction, 1.0 - chat_fraction))


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def _rng(stream: str, seed: int) -> random.Random:
    # Named streams: str seeds are hashed with SHA-512 by `random`, so they are stable across processes and
    # independent of PYTHONHASHSEED; different names give unrelated streams even for the same seed.
    return random.Random(f"jojo.synthetic/{stream}/{int(seed)}")


def _generate(program: Callable[..., Any], n: int, rng: random.Random, kind: str) -> list[Document]:
    docs = []
    for _ in range(n):
        g = Sampler(rng)
        program(g)
        docs.append(Document("".join(g._parts), g.bits, kind))
    return docs


def generate_stories(n: int, seed: int = 0) -> list[Document]:
    """``n`` stories (bits exclude any story/chat choice)."""
    return _generate(story_program, n, _rng("stories", seed), "story")


def generate_chats(n: int, seed: int = 0) -> list[Document]:
    """``n`` ChatML chats (bits exclude any story/chat choice)."""
    return _generate(chat_program, n, _rng("chats", seed), "chat")


def _iter_docs(n_docs: int, seed: int, chat_fraction: float) -> Iterator[Document]:
    rng = _rng("corpus", seed)
    kind_dist = _kind_dist(chat_fraction)
    for _ in range(n_docs):
        g = Sampler(rng)
        kind = corpus_program(g, kind_dist)
        yield Document("".join(g._parts), g.bits, kind)


def generate_corpus(n_docs: int, seed: int = 0, chat_fraction: float = 0.3) -> list[Document]:
    """The mixed corpus: each document is a chat with probability ``chat_fraction``, else a story.

    The bits of that choice are included in ``Document.bits``.
    """
    return list(_iter_docs(n_docs, seed, chat_fraction))


def iter_corpus_text(n_docs: int, seed: int = 0, chat_fraction: float = 0.3) -> Iterator[str]:
    """The texts of `generate_corpus` (same documents), lazily."""
    for doc in _iter_docs(n_docs, seed, chat_fraction):
        yield doc.text


def heldout_questions(n: int, seed: int = 12345) -> list[QA]:
    """``n`` closed-world questions with their exact answers, from a stream no training generator uses.

    The questions are drawn by the same `question_program` the chats use, so the answers are the ones the
    chats teach. The closed world is small (about a thousand distinct questions), so a held-out *question*
    may also occur in training; what is held out is the random stream.
    """
    rng = _rng("heldout-questions", seed)
    out = []
    for _ in range(n):
        s = sample(question_program, rng)
        kind, answer = s.result
        out.append(QA(s.text, answer, kind))
    return out


def answer_question(question: str) -> str | None:
    """The exact answer the corpus gives to ``question`` (a user message), or None if it is not one of the
    closed-world questions. Computed by parsing the question with `question_program`."""
    parses = parse(question_program, question)
    if len(parses) != 1:
        return None
    return parses[0].result[1]


_GRAMMARS: dict[str, Callable[..., Any]] = {
    "story": story_program,
    "chat": chat_program,
    "corpus": corpus_program,
    "question": question_program,
}


def score_text(text: str, grammar: str = "corpus", chat_fraction: float = 0.3) -> float:
    """Information content of ``text`` in bits, recomputed from the text alone.

    ``grammar`` is "story", "chat", "corpus" (includes the story/chat choice, with ``chat_fraction``) or
    "question". Raises ValueError when the text is not generated by the grammar or has several parses.
    """
    if grammar not in _GRAMMARS:
        raise ValueError(f"unknown grammar {grammar!r}; expected one of {sorted(_GRAMMARS)}")
    args = (_kind_dist(chat_fraction),) if grammar == "corpus" else ()
    parses = parse(_GRAMMARS[grammar], text, *args)
    if not parses:
        raise ValueError(f"text is not in the {grammar} grammar: {text[:80]!r}...")
    if len(parses) > 1:
        raise ValueError(f"text is ambiguous in the {grammar} grammar: {text[:80]!r}...")
    return parses[0].bits


def entropy_floor_bpb(docs: list[Document]) -> float:
    """Exact entropy floor of a split in bits per UTF-8 byte: total bits / total bytes."""
    n_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
    if n_bytes == 0:
        raise ValueError("no text")
    return math.fsum(d.bits for d in docs) / n_bytes


def write_documents(path: str | Path, docs: Iterable[Document]) -> dict:
    """Write documents as JSONL, one ``{"text", "bits", "kind"}`` per line.

    Returns ``{"docs", "bytes", "bits", "entropy_floor_bpb"}``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = n_bytes = 0
    bits: list[float] = []
    with path.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc.text, "bits": doc.bits, "kind": doc.kind}, ensure_ascii=False))
            f.write("\n")
            n += 1
            n_bytes += len(doc.text.encode("utf-8"))
            bits.append(doc.bits)
    total = math.fsum(bits)
    return {
        "docs": n,
        "bytes": n_bytes,
        "bits": total,
        "entropy_floor_bpb": total / n_bytes if n_bytes else float("nan"),
    }


def write_corpus(path: str | Path, n_docs: int, seed: int = 0, chat_fraction: float = 0.3) -> dict:
    """Write `generate_corpus` documents as JSONL (see `write_documents`), without holding them in memory."""
    return write_documents(path, _iter_docs(n_docs, seed, chat_fraction))
