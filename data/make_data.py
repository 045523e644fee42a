"""Generate qlora_nb's embedded data: a templated instruction dataset and a general English text.

Run `python data/make_data.py` from anywhere; it rewrites, byte for byte, train.jsonl, val.jsonl, test.jsonl
and general.txt next to this file. Everything is drawn from `random.Random(SEED)` and written in a fixed order,
so two runs give identical files. Every answer is computed by the code below, so exact-match is a fair metric.
"""
from __future__ import annotations
import json, random
from pathlib import Path

SEED = 2024
SPLIT_SIZES = {"train": 3000, "val": 300, "test": 300}
OUT = Path(__file__).resolve().parent

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
# Short common words; phrases are random draws, so no sentence here comes from anywhere else.
WORDS = """apple river stone green quiet table window garden bright silver cloud yellow orange tiger
happy little forest simple summer winter music paper pencil ocean mountain candle rabbit purple
dragon coffee basket rocket planet castle bottle yellow button market island thunder meadow pocket
violet honey anchor blanket bridge cotton desert engine feather gentle harbor jacket kitten ladder
lemon marble napkin orbit pepper puzzle ribbon saddle tunnel velvet wagon zebra amber breeze cactus
dolphin ember falcon glacier hammer igloo jungle kettle lantern magnet nectar olive parrot quartz
radish sunset tulip umbrella valley walnut circle mirror shadow silent rapid golden frozen hollow
narrow crisp calm brave clever eager fancy jolly kind lively proud witty bold""".split()
WORDS = sorted(set(WORDS))


def phrase(rng:random.Random, low:int, high:int) -> list[str]:
    "Between `low` and `high` distinct random words."
    return rng.sample(WORDS, rng.randint(low, high))


# Each task maps a random generator to one example: (instruction, input, output). Instructions are fixed per
# task so the model can learn the pattern; the values in `input` vary.
def km_to_m(rng):
    km = rng.randint(1, 999)
    return "Convert kilometers to meters. Answer with the number only.", f"{km} km", str(km * 1000)

def kg_to_g(rng):
    kg = rng.randint(1, 999)
    return "Convert kilograms to grams. Answer with the number only.", f"{kg} kg", str(kg * 1000)

def hours_to_minutes(rng):
    hours = rng.randint(1, 400)
    return "Convert hours to minutes. Answer with the number only.", f"{hours} hours", str(hours * 60)

def uppercase(rng):
    words = phrase(rng, 2, 4)
    return "Write the phrase in uppercase.", " ".join(words), " ".join(words).upper()

def title_case(rng):
    words = phrase(rng, 2, 4)
    return "Write the phrase in title case.", " ".join(words), " ".join(w.capitalize() for w in words)

def reverse_words(rng):
    words = phrase(rng, 3, 5)
    return "Reverse the order of the words.", " ".join(words), " ".join(reversed(words))

def sort_numbers(rng):
    numbers = rng.sample(range(1, 100), rng.randint(3, 5))
    return ("Sort the numbers from smallest to largest.", ", ".join(map(str, numbers)),
            ", ".join(map(str, sorted(numbers))))

def join_commas(rng):
    words = phrase(rng, 3, 5)
    return "Join the words with commas.", " ".join(words), ", ".join(words)

def weekday_after(rng):
    start, days = rng.randrange(7), rng.randint(1, 60)
    return ("Name the day of the week.", f"{days} days after {WEEKDAYS[start]}", WEEKDAYS[(start + days) % 7])

def month_after(rng):
    start, months = rng.randrange(12), rng.randint(1, 30)
    return ("Name the month.", f"{months} months after {MONTHS[start]}", MONTHS[(start + months) % 12])

def first_letters(rng):
    words = phrase(rng, 3, 6)
    return "Write the first letter of each word.", " ".join(words), "".join(w[0] for w in words)

def count_words(rng):
    words = phrase(rng, 2, 9)
    return "Count the words. Answer with the number only.", " ".join(words), str(len(words))

def last_word(rng):
    words = phrase(rng, 3, 6)
    return "Write the last word.", " ".join(words), words[-1]

def add_numbers(rng):
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    return "Add the numbers. Answer with the number only.", f"{a} + {b}", str(a + b)

