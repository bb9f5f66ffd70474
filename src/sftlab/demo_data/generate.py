"""Write the demo data set: ``python -m sftlab.demo_data.generate [--out DIR]``.

Deterministic (one seeded ``random.Random``, no downloads): running it again writes the same bytes.

The task is field extraction with a verifiable answer. A short synthetic sentence about an order, a
person, an event or a booking; the user asks for some of its fields as JSON, keys in a given order. The
reply is exactly ``json.dumps(..., separators=(",", ":"))``. What makes it a task a 135M model has to
learn, rather than one it already does: the reply is JSON only (no prose, no code fence, one line),
keys follow the instruction's order (sometimes not the natural one), dates are rewritten to YYYY-MM-DD
("3 May 2024" -> "2024-05-03"), counts written as words or with thousands separators become numbers,
plural items become singular, and a key the text does not mention is ``null``.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

from sftlab.core.io import write_jsonl

SEED = 20240503
N_TRAIN, N_EVAL = 300, 60

FIRST = ["Maria", "John", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tom", "Fatima", "Lukas", "Sofia", "Chen",
         "Amara", "Noah", "Elena", "Kofi", "Hannah", "Mateo", "Yuki", "Ines", "David", "Zoë", "Ravi", "Clara",
         "Jonas", "Nadia", "Peter", "Mei", "Ahmed", "Julia", "Sven", "Rosa", "Ali", "Emma", "Björn", "Leila"]
LAST = ["Lopez", "Smith", "Tanaka", "Haddad", "Fischer", "Silva", "Patel", "Brown", "Khan", "Weber", "Rossi",
        "Wang", "Okafor", "Miller", "Petrova", "Mensah", "Schmidt", "García", "Sato", "Costa", "Cohen", "Novak",
        "Iyer", "Dubois", "Berg", "Nowak", "Jensen", "Li", "Hassan", "Meyer", "Larsen", "Moreno", "Kaya"]
CITIES = ["Berlin", "Paris", "Madrid", "Lisbon", "Rome", "Vienna", "Oslo", "Dublin", "Prague", "Warsaw",
          "Athens", "Cairo", "Nairobi", "Lagos", "Tokyo", "Osaka", "Seoul", "Mumbai", "Toronto", "Chicago",
          "Boston", "Denver", "Lima", "Bogotá", "Sydney", "Zurich", "Munich", "Hamburg", "Lyon", "Porto"]
ITEMS = [("lamp", "lamps"), ("chair", "chairs"), ("notebook", "notebooks"), ("mug", "mugs"),
         ("bicycle", "bicycles"), ("umbrella", "umbrellas"), ("keyboard", "keyboards"), ("backpack", "backpacks"),
         ("candle", "candles"), ("towel", "towels"), ("pillow", "pillows"), ("teapot", "teapots"),
         ("plant", "plants"), ("jacket", "jackets"), ("battery", "batteries"), ("box", "boxes"),
         ("knife", "knives"), ("shelf", "shelves"), ("glass", "glasses"), ("brush", "brushes")]
JOBS = ["nurse", "teacher", "baker", "pilot", "software engineer", "architect", "plumber", "journalist",
        "farmer", "dentist", "chef", "librarian", "electrician", "photographer", "pharmacist", "engineer"]
EVENTS = ["jazz concert", "book fair", "city marathon", "tech meetup", "food festival", "chess tournament",
          "film festival", "science fair", "flea market", "wine tasting", "art exhibition", "robotics contest"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]

# Keys per kind in their natural order, and keys a user might ask for that the text never states (-> null).
KEYS = {
    "order": ["name", "age", "city", "quantity", "item", "date"],
    "person": ["name", "age", "job", "city"],
    "event": ["event", "city", "date", "attendees"],
    "booking": ["name", "city", "date", "nights", "guests"],
}
ABSENT = {"order": ["email", "price"], "person": ["email", "company"], "event": ["price", "organizer"],
          "booking": ["email", "room"]}

# Every example has a system message: without one, SmolLM2's template inserts a 20-token default prompt.
SYSTEMS = [
    "JSON only. Dates as YYYY-MM-DD, numbers as digits, null if missing.",
    "Reply with JSON only.",
    "You extract data as compact JSON.",
    "You are a precise data extraction assistant.",
]
# Keeps every example under 120 tokens with SmolLM2's tokenizer and chat template (checked by hand:
# digits are one token each, so characters track tokens closely here).
MAX_CHARS = 280
PROMPTS = [
    "Extract {keys} from this text as JSON.\nText: {text}",
    "{text}\nReturn JSON with the keys {keys}, in that order.",
    "Text: {text}\nFields: {keys}\nJSON:",
    "Turn this into a JSON object with keys {keys} (same order): {text}",
    "Give me {keys} as JSON for: {text}",
]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _date(rng: random.Random) -> tuple[str, str]:
    """(as written in the text, ISO)."""
    y, m, d = rng.randint(2021, 2025), rng.randint(1, 12), rng.randint(1, 28)
    iso = f"{y}-{m:02d}-{d:02d}"
    style = rng.randrange(3)
    text = iso if style == 0 else f"{MONTHS[m - 1]} {d}, {y}" if style == 1 else f"{d} {MONTHS[m - 1]} {y}"
    return text, iso


def _count(rng: random.Random, n: int, one: str, many: str) -> str:
    """'3 lamps', 'three lamps', 'a lamp', '1 night'."""
    if n == 1:
        return rng.choice([f"1 {one}", f"{_article(one)} {one}"])
    shown = WORDS[n] if n < len(WORDS) and rng.random() < 0.3 else str(n)
    return f"{shown} {many}"


def _name(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def _order(rng: random.Random) -> tuple[str, dict]:
    name, age, city = _name(rng), rng.randint(18, 79), rng.choice(CITIES)
    one, many = rng.choice(ITEMS)
    qty = rng.randint(1, 12)
    date_text, iso = _date(rng)
    things = _count(rng, qty, one, many)
    text = rng.choice([
        f"{name}, {age}, ordered {things} from {city} on {date_text}.",
        f"On {date_text}, {name} ({age}) from {city} bought {things}.",
        f"{name} of {city} placed an order for {things} on {date_text}. The customer is {age}.",
        f"Order note: {things} for {name}, age {age}, shipping to {city}, dated {date_text}.",
    ])
    return text, {"name": name, "age": age, "city": city, "quantity": qty, "item": one, "date": iso}


def _person(rng: random.Random) -> tuple[str, dict]:
    name, age, city, job = _name(rng), rng.randint(19, 75), rng.choice(CITIES), rng.choice(JOBS)
    text = rng.choice([
        f"{name} is a {age}-year-old {job} living in {city}.",
        f"Meet {name}: {job}, {age} years old, based in {city}.",
        f"{name}, {age}, works as {_article(job)} {job} in {city}.",
        f"In {city}, {name} ({age}) has worked as {_article(job)} {job} for years.",
    ])
    return text, {"name": name, "age": age, "job": job, "city": city}


def _event(rng: random.Random) -> tuple[str, dict]:
    event, city = rng.choice(EVENTS), rng.choice(CITIES)
    date_text, iso = _date(rng)
    n = rng.choice([rng.randint(40, 999), rng.randint(1000, 9999)])
    shown = f"{n:,}" if n >= 1000 and rng.random() < 0.5 else str(n)
    text = rng.choice([
        f"The {event} in {city} on {date_text} drew {shown} visitors.",
        f"About {shown} people attended the {event} held in {city} on {date_text}.",
        f"{city} hosted {_article(event)} {event} on {date_text}; {shown} tickets were sold.",
    ])
    return text, {"event": event, "city": city, "date": iso, "attendees": n}


def _booking(rng: random.Random) -> tuple[str, dict]:
    name, city = _name(rng), rng.choice(CITIES)
    nights, guests = rng.randint(1, 14), rng.randint(1, 6)
    date_text, iso = _date(rng)
    n_txt, g_txt = _count(rng, nights, "night", "nights"), _count(rng, guests, "guest", "guests")
    text = rng.choice([
        f"{name} booked {n_txt} in {city} from {date_text} for {g_txt}.",
        f"Reservation: {name}, {g_txt}, {n_txt} in {city}, check-in {date_text}.",
        f"{name} will stay in {city} for {n_txt} starting {date_text}, with {g_txt}.",
    ])
    return text, {"name": name, "city": city, "date": iso, "nights": nights, "guests": guests}


MAKERS: dict[str, Callable[[random.Random], tuple[str, dict]]] = {
    "order": _order, "person": _person, "event": _event, "booking": _booking,
}


def extraction_example(rng: random.Random) -> tuple[str, dict]:
    """(sentence, {"messages": [...]}) for one extraction example."""
    kind = rng.choice(list(MAKERS))
    text, facts = MAKERS[kind](rng)
    keys = list(KEYS[kind])
    if rng.random() < 0.5:  # ask for a subset, kept in natural order
        keep = set(rng.sample(keys, rng.randint(2, len(keys) - 1)))
        keys = [k for k in keys if k in keep]
    if rng.random() < 0.35:  # an order the model has to follow rather than guess
        rng.shuffle(keys)
    if rng.random() < 0.12:  # a field the text does not state
        keys.insert(rng.randint(0, len(keys)), rng.choice(ABSENT[kind]))
    answer = json.dumps({k: facts.get(k) for k in keys}, ensure_ascii=False, separators=(",", ":"))
    prompt = rng.choice(PROMPTS).format(keys=", ".join(keys), text=text)
    messages = [{"role": "system", "content": rng.choice(SYSTEMS)}, {"role": "user", "content": prompt},
                {"role": "assistant", "content": answer}]
    return text, {"messages": messages}


# ---------------------------------------------------------------------------------------------------
# General (replay / forgetting) data: facts, arithmetic, definitions, conversions, small talk.

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
            ("Norway", "Oslo"), ("Portugal", "Lisbon"), ("Greece", "Athens"), ("Poland", "Warsaw"),
            ("Sweden", "Stockholm"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Peru", "Lima"),
            ("South Korea", "Seoul"), ("Finland", "Helsinki"), ("Thailand", "Bangkok")]
DEFINITIONS = [
    ("photosynthesis", "Photosynthesis is the process plants use to turn sunlight, water and carbon dioxide "
                       "into sugar and oxygen."),
    ("a noun", "A noun is a word that names a person, place, thing or idea, such as 'dog' or 'city'."),
    ("gravity", "Gravity is the force that pulls objects with mass toward each other, like an apple toward Earth."),
    ("a prime number", "A prime number is a whole number greater than 1 whose only divisors are 1 and itself."),
    ("evaporation", "Evaporation is when a liquid turns into a gas, like water drying in the sun."),
    ("a mammal", "A mammal is a warm-blooded animal with hair that feeds its young with milk."),
    ("a verb", "A verb is a word that describes an action or a state, such as 'run' or 'be'."),
    ("an ecosystem", "An ecosystem is a community of living things together with their environment."),
    ("democracy", "Democracy is a system of government in which people choose their leaders by voting."),
    ("a fraction", "A fraction is a part of a whole, written as one number over another, like 3/4."),
    ("an atom", "An atom is the smallest unit of a chemical element."),
    ("a volcano", "A volcano is an opening in the Earth's crust where molten rock, ash and gas escape."),
]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
             ("open", "closed"), ("early", "late"), ("full", "empty")]
SMALL_TALK = [
    ("Hi! How are you?", "I'm doing well, thank you! How can I help you today?"),
    ("Good morning!", "Good morning! What can I do for you?"),
    ("Thank you for your help.", "You're welcome! Let me know if you need anything else."),
    ("Can you tell me a fun fact?", "Sure! Octopuses have three hearts."),
    ("What should I do on a rainy day?", "You could read a book, watch a film, cook something new or call a friend."),
    ("I'm bored.", "How about a short walk, a puzzle, or learning a few words of a new language?"),
    ("Give me a tip for better sleep.", "Try to go to bed at the same time every night and avoid screens before sleep."),
    ("What is your name?", "I'm an AI assistant. You can just call me Assistant."),
    ("Suggest a name for a cat.", "How about Luna, Milo or Pepper?"),
    ("Say something kind.", "You are doing better than you think, and your effort matters."),
]
PEOPLE = ["Tom", "Anna", "Sam", "Lucy", "Ben", "Mia", "Leo", "Ella"]
FRUIT = ["apples", "oranges", "pears", "bananas", "plums"]


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    who, fruit = rng.choice(PEOPLE), rng.choice(FRUIT)
    a, b = rng.randint(2, 20), rng.randint(2, 12)
    kind = rng.randrange(3)
    if kind == 0:
        return (f"{who} has {a} {fruit} and buys {b} more. How many {fruit} does {who} have now?",
                f"{who} has {a} + {b} = {a + b} {fruit}.")
    if kind == 1:
        a = a + b  # keep the answer positive
        return (f"{who} had {a} {fruit} and gave away {b}. How many are left?",
                f"{a} - {b} = {a - b}, so {a - b} {fruit} are left.")
    return (f"There are {a} boxes with {b} {fruit} in each. How many {fruit} are there in total?",
            f"{a} x {b} = {a * b}, so there are {a * b} {fruit}.")


def _conversion(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(2, 9)
    kind = rng.randrange(3)
    if kind == 0:
        return f"How many minutes are in {n} hours?", f"There are {n * 60} minutes in {n} hours."
    if kind == 1:
        return f"How many centimeters are in {n} meters?", f"There are {n * 100} centimeters in {n} meters."
    return f"How many days are in {n} weeks?", f"There are {n * 7} days in {n} weeks."


def general_examples(rng: random.Random) -> list[dict]:
    pairs: list[tuple[str, str]] = []
    for country, capital in rng.sample(CAPITALS, 14):
        q = rng.choice([f"What is the capital of {country}?", f"Which city is the capital of {country}?"])
        pairs.append((q, f"The capital of {country} is {capital}."))
    seen: set[str] = set()
    while len(seen) < 14:
        q, a = _arithmetic(rng)
        if q not in seen:
            seen.add(q)
            pairs.append((q, a))
    for term, text in DEFINITIONS[:10]:
        pairs.append((rng.choice([f"What is {term}?", f"Define {term} in one sentence."]), text))
    seen.clear()
    while len(seen) < 8:
        q, a = _conversion(rng)
        if q not in seen:
            seen.add(q)
            pairs.append((q, a))
    for word, opposite in rng.sample(OPPOSITES, 4):
        pairs.append((f"What is the opposite of '{word}'?", f"The opposite of '{word}' is '{opposite}'."))
    pairs += SMALL_TALK
    rng.shuffle(pairs)
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


def build(seed: int = SEED) -> dict[str, list[dict]]:
    """The three splits, in memory. Train and eval share no sentence."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < N_TRAIN + N_EVAL:
        text, row = extraction_example(rng)
        if text not in seen and sum(len(m["content"]) for m in row["messages"]) <= MAX_CHARS:
            seen.add(text)
            rows.append(row)
    return {"train": rows[:N_TRAIN], "eval": rows[N_TRAIN:], "general": general_examples(rng)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sftlab.demo_data.generate", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent, help="folder for train/eval/general.jsonl")
    ap.add_argument("--seed", type=int, default=SEED, help="random seed (the shipped files use the default)")
    args = ap.parse_args(argv)
    for split, rows in build(args.seed).items():
        n = write_jsonl(args.out / f"{split}.jsonl", rows)
        print(f"wrote {n} examples to {args.out / f'{split}.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
