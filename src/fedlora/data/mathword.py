"""``data.dataset = "math-word"``: grade-school word problems with worked solutions in GSM8K's format.

Nothing can be downloaded at run time, so the problems are *generated*: five families (shopping and change,
rates and time, sharing and ratios, percentages, multi-step combinations), each with several templates of 2–5
arithmetic operations, integer answers, and varied names, items and wording. A solution is one reasoning line
per step, then ``#### <answer>`` (GSM8K's layout, without its ``<<48/2=24>>`` calculator annotations)::

    Maya buys 3 notebooks at $4 each, so the notebooks cost 3 * 4 = $12.
    ...
    #### 34

Each example's family is its partition label, so a Dirichlet or pathological split gives clients different
kinds of problems. ``data.max_examples`` problems are made per seed (0: :data:`DEFAULT_SIZE`); the global test
set (``data.test_fraction`` of them) is generated from its own random stream, apart from the training problems,
and a test question equal to a training question is replaced (checked again at the end: no test problem is
in training).

With ``data.path`` set, the same dataset reads the user's GSM8K-format JSON Lines file instead (``question``,
``answer`` ending in ``#### <number>``); its partition label is the number of reasoning lines (1, 2, ..., 6+).

Evaluation (:func:`answers_match`) compares **final numbers**, GSM8K's convention: the number after the last
``####`` of the generation, else the last number in it, against the reference's.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path

import numpy as np

from fedlora.config import DataConfig
from fedlora.data.instructions import InstructionDataset
from fedlora.data.userfiles import _read_text, jsonl_records
from fedlora.errors import DataError

FAMILIES = ("shopping", "rates", "sharing", "percentages", "multi-step")
DEFAULT_SIZE = 2400  # problems made when data.max_examples = 0 (the generator has no natural size)
INSTRUCTION = ("Solve this math word problem. Reason step by step, one step per line, then write the final "
               "answer as a number on the last line after '####'.")
STEP_LABELS = ("1 step", "2 steps", "3 steps", "4 steps", "5 steps", "6+ steps")  # labels of a user's GSM8K file
_TRAIN, _TEST = 0, 1  # spawn keys of the two random streams
_MAX_TRIES = 50  # draws per problem before giving up on a new, unique question (the space is far larger)

_NAMES = (("Maya", "she"), ("Liam", "he"), ("Sofia", "she"), ("Noah", "he"), ("Aisha", "she"), ("Mateo", "he"),
          ("Chen", "he"), ("Priya", "she"), ("Omar", "he"), ("Elena", "she"), ("Kofi", "he"), ("Hana", "she"),
          ("Lucas", "he"), ("Zara", "she"), ("Ivan", "he"), ("Amara", "she"), ("Diego", "he"), ("Yuki", "she"),
          ("Ben", "he"), ("Leila", "she"), ("Tom", "he"), ("Nadia", "she"), ("Sam", "he"), ("Grace", "she"))
_ITEMS = (("notebook", 2, 6), ("pen", 1, 3), ("sandwich", 4, 9), ("book", 6, 15), ("toy car", 3, 8),
          ("apple", 1, 2), ("T-shirt", 8, 15), ("mug", 4, 10), ("ticket", 5, 12), ("plant", 3, 11),
          ("candle", 2, 7), ("puzzle", 7, 14))
_MACHINES = (("machine", "toys"), ("printer", "pages"), ("bakery oven", "loaves"), ("robot", "boxes"),
             ("factory line", "bottles"))
_THINGS = ("stickers", "marbles", "cookies", "stamps", "cards", "beads", "shells", "pencils")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
_STORES = ("a store", "the market", "a shop", "the fair")

Problem = tuple[str, list[str], int]  # question, reasoning lines, answer


def _person(rng: random.Random, avoid: str = "") -> tuple[str, str]:
    while True:
        name, pron = rng.choice(_NAMES)
        if name != avoid:
            return name, pron


def _plural(item: str, n: int) -> str:
    return item if n == 1 else item + "s"


# ---- families ---------------------------------------------------------------------------------------------


def _shopping(rng: random.Random) -> Problem:
    """Items × prices, summed (1–3 kinds), optionally a coupon, optionally the change from a bill: 2–5 steps."""
    name, pron = _person(rng)
    kinds = rng.choice((1, 1, 2, 2, 3))
    items = rng.sample(_ITEMS, kinds)
    buys = [(item, rng.randint(2, 9), rng.randint(lo, hi)) for item, lo, hi in items]
    lines, costs = [], []
    for item, qty, price in buys:
        costs.append(qty * price)
        lines.append(f"The {_plural(item, qty)} cost {qty} * {price} = ${qty * price}.")
    total = sum(costs)
    if kinds > 1:
        lines.append(f"Altogether {pron} spends {' + '.join(map(str, costs))} = ${total}.")
    # At most 5 operations: a coupon only with one or two kinds of item, the change only below 4 steps.
    coupon = rng.randint(2, 5) if (kinds == 1 or (kinds == 2 and rng.random() < 0.4)) and total > 10 else 0
    if coupon:
        lines.append(f"With the coupon {pron} pays {total} - {coupon} = ${total - coupon}.")
        total -= coupon
    verb = rng.choice(("buys", "picks up", "orders", "gets"))
    parts = [f"{qty} {_plural(item, qty)} at ${price} each" for item, qty, price in buys]
    listing = parts[0] if kinds == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    question = f"{name} {verb} {listing} at {rng.choice(_STORES)}."
    if coupon:
        question += f" {pron.capitalize()} has a coupon for ${coupon} off the total."
    if len(lines) < 4 and (len(lines) < 2 or rng.random() < 0.7):
        bill = rng.choice([b for b in (20, 50, 100, 200, 500) if b >= total][:2])
        lines.append(f"The change is {bill} - {total} = ${bill - total}.")
        question += f" {pron.capitalize()} pays with a ${bill} bill. How much change does {pron} get?"
        return question, lines, bill - total
    question += rng.choice((f" How much does {pron} pay?", f" How many dollars does {pron} spend in total?"))
    return question, lines, total


def _rates(rng: random.Random) -> Problem:
    """Work rates over days, travel at two speeds, days left to finish a book, a tank filling and draining."""
    kind = rng.randrange(4)
    name, pron = _person(rng)
    if kind == 0:
        machine, things = rng.choice(_MACHINES)
        rate, h1, h2 = rng.randint(6, 40), rng.randint(2, 9), rng.randint(2, 9)
        day1, day2 = rng.sample(_DAYS, 2)
        lines = [f"On {day1} it makes {rate} * {h1} = {rate * h1} {things}.",
                 f"On {day2} it makes {rate} * {h2} = {rate * h2} {things}.",
                 f"In total it makes {rate * h1} + {rate * h2} = {rate * (h1 + h2)} {things}."]
        q = (f"A {machine} makes {rate} {things} per hour. It runs for {h1} hours on {day1} and {h2} hours on {day2}. "
             f"How many {things} does it make on the two days?")
        return q, lines, rate * (h1 + h2)
    if kind == 1:
        v1, t1, v2, t2 = rng.randint(30, 70), rng.randint(1, 4), rng.randint(20, 60), rng.randint(1, 3)
        d1, d2 = v1 * t1, v2 * t2
        lines = [f"First {pron} drives {v1} * {t1} = {d1} miles.", f"Then {pron} drives {v2} * {t2} = {d2} miles.",
                 f"Altogether {pron} drives {d1} + {d2} = {d1 + d2} miles."]
        q = (f"{name} drives at {v1} miles per hour for {t1} hours, then at {v2} miles per hour for {t2} hours. ")
        if rng.random() < 0.5:
            trip = d1 + d2 + rng.randint(10, 120)
            lines.append(f"{pron.capitalize()} still has {trip} - {d1 + d2} = {trip - d1 - d2} miles to go.")
            return q + f"The whole trip is {trip} miles. How many miles are left?", lines, trip - d1 - d2
        return q + f"How many miles does {pron} drive?", lines, d1 + d2
    if kind == 2:
        per_day, done, left = rng.randint(5, 30), rng.randint(2, 8), rng.randint(2, 10)
        pages = per_day * (done + left)
        lines = [f"In {done} days {pron} reads {per_day} * {done} = {per_day * done} pages.",
                 f"{pages} - {per_day * done} = {pages - per_day * done} pages are left.",
                 f"That takes {pages - per_day * done} / {per_day} = {left} more days."]
        q = (f"A book has {pages} pages. {name} reads {per_day} pages every day. After {done} days, how many more "
             "days does it take to finish the book?")
        return q, lines, left
    fill, minutes = rng.randint(6, 20), rng.randint(3, 15)
    drain = rng.randint(1, fill - 2)
    net = fill - drain
    lines = [f"The tank gains {fill} - {drain} = {net} liters per minute.",
             f"It is full after {net * minutes} / {net} = {minutes} minutes."]
    q = (f"A tank holds {net * minutes} liters. A pipe fills it with {fill} liters per minute while a leak loses "
         f"{drain} liters per minute. Starting empty, how many minutes does it take to fill?")
    return q, lines, minutes


def _sharing(rng: random.Random) -> Problem:
    """Give some away and share the rest equally; a ratio of a whole; a recipe scaled up."""
    kind = rng.randrange(3)
    name, pron = _person(rng)
    if kind == 0:
        things, kept, kids, each = rng.choice(_THINGS), rng.randint(2, 15), rng.randint(2, 8), rng.randint(3, 12)
        total = kept + kids * each
        lines = [f"After keeping {kept}, {total} - {kept} = {total - kept} {things} are left.",
                 f"Each friend gets {total - kept} / {kids} = {each} {things}."]
        q = (f"{name} has {total} {things}. {pron.capitalize()} keeps {kept} and shares the rest equally among "
             f"{kids} friends. How many {things} does each friend get?")
        return q, lines, each
    if kind == 1:
        a, b, unit = rng.randint(1, 6), rng.randint(1, 7), rng.randint(2, 12)
        if a == b:
            b += 1
        total = (a + b) * unit
        lines = [f"The ratio has {a} + {b} = {a + b} parts.", f"Each part is {total} / {a + b} = {unit} students.",
                 f"There are {b} * {unit} = {b * unit} girls."]
        q = f"In a club the ratio of boys to girls is {a}:{b}. The club has {total} members. "
        if rng.random() < 0.5:
            more, fewer = ("girls", "boys") if b > a else ("boys", "girls")
            lines += [f"There are {a} * {unit} = {a * unit} boys.",
                      f"There are {max(a, b) * unit} - {min(a, b) * unit} = {abs(b - a) * unit} more {more}."]
            return q + f"How many more {more} than {fewer} are in the club?", lines, abs(b - a) * unit
        return q + "How many girls are in the club?", lines, b * unit
    cups, batch, times = rng.randint(2, 5), rng.randint(6, 24), rng.randint(2, 6)
    lines = [f"{batch * times} cookies are {batch * times} / {batch} = {times} batches.",
             f"{pron.capitalize()} needs {times} * {cups} = {times * cups} cups of flour."]
    q = (f"{name}'s recipe uses {cups} cups of flour for every {batch} cookies. How many cups of flour does "
         f"{pron} need to bake {batch * times} cookies?")
    return q, lines, times * cups


def _percentages(rng: random.Random) -> Problem:
    """A discount, a test score, a population increase, savings over months (whole numbers by construction)."""
    kind = rng.randrange(4)
    name, pron = _person(rng)
    pct = rng.choice((10, 20, 25, 30, 40, 50, 60, 75, 80))
    step = 100 // np.gcd(pct, 100)  # the base is a multiple of this, so pct% of it is whole
    base = step * rng.randint(1, max(1, 400 // step))
    part = base * pct // 100
    if kind == 0:
        item = rng.choice(("jacket", "bicycle", "lamp", "backpack", "video game"))
        lines = [f"The discount is {base} * {pct} / 100 = ${part}.",
                 f"The sale price is {base} - {part} = ${base - part}."]
        return (f"A {item} costs ${base}. It is on sale for {pct}% off. What is the sale price in dollars?",
                lines, base - part)
    if kind == 1:
        lines = [f"{pron.capitalize()} answers {base} * {pct} / 100 = {part} questions correctly.",
                 f"{pron.capitalize()} gets {base} - {part} = {base - part} wrong."]
        question = f"A test has {base} questions. {name} answers {pct}% of them correctly. "
        return question + f"How many does {pron} get wrong?", lines, base - part
    if kind == 2:
        lines = [f"The town grows by {base} * {pct} / 100 = {part} people.",
                 f"Now it has {base} + {part} = {base + part} people."]
        return (f"A town has {base} people. Its population grows by {pct}%. How many people live there now?",
                lines, base + part)
    months = rng.randint(2, 12)
    lines = [f"Each month {pron} saves {base} * {pct} / 100 = ${part}.",
             f"In {months} months {pron} saves {part} * {months} = ${part * months}."]
    return (f"{name} earns ${base} a month and saves {pct}% of it. How much does {pron} save in {months} months?",
            lines, part * months)


def _multi_step(rng: random.Random) -> Problem:
    """Wages, rent and savings; legs on a farm; trays of muffins sold in two batches; a family outing."""
    kind = rng.randrange(4)
    name, pron = _person(rng)
    if kind == 0:
        wage, hours, days = rng.randint(8, 25), rng.randint(3, 8), rng.randint(2, 6)
        earned = wage * hours * days
        rent = rng.randrange(10, earned - 10, 2) if earned % 2 == 0 else rng.randrange(11, earned - 10, 2)
        left = earned - rent
        lines = [f"Each day {pron} earns {wage} * {hours} = ${wage * hours}.",
                 f"In {days} days {pron} earns {wage * hours} * {days} = ${earned}.",
                 f"After the bills {pron} has {earned} - {rent} = ${left}.",
                 f"{pron.capitalize()} saves {left} / 2 = ${left // 2}."]
        q = (f"{name} earns ${wage} an hour and works {hours} hours a day for {days} days. {pron.capitalize()} pays "
             f"${rent} in bills and saves half of what is left. How much does {pron} save?")
        return q, lines, left // 2
    if kind == 1:
        cows, hens = rng.randint(3, 20), rng.randint(5, 40)
        sold = rng.randint(1, cows - 1)
        lines = [f"{cows} - {sold} = {cows - sold} cows are left.",
                 f"The cows have {cows - sold} * 4 = {(cows - sold) * 4} legs.",
                 f"The chickens have {hens} * 2 = {hens * 2} legs.",
                 f"Together that is {(cows - sold) * 4} + {hens * 2} = {(cows - sold) * 4 + hens * 2} legs."]
        q = (f"A farmer has {cows} cows and {hens} chickens. He sells {sold} cows. How many legs do the animals "
             "left on the farm have?")
        return q, lines, (cows - sold) * 4 + hens * 2
    if kind == 2:
        trays, per = rng.randint(2, 8), rng.choice((6, 9, 12))
        baked = trays * per
        morning = rng.randint(1, baked - 3)
        while (baked - morning) % 3:
            morning -= 1
        rest = baked - morning
        lines = [f"{pron.capitalize()} bakes {trays} * {per} = {baked} muffins.",
                 f"After the morning {baked} - {morning} = {rest} are left.",
                 f"In the afternoon {pron} sells {rest} / 3 = {rest // 3}.",
                 f"{rest} - {rest // 3} = {rest - rest // 3} muffins are left."]
        q = (f"{name} bakes {trays} trays of {per} muffins. {pron.capitalize()} sells {morning} in the morning and a "
             "third of the rest in the afternoon. How many muffins are left?")
        return q, lines, rest - rest // 3
    adult, child, na, nc = rng.randint(8, 20), rng.randint(3, 9), rng.randint(1, 3), rng.randint(1, 4)
    snack, ns = rng.randint(2, 6), rng.randint(1, 5)
    total = adult * na + child * nc + snack * ns
    lines = [f"Adult tickets cost {na} * {adult} = ${na * adult}.",
             f"Child tickets cost {nc} * {child} = ${nc * child}.",
             f"Snacks cost {ns} * {snack} = ${ns * snack}.",
             f"In total they pay {na * adult} + {nc * child} + {ns * snack} = ${total}."]
    q = (f"Tickets to the zoo cost ${adult} for adults and ${child} for children. {name} goes with {na} "
         f"{_plural('adult', na)} (counting {name}) and {nc} {_plural('child', nc).replace('childs', 'children')}. "
         f"They also buy {ns} {_plural('snack', ns)} at ${snack} each. How much do they pay in total?")
    return q, lines, total


_MAKERS: tuple[Callable[[random.Random], Problem], ...] = (_shopping, _rates, _sharing, _percentages, _multi_step)


def solution_text(lines: list[str], answer: int) -> str:
    """GSM8K's layout: reasoning lines, then ``#### <answer>``."""
    return "\n".join([*lines, f"#### {answer}"])