def subtract_numbers(rng):
    a = rng.randint(10, 99); b = rng.randint(1, a)
    return "Subtract the numbers. Answer with the number only.", f"{a} - {b}", str(a - b)

TASKS = [km_to_m, kg_to_g, hours_to_minutes, uppercase, title_case, reverse_words, sort_numbers, join_commas,
         weekday_after, month_after, first_letters, count_words, last_word, add_numbers, subtract_numbers]


def make_examples(rng:random.Random) -> dict[str, list[dict]]:
    "Unique examples per task, dealt round-robin into the splits so each split holds every task evenly."
    total = sum(SPLIT_SIZES.values())
    per_task = -(-total // len(TASKS))  # ceil
    pools = []
    for task in TASKS:
        seen, pool = set(), []
        while len(pool) < per_task:  # distinct prompts only: a prompt lands in exactly one split (no leakage)
            instruction, input_text, output = task(rng)
            if (instruction, input_text) in seen: continue
            seen.add((instruction, input_text))
            pool.append({"instruction": instruction, "input": input_text, "output": output, "task": task.__name__})
        pools.append(pool)
    splits, cursor = {}, [0] * len(TASKS)
    for name, size in SPLIT_SIZES.items():
        rows = []
        for i in range(size):
            t = i % len(TASKS)
            rows.append(pools[t][cursor[t]]); cursor[t] += 1
        rng.shuffle(rows)
        splits[name] = rows
    return splits


# ---- the general text: original encyclopedic prose, written by templates below --------------------------------
FACTS_NUMBERS = [
    "The number {n} is {parity}.", "{n} squared is {sq}.", "The number after {n} is {nxt}, and the number before it is {prv}.",
    "Written in words, {n} is {words}.", "Twice {n} is {dbl}, and half of it is {half}.",
]
ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()

def number_words(n:int) -> str:
    if n < 20: return ONES[n]
    if n < 100: return TENS[n // 10 - 2] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))

PARAGRAPHS = [
    "A week has seven days. In many calendars the week starts on Monday and ends on Sunday, while others start "
    "it on Sunday. Saturday and Sunday are often called the weekend, and the other five days are working days "
    "for many people. The names of the days are old, and several of them come from the names of gods and of the "
    "sun and the moon.",
    "A year has twelve months. January, March, May, July, August, October and December have thirty-one days. "
    "April, June, September and November have thirty days. February has twenty-eight days, or twenty-nine in a "
    "leap year. A leap year comes about once every four years and keeps the calendar in step with the seasons.",
    "The metric system measures length in meters, mass in grams and volume in liters. The prefix kilo means one "
    "thousand, so a kilometer is one thousand meters and a kilogram is one thousand grams. The prefix centi means "
    "one hundredth, and the prefix milli means one thousandth. Because every step is a power of ten, converting "
    "between units only moves the decimal point.",
    "Time is counted in a mix of bases. A minute has sixty seconds and an hour has sixty minutes, so an hour has "
    "three thousand six hundred seconds. A day has twenty-four hours. This way of counting goes back to ancient "
    "astronomers, who liked numbers with many divisors.",
    "Water boils at one hundred degrees Celsius at sea level and freezes at zero. On the Fahrenheit scale the same "
    "points are two hundred and twelve and thirty-two degrees. High on a mountain the air pressure is lower, so "
    "water boils at a lower temperature and food takes longer to cook.",
    "A river begins as rain or melting snow in high ground. Small streams join into larger ones, and the river "
    "carries water, sand and stones down toward the sea. Where it slows down near the coast, it drops the sand it "
    "carried and can build a wide, flat delta.",
    "Bread is made from flour, water, salt and yeast. The yeast eats sugars in the dough and gives off gas, which "
    "makes the dough rise. Kneading builds a network of gluten that traps the gas. Baking sets the structure and "
    "browns the crust.",
    "A library lends books to the people who live nearby. Books are arranged on shelves by subject, and each one "
    "has a code on its spine that tells where it belongs. Many libraries also lend music and films, and offer "
    "quiet rooms for reading and study.",
    "Plants make their own food from light, water and air. In their leaves, a green pigment captures sunlight, and "
    "the plant uses that energy to turn carbon dioxide and water into sugar. Oxygen is released as a by-product, "
    "which is why forests and oceans matter so much to the air we breathe.",
    "A map is a small picture of a large place. A scale tells how distances on the map compare to distances on "
    "the ground, and a compass rose shows which way is north. Contour lines join points of equal height, so lines "
    "that crowd together mark a steep slope.",
    "The moon goes around the earth about once a month. As it moves, we see different parts of its sunlit side, "
    "from a thin crescent to a full disk and back again. The pull of the moon on the oceans is the main cause of "
    "the tides.",
    "Sorting puts things in order. A person sorting cards might pick the smallest card, set it aside, and repeat. "
    "Computers use cleverer methods that split the cards into groups, sort each group, and merge the results, "
    "which is much faster when there are many items.",
]
ANIMALS = [("rabbit", "grass and vegetables", "fields and meadows"), ("dolphin", "fish and squid", "warm seas"),
           ("falcon", "small birds", "cliffs and open country"), ("tiger", "deer and wild pigs", "forests and grasslands"),
           ("parrot", "seeds and fruit", "tropical forests"), ("zebra", "grass", "African plains"),
           ("owl", "mice and insects", "woods and farmland"), ("camel", "dry plants", "deserts"),
           ("beaver", "bark and twigs", "rivers and ponds"), ("penguin", "fish and krill", "cold southern coasts"),
           ("squirrel", "nuts and seeds", "parks and woods"), ("frog", "insects", "ponds and marshes")]
COLORS = [("red", "a ripe tomato"), ("orange", "a pumpkin"), ("yellow", "a lemon"), ("green", "fresh grass"),
          ("blue", "a clear sky"), ("purple", "a plum"), ("white", "fresh snow"), ("brown", "tree bark"),
          ("gray", "a rain cloud"), ("black", "the night sky")]


def general_text(rng:random.Random) -> str:
    "About 60 KB of plain English prose: hand-written paragraphs plus templated facts about numbers, time and nature."
    parts = list(PARAGRAPHS)
    for animal, food, home in ANIMALS:
        parts.append(f"The {animal} lives in {home}. It feeds mostly on {food}. Like every animal, the {animal} "
                     f"must find food, water and shelter, and its body and habits suit the place where it lives.")
    for color, thing in COLORS:
        parts.append(f"{color.capitalize()} is the color of {thing}. Painters mix colors on a palette, and the word "
                     f"{color} has been used in English for many centuries.")
    for i, month in enumerate(MONTHS):
        parts.append(f"{month} is month number {i + 1} of the year. It comes after {MONTHS[i - 1]} and before "
                     f"{MONTHS[(i + 1) % 12]}.")
    for i, day in enumerate(WEEKDAYS):
        parts.append(f"{day} is followed by {WEEKDAYS[(i + 1) % 7]}, and two days after {day} comes "
                     f"{WEEKDAYS[(i + 2) % 7]}.")
    for n in rng.sample(range(2, 1000), 420):
        facts = rng.sample(FACTS_NUMBERS, 3)
        values = dict(n=n, parity="even" if n % 2 == 0 else "odd", sq=n * n, nxt=n + 1, prv=n - 1,
                      words=number_words(n), dbl=2 * n, half=n / 2 if n % 2 else n // 2)
        parts.append(" ".join(f.format(**values) for f in facts))
    body, tail = parts[:len(PARAGRAPHS)], parts[len(PARAGRAPHS):]
    rng.shuffle(tail)
    paragraphs, chunk = list(body), []
    for sentence_group in tail:  # group the short templated facts into paragraphs of a few each
        chunk.append(sentence_group)
        if len(chunk) == 4: paragraphs.append(" ".join(chunk)); chunk = []
    if chunk: paragraphs.append(" ".join(chunk))
    return "\n\n".join(paragraphs) + "\n"


def render() -> dict[str, str]:
    "The text of every generated file, by file name."
    rng = random.Random(SEED)
    files = {f"{name}.jsonl": "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
             for name, rows in make_examples(rng).items()}
    files["general.txt"] = general_text(random.Random(SEED + 1))
    return files


def main():
    files = render()
    for name, text in files.items():
        with open(OUT / name, "w", encoding="utf-8", newline="\n") as f: f.write(text)
    sizes = ", ".join(f"{name} {text.count(chr(10))}" for name, text in files.items() if name.endswith(".jsonl"))
    print(f"wrote {sizes} examples of {len(TASKS)} tasks and general.txt to {OUT}")


if __name__ == "__main__":
    main()
