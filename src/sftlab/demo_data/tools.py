"""Write the tool-calling demo data: ``python -m sftlab.demo_data.tools [--out DIR]``.

Deterministic (one seeded ``random.Random``): running it again writes the same bytes. OpenAI
``messages`` records, each with the same three function schemas under ``tools``:

- ``get_weather(city, unit?)``, ``convert_currency(amount, from_currency, to_currency)``,
  ``set_timer(minutes, label?)``;
- train (``tools_train.jsonl``, 200): a request in one of several phrasings -> the assistant's call
  (arguments as a JSON object) -> the tool's result -> the assistant's answer; one in eight asks
  for something no tool does and is answered in plain text (so the model learns when not to call);
- held out (``tools_eval.jsonl``, 40): requests with cities, amounts and labels the training data
  never uses, ending at the call the model should make: ``sftlab eval`` scores its valid tool call
  rate and whether the call is the reference's.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from sftlab.core.io import write_jsonl

SEED = 20241130
N_TRAIN, N_EVAL = 200, 40
SYSTEM = "You can call functions."

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert money (ISO codes)",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"}, "from_currency": {"type": "string"},
            "to_currency": {"type": "string"}},
            "required": ["amount", "from_currency", "to_currency"]}}},
    {"type": "function", "function": {
        "name": "set_timer", "description": "Start a timer",
        "parameters": {"type": "object", "properties": {
            "minutes": {"type": "integer"}, "label": {"type": "string"}}, "required": ["minutes"]}}},
]

# Held-out values never appear in training requests.
CITIES = ["Berlin", "Paris", "Madrid", "Lisbon", "Rome", "Vienna", "Oslo", "Dublin", "Prague", "Warsaw", "Athens",
          "Cairo", "Nairobi", "Tokyo", "Seoul", "Mumbai", "Toronto", "Chicago", "Boston", "Lima", "Sydney", "Zurich"]
EVAL_CITIES = ["Helsinki", "Budapest", "Montreal", "Santiago", "Hanoi", "Istanbul", "Kyoto", "Dakar"]
CURRENCIES = [("euros", "EUR"), ("dollars", "USD"), ("pounds", "GBP"), ("yen", "JPY"), ("Swiss francs", "CHF")]
LABELS = ["tea", "pasta", "laundry", "eggs", "break", "bread", "meeting", "workout"]
EVAL_LABELS = ["rice", "nap", "pizza", "call"]

WEATHER_ASK = ["What's the weather in {city}?", "How warm is it in {city} right now?",
               "Is it raining in {city}?", "Weather for {city} please, in {unit}.", "Tell me the weather in {city} in {unit}."]
CURRENCY_ASK = ["Convert {amount} {from_name} to {to_name}.", "How much is {amount} {from_name} in {to_name}?",
                "What are {amount} {from_name} worth in {to_name}?"]
TIMER_ASK = ["Set a timer for {minutes} minutes.", "Start a {minutes} minute timer for {label}.",
             "Remind me in {minutes} minutes about the {label}.", "Timer: {minutes} min, label it {label}."]
NO_TOOL = [("Say hello in French.", "Bonjour!"), ("What is 7 times 8?", "7 times 8 is 56."),
           ("Name a primary colour.", "Red is a primary colour."), ("Spell 'cat' backwards.", "tac"),
           ("What is the capital of Italy?", "Rome is the capital of Italy."),
           ("Give me a synonym for happy.", "Joyful.")]


def _weather(rng: random.Random, cities: list[str]) -> tuple[str, dict, str, str]:
    city = rng.choice(cities)
    ask = rng.choice(WEATHER_ASK)
    args = {"city": city}
    unit = rng.choice(["celsius", "fahrenheit"])
    if "{unit}" in ask:
        args["unit"] = unit
    temp = rng.randint(-5, 35) if unit == "celsius" else rng.randint(25, 95)
    sky = rng.choice(["sunny", "cloudy", "raining", "windy"])
    result = {"temperature": temp, "unit": args.get("unit", "celsius"), "conditions": sky}
    answer = f"It is {temp} degrees {'C' if result['unit'] == 'celsius' else 'F'} and {sky} in {city}."
    return ask.format(city=city, unit=unit), {"name": "get_weather", "arguments": args}, json.dumps(result), answer


def _currency(rng: random.Random, held_out: bool) -> tuple[str, dict, str, str]:
    (from_name, src), (to_name, dst) = rng.sample(CURRENCIES, 2)
    # Training amounts are multiples of 5; held-out amounts are not, so no eval request repeats a training one.
    amount = rng.randrange(5, 500, 5) if not held_out else rng.choice([n for n in range(3, 500) if n % 5])
    rate = round(rng.uniform(0.5, 1.6), 4)
    result = {"amount": round(amount * rate, 2), "currency": dst}
    ask = rng.choice(CURRENCY_ASK).format(amount=amount, from_name=from_name, to_name=to_name)
    args = {"amount": amount, "from_currency": src, "to_currency": dst}
    return ask, {"name": "convert_currency", "arguments": args}, json.dumps(result), \
        f"{amount} {from_name} are {result['amount']} {to_name}."


def _timer(rng: random.Random, held_out: bool) -> tuple[str, dict, str, str]:
    minutes = rng.choice([7, 13, 17, 22, 35, 50]) if held_out else rng.choice([1, 2, 3, 5, 10, 15, 20, 25, 30, 45, 60])
    label = rng.choice(EVAL_LABELS if held_out else LABELS)
    ask = rng.choice(TIMER_ASK)
    args = {"minutes": minutes, **({"label": label} if "{label}" in ask else {})}
    return ask.format(minutes=minutes, label=label), {"name": "set_timer", "arguments": args}, \
        json.dumps({"ok": True, "ends_in_minutes": minutes}), f"Your {minutes} minute timer is running."


def _record(rng: random.Random, held_out: bool, k: int) -> dict:
    msgs = [{"role": "system", "content": SYSTEM}]
    if not held_out and k % 8 == 7:
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        ask, answer = rng.choice(NO_TOOL + [(f"What is {a} times {b}?", f"{a} times {b} is {a * b}.")] * 6)
        return {"messages": msgs + [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}],
                "tools": TOOLS}
    kind = k % 3
    if kind == 0:
        ask, call, result, answer = _weather(rng, EVAL_CITIES if held_out else CITIES)
    elif kind == 1:
        ask, call, result, answer = _currency(rng, held_out)
    else:
        ask, call, result, answer = _timer(rng, held_out)
    call_id = f"call_{k}"
    msgs += [{"role": "user", "content": ask},
             {"role": "assistant", "content": "", "tool_calls": [{"id": call_id, "type": "function", "function": call}]}]
    if not held_out:
        msgs += [{"role": "tool", "tool_call_id": call_id, "name": call["name"], "content": result},
                 {"role": "assistant", "content": answer}]
    return {"messages": msgs, "tools": TOOLS}


def build(seed: int = SEED, n_train: int = N_TRAIN, n_eval: int = N_EVAL) -> tuple[list[dict], list[dict]]:
    """(train records, held-out records); no request appears twice."""
    rng = random.Random(seed)
    seen: set[str] = set()

    def unique(held_out: bool, n: int) -> list[dict]:  # no request twice, in a split or across them
        out: list[dict] = []
        while len(out) < n:
            rec = _record(rng, held_out, len(out))
            if rec["messages"][1]["content"] not in seen:
                seen.add(rec["messages"][1]["content"])
                out.append(rec)
        return out

    return unique(False, n_train), unique(True, n_eval)


def write(out: str | Path) -> tuple[Path, Path]:
    """Write tools_train.jsonl and tools_eval.jsonl into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, evl = build()
    paths = out / "tools_train.jsonl", out / "tools_eval.jsonl"
    write_jsonl(paths[0], train)
    write_jsonl(paths[1], evl)
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parent), help="folder to write into (default: this package)")
    for path in write(p.parse_args(argv).out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