def generate(n: int, seed: int, stream: int, avoid: frozenset[str] = frozenset()) -> list[tuple[str, str, int]]:
    """``n`` distinct problems (question, solution, family index), families in turn, none of whose question is in
    ``avoid``; reproducible from (``seed``, ``stream``)."""
    state = np.random.SeedSequence(seed % 2**64, spawn_key=(stream,)).generate_state(2, dtype=np.uint64)
    rng = random.Random(int(state[0]) << 64 | int(state[1]))
    seen, out = set(avoid), []
    for i in range(n):
        family = i % len(_MAKERS)
        for _ in range(_MAX_TRIES):
            question, lines, answer = _MAKERS[family](rng)
            if question not in seen:
                break
        else:  # pragma: no cover - the space of each family is far larger than any run
            raise DataError(f"math-word: could not draw a new {FAMILIES[family]} problem after {_MAX_TRIES} tries")
        seen.add(question)
        out.append((question, solution_text(lines, answer), family))
    return out


def math_word(cfg: DataConfig) -> InstructionDataset:
    """The generated dataset: training problems first, then the test problems (``held_out``)."""
    size = cfg.max_examples or DEFAULT_SIZE
    n_test = min(max(round(size * cfg.test_fraction), 1), size - 1)
    train = generate(size - n_test, cfg.seed, _TRAIN)
    test = generate(n_test, cfg.seed, _TEST, avoid=frozenset(q for q, _, _ in train))
    overlap = {q for q, _, _ in train} & {q for q, _, _ in test}
    if overlap:  # generate() avoids it; this is the check the issue asks for, kept cheap and explicit
        raise DataError(f"math-word: {len(overlap)} test problem(s) also in training")
    rows = train + test
    return InstructionDataset("math-word", (INSTRUCTION,) * len(rows), tuple(q for q, _, _ in rows),
                              tuple(s for _, s, _ in rows), np.array([f for _, _, f in rows], dtype=np.int64),
                              FAMILIES, held_out=np.arange(len(train), len(rows), dtype=np.int64))


