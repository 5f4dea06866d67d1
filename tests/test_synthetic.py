"""Tests for the synthetic corpus: determinism, exact entropy accounting, unambiguity, QA, ChatML, speed."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jojo.data import synthetic as syn
from jojo.data.synthetic import (
    EOT,
    IM_END,
    IM_START,
    QA_KINDS,
    Dist,
    Document,
    answer_question,
    chat_program,
    corpus_program,
    entropy_floor_bpb,
    generate_chats,
    generate_corpus,
    generate_stories,
    heldout_questions,
    iter_corpus_text,
    parse,
    parse_chatml,
    question_program,
    render_chat,
    sample,
    score_text,
    story_program,
    write_corpus,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")


# ---------------------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------------------


def test_same_seed_same_output_different_seed_differs():
    for gen in (generate_stories, generate_chats, generate_corpus):
        a, b, c = gen(60, seed=7), gen(60, seed=7), gen(60, seed=8)
        assert a == b
        assert [d.text for d in a] != [d.text for d in c]
    assert list(iter_corpus_text(40, seed=3)) == [d.text for d in generate_corpus(40, seed=3)]
    assert heldout_questions(30, seed=5) == heldout_questions(30, seed=5)
    assert heldout_questions(30, seed=5) != heldout_questions(30, seed=6)


def _digest(n: int, seed: int) -> str:
    h = hashlib.sha256()
    for d in generate_corpus(n, seed=seed):
        h.update(d.text.encode())
        h.update(repr(d.bits).encode())
    return h.hexdigest()


def test_identical_across_processes():
    code = (
        "import hashlib\n"
        "from jojo.data.synthetic import generate_corpus\n"
        "h = hashlib.sha256()\n"
        "for d in generate_corpus(200, seed=11):\n"
        "    h.update(d.text.encode()); h.update(repr(d.bits).encode())\n"
        "print(h.hexdigest())\n"
    )
    outs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONPATH": SRC, "PYTHONHASHSEED": hash_seed}
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outs.add(res.stdout.strip())
    assert outs == {_digest(200, 11)}


# ---------------------------------------------------------------------------------------------------------
# entropy accounting on a tiny hand-checked grammar
# ---------------------------------------------------------------------------------------------------------

TINY_NAMES = Dist(("Ann", "Bob", "Cy", "Dee"))  # uniform: 2 bits
TINY_LETTERS = Dist(("a", "b", "c"), (0.5, 0.25, 0.25))  # 1, 2, 2 bits
TINY_FIXED = Dist(("!",))  # a single value: not a random choice, 0 bits


def tiny_program(g):
    g.say(g.choice(TINY_NAMES))
    g.say(" says ")
    letter = g.choice(TINY_LETTERS)
    g.say(letter)
    g.say(g.choice(TINY_FIXED))
    return letter


def test_tiny_grammar_bits_match_hand_computation():
    assert TINY_LETTERS.entropy() == 1.5
    assert TINY_NAMES.entropy() == 2.0
    assert TINY_FIXED.entropy() == 0.0
    expected = {"a": 3.0, "b": 4.0, "c": 4.0}
    rng = random.Random(0)
    n = 20000
    total = 0.0
    seen = set()
    for _ in range(n):
        s = sample(tiny_program, rng, record=True)
        assert s.bits == expected[s.result]  # exact
        assert len(s.choices) == 2  # the fixed "!" is not a draw
        seen.add(s.text)
        total += s.bits
    assert len(seen) == 12
    # empirical mean code length vs the analytical entropy 2 + 1.5 (std of bits is 0.5 -> s.e. 0.0035)
    assert abs(total / n - 3.5) < 0.03
    ps = parse(tiny_program, "Cy says b!")
    assert len(ps) == 1 and ps[0].choices == (2, 1) and ps[0].bits == 4.0 and ps[0].result == "b"
    assert parse(tiny_program, "Cy says d!") == []
    assert parse(tiny_program, "Cy says b!!") == []


def test_randint_bits_and_letter_frequencies():
    def prog(g):
        g.say(str(g.randint(0, 7)))
        g.say(",")
        g.say(str(g.randint(5, 5)))  # one value: no bits

    rng = random.Random(1)
    for _ in range(100):
        s = sample(prog, rng)
        assert s.bits == 3.0
        assert parse(prog, s.text)[0].bits == 3.0
    counts = {"a": 0, "b": 0, "c": 0}
    rng = random.Random(2)
    g = syn.Sampler(rng)
    for _ in range(40000):
        counts[g.choice(TINY_LETTERS)] += 1
    assert abs(counts["a"] / 40000 - 0.5) < 0.015 and abs(counts["c"] / 40000 - 0.25) < 0.015


def test_parser_detects_ambiguity():
    first = Dist(("a", "ab"))
    second = Dist(("b", "c"))
    more = Dist(("more", "stop"))

    def ambiguous(g):
        g.say(g.choice(first))
        if g.choice(more) == "more":
            g.say(g.choice(second))

    ps = parse(ambiguous, "ab")  # "a"+"b" and "ab"+stop
    assert len(ps) == 2
    assert sorted(p.choices for p in ps) == [(0, 0, 0), (1, 1)]


def test_dist_validation():
    with pytest.raises(ValueError):
        Dist(())
    with pytest.raises(ValueError):
        Dist(("a", "b"), (1.0, 0.0))
    with pytest.raises(ValueError):
        Dist(("a", "b"), (1.0,))
    with pytest.raises(ValueError):
        generate_corpus(3, chat_fraction=1.5)


# ---------------------------------------------------------------------------------------------------------
# unambiguity of the real grammar: the text alone gives back the choices and the bits
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "program,args,n",
    [
        (story_program, (), 300),
        (chat_program, (), 300),
        (corpus_program, (syn._kind_dist(0.3),), 200),
        (question_program, (), 300),
    ],
)
def test_text_determines_choices(program, args, n):
    rng = random.Random(f"unambiguity-{program.__name__}")
    for _ in range(n):
        s = sample(program, rng, *args, record=True)
        ps = parse(program, s.text, *args)
        assert len(ps) == 1, s.text
        assert ps[0].choices == s.choices
        assert ps[0].bits == s.bits
        assert ps[0].result == s.result


def test_score_text_equals_document_bits():
    for d in generate_stories(100, seed=1):
        assert score_text(d.text, "story") == d.bits
    for d in generate_chats(100, seed=1):
        assert score_text(d.text, "chat") == d.bits
    docs = generate_corpus(200, seed=1, chat_fraction=0.3)
    assert {d.kind for d in docs} == {"story", "chat"}
    for d in docs:
        assert score_text(d.text, "corpus", chat_fraction=0.3) == d.bits
        # the mixture choice is counted: bits = -log2 P(kind) + bits of the text under its own grammar
        p_kind = 0.3 if d.kind == "chat" else 0.7
        assert d.bits == pytest.approx(-math.log2(p_kind) + score_text(d.text, d.kind), abs=1e-9)


def test_deterministic_mixture_choice_costs_nothing():
    for d in generate_corpus(50, seed=2, chat_fraction=0.0):
        assert d.kind == "story" and d.bits == score_text(d.text, "story")
    for d in generate_corpus(50, seed=2, chat_fraction=1.0):
        assert d.kind == "chat" and d.bits == score_text(d.text, "chat")


def test_score_text_rejects_foreign_text():
    story = generate_stories(1, seed=4)[0].text
    with pytest.raises(ValueError):
        score_text(story.replace(".", "!", 1), "story")
    with pytest.raises(ValueError):
        score_text(story + " ", "story")
    with pytest.raises(ValueError):
        score_text(story, "chat")
    with pytest.raises(ValueError):
        score_text(story, "nope")


# ---------------------------------------------------------------------------------------------------------
# content
# ---------------------------------------------------------------------------------------------------------

NAMES = [p.name for p in syn._PEOPLE]


def test_stories_shape_and_recurring_entities():
    docs = generate_stories(500, seed=0)
    sizes = [len(d.text.encode()) for d in docs]
    assert min(sizes) >= 250 and max(sizes) <= 900
    assert 350 <= sum(sizes) / len(sizes) <= 550
    for d in docs:
        assert d.kind == "story" and d.bits > 0
        assert d.text.count("\n") == 2 and IM_START not in d.text and EOT not in d.text
        # the hero is the first name mentioned; the friend is the second distinct one
        order = sorted((d.text.index(n), n) for n in NAMES if re.search(rf"\b{n}\b", d.text))
        assert len(order) == 2, d.text
        (_, hero), (_, friend) = order
        assert len(re.findall(rf"\b{hero}\b", d.text)) >= 3
        assert len(re.findall(rf"\b{friend}\b", d.text)) >= 2
        assert hero in d.text.split("\n")[2]  # named again in the last paragraph


def test_chatml_structure():
    docs = generate_chats(400, seed=0)
    assert {d.kind for d in docs} == {"chat"}
    for d in docs:
        assert d.text.startswith(IM_START) and d.text.endswith(IM_END + "\n")
        assert EOT not in d.text
        messages = parse_chatml(d.text)
        assert render_chat(messages) == d.text
        roles = [m["role"] for m in messages]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles and len(roles) % 2 == 0
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert d.text.count(IM_START) == d.text.count(IM_END) == len(messages)
    assert render_chat([{"role": "user", "content": "Hi!"}]) == "<|im_start|>user\nHi!<|im_end|>\n"
    with pytest.raises(ValueError):
        parse_chatml("<|im_start|>user\nHi!")


def test_chat_answers_are_functions_of_the_question():
    n_qa = 0
    for d in generate_chats(400, seed=3):
        messages = [m for m in parse_chatml(d.text) if m["role"] != "system"]
        for user, assistant in zip(messages[::2], messages[1::2]):
            answer = answer_question(user["content"])
            if answer is not None:
                n_qa += 1
                assert assistant["content"] == answer
    assert n_qa > 300
    assert answer_question("Hello!") is None
    assert answer_question("What is 3 plus 4?") == "3 plus 4 is 7."
    assert answer_question("What is 10 - 4?") == "10 minus 4 is 6."
    assert answer_question("Count from 3 to 6.") == "3, 4, 5, 6."
    assert answer_question("What colour is a banana?") == "A banana is yellow."
    assert answer_question("What is 11 plus 4?") is None  # outside the closed world


def test_heldout_questions():
    qs = heldout_questions(1000)
    assert qs == heldout_questions(1000, seed=12345)
    assert {q.kind for q in qs} == set(QA_KINDS)
    for q in qs:
        assert answer_question(q.question) == q.answer
        if q.kind == "add":
            a, b = map(int, re.findall(r"\d+", q.question))
            assert q.answer == f"{a} plus {b} is {a + b}." and 0 <= a <= 10 and 0 <= b <= 10
        elif q.kind == "sub":
            a, b = map(int, re.findall(r"\d+", q.question))
            assert q.answer == f"{a} minus {b} is {a - b}." and 0 <= b <= a <= 10
        elif q.kind == "count":
            a, b = map(int, re.findall(r"\d+", q.question))
            assert q.answer == ", ".join(map(str, range(a, b + 1))) + "." and a < b
    # a separate random stream: for the same seed, no training stream yields the same questions
    for seed in (0, 12345):
        held = [q.question for q in heldout_questions(50, seed=seed)]
        for stream in ("stories", "chats", "corpus"):
            rng = syn._rng(stream, seed)
            assert held != [sample(question_program, rng).text for _ in range(50)]


def test_entropy_floor_and_write_corpus(tmp_path):
    docs = generate_corpus(2000, seed=0)
    floor = entropy_floor_bpb(docs)
    print(f"\nentropy floor of generate_corpus(2000, seed=0): {floor:.4f} bits/byte")
    assert 0.05 < floor < 0.5
    n_chat = sum(d.kind == "chat" for d in docs)
    assert 0.25 < n_chat / len(docs) < 0.35
    summary = write_corpus(tmp_path / "c.jsonl", 300, seed=0)
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text(encoding="utf-8").splitlines()]
    expected = generate_corpus(300, seed=0)
    assert [Document(r["text"], r["bits"], r["kind"]) for r in rows] == expected
    assert summary["docs"] == 300
    assert summary["bytes"] == sum(len(d.text.encode()) for d in expected)
    assert summary["bits"] == pytest.approx(sum(d.bits for d in expected))
    assert summary["entropy_floor_bpb"] == pytest.approx(entropy_floor_bpb(expected))


def test_generation_speed():
    generate_corpus(200, seed=99)  # warm up
    start = time.perf_counter()
    docs = generate_corpus(5000, seed=99)
    elapsed = time.perf_counter() - start
    n_bytes = sum(len(d.text.encode()) for d in docs)
    rate = n_bytes / elapsed / 1e6
    print(f"\nsynthetic generation: {n_bytes / 1e6:.2f} MB in {elapsed:.3f} s = {rate:.1f} MB/s")
    assert n_bytes > 1.5e6
    assert rate >= 1.0