def read_gsm8k(path: str | Path) -> InstructionDataset:
    """A user's GSM8K-format JSON Lines file: ``question`` and ``answer`` (reasoning, then ``#### <number>``)."""
    path = Path(path).expanduser()
    records = jsonl_records(path, _read_text(path))
    if not records:
        raise DataError(f"data file {str(path)!r} has no rows")
    questions, answers, labels = [], [], []
    for line, record in records:
        q, a = record.get("question"), record.get("answer")
        if not isinstance(q, str) or not q.strip() or not isinstance(a, str) or not a.strip():
            raise DataError(f"data file {str(path)!r}, line {line}: GSM8K format needs non-empty string fields "
                            f"'question' and 'answer'; got keys {sorted(record)}")
        if "####" not in a or final_number(a.rsplit("####", 1)[1]) is None:
            raise DataError(f"data file {str(path)!r}, line {line}: the answer must end with '#### <number>'")
        steps = len([x for x in a.rsplit("####", 1)[0].splitlines() if x.strip()])
        questions.append(q.strip())
        answers.append(a.strip())
        labels.append(min(max(steps, 1), len(STEP_LABELS)) - 1)
    return InstructionDataset(path.name, (INSTRUCTION,) * len(questions), tuple(questions), tuple(answers),
                              np.array(labels, dtype=np.int64), STEP_LABELS)


# ---- evaluation -------------------------------------------------------------------------------------------

# A number not glued to a preceding digit or point: "-3", "1,250", "2.5", "$34" → 34; "5-3" → 5 and 3.
_NUMBER = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def final_number(text: str) -> Decimal | None:
    """GSM8K's final answer of ``text``: the first number after its last ``####``, else its last number."""
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])
        if found:
            return _decimal(found[0])
    found = _NUMBER.findall(text)
    return _decimal(found[-1]) if found else None


def _decimal(s: str) -> Decimal | None:
    try:
        return Decimal(s.replace(",", ""))
    except InvalidOperation:  # pragma: no cover - the pattern only matches valid numbers
        return None


def answers_match(generation: str, reference: str) -> bool:
    """Whether the final numbers agree (``18`` equals ``18.0``); no number in the generation is wrong."""
    got, want = final_number(generation), final_number(reference)
    return got is not None and want is not None and got == want


def load(cfg: DataConfig) -> InstructionDataset:
    """Reader of the math-word dataset plugin: the user's GSM8K-format file (``data.path``, stratified subsample of
    ``data.max_examples`` by family) or the generated problems (sized with their own test problems)."""
    if cfg.path:
        from fedlora.data.partition import stratified_subsample

        dataset = read_gsm8k(cfg.path)
        if 0 < cfg.max_examples < len(dataset):
            dataset = dataset.subset(stratified_subsample(dataset.labels, cfg.max_examples, cfg.seed))
        return dataset
    return math_word(cfg)

