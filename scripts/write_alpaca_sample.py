"""Write the bundled Alpaca-format sample, ``llm_lightning/data/alpaca_sample.json``.

The project ships only data it wrote itself: a deterministic mix of small tasks with exact
answers (arithmetic, conversions, word games, facts) and a set of hand-written general
instructions, about 40% of them with an input. Rerunning this script reproduces the file.

    python scripts/write_alpaca_sample.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUTPUT = Path(__file__).resolve().parents[1] / "llm_lightning" / "data" / "alpaca_sample.json"

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "Canada": "Ottawa", "Australia": "Canberra", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Brazil": "Brasília", "Argentina": "Buenos Aires", "Norway": "Oslo", "Sweden": "Stockholm",
    "Poland": "Warsaw", "Greece": "Athens", "India": "New Delhi", "Mexico": "Mexico City",
    "Peru": "Lima", "Vietnam": "Hanoi",
}
ANTONYMS = {
    "hot": "cold", "early": "late", "heavy": "light", "ancient": "modern", "generous": "stingy",
    "brave": "cowardly", "narrow": "wide", "rough": "smooth", "shallow": "deep", "victory": "defeat",
    "increase": "decrease", "arrive": "depart",
}
PLURALS = {
    "child": "children", "mouse": "mice", "city": "cities", "knife": "knives", "tomato": "tomatoes",
    "sheep": "sheep", "box": "boxes", "goose": "geese", "cactus": "cacti", "tooth": "teeth",
}
WORDS = ["river", "lantern", "orbit", "maple", "puzzle", "harbor", "violet", "ember", "glacier", "tulip",
         "canyon", "velvet", "quartz", "meadow", "falcon", "saddle", "pepper", "window"]
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
        "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

HANDWRITTEN = [
    ("Give three tips for staying focused while studying.", "",
     "1. Put your phone in another room so notifications cannot interrupt you.\n"
     "2. Work in blocks of 25 to 50 minutes with short breaks in between.\n"
     "3. Write down one clear goal for each session before you start."),
    ("Explain what photosynthesis is in two sentences.", "",
     "Photosynthesis is the process by which plants, algae and some bacteria turn light energy into "
     "chemical energy. They use sunlight to combine carbon dioxide and water into glucose, releasing oxygen."),
    ("Rewrite the sentence in the passive voice.", "The committee approved the new budget.",
     "The new budget was approved by the committee."),
    ("Classify the sentiment of the review as positive, negative or neutral.",
     "The soup was cold and the waiter ignored us for twenty minutes.", "Negative"),
    ("Classify the sentiment of the review as positive, negative or neutral.",
     "Friendly staff, fresh bread and a lovely view of the harbor.", "Positive"),
    ("Classify the sentiment of the review as positive, negative or neutral.",
     "The package arrived on Tuesday.", "Neutral"),
    ("Suggest a name for a bakery that specialises in sourdough.", "", "Rise & Crumb Sourdough Bakery"),
    ("Write a haiku about autumn.", "",
     "Crisp leaves drift and fall,\ngolden light on quiet paths,\nthe year exhales slow."),
    ("Summarize the paragraph in one sentence.",
     "Bees visit flowers to collect nectar and pollen. While they move from flower to flower, pollen "
     "sticks to their bodies and is carried to other plants, which allows those plants to reproduce.",
     "By carrying pollen between flowers while they gather food, bees help plants reproduce."),
    ("Explain the difference between weather and climate.", "",
     "Weather is the state of the atmosphere at a given place and time, such as today's rain or "
     "sunshine. Climate is the average pattern of weather in a region over many years."),
    ("Correct the grammar in the sentence.", "She don't like going to the dentist.",
     "She doesn't like going to the dentist."),
    ("Correct the grammar in the sentence.", "Me and him goes to the market every Sunday.",
     "He and I go to the market every Sunday."),
    ("Name the three primary colors of light.", "", "Red, green and blue."),
    ("What does CPU stand for?", "", "CPU stands for central processing unit."),
    ("Write a Python function that returns the square of a number.", "",
     "def square(x):\n    return x * x"),
    ("Explain what a prime number is.", "",
     "A prime number is a whole number greater than 1 whose only divisors are 1 and itself, "
     "for example 2, 3, 5, 7 and 11."),
    ("Turn the list into a comma-separated sentence.", "apples\nbread\nmilk\neggs",
     "I need apples, bread, milk and eggs."),
    ("Give an example of a renewable energy source.", "",
     "Solar power is a renewable energy source: sunlight is converted into electricity by solar panels."),
    ("Describe the water cycle briefly.", "",
     "Water evaporates from oceans and lakes, condenses into clouds, falls as rain or snow, and flows "
     "back into rivers and seas, where the cycle begins again."),
    ("Extract the date from the sentence.", "The conference will take place on 14 March 2025 in Lyon.",
     "14 March 2025"),
    ("Extract the city from the sentence.", "The conference will take place on 14 March 2025 in Lyon.",
     "Lyon"),
    ("Suggest a healthy breakfast.", "",
     "Oatmeal topped with berries and a spoonful of yogurt, with a glass of water or tea."),
    ("Write a short thank-you note to a colleague who helped you move.", "",
     "Thank you so much for helping me move last weekend. I could not have carried that sofa without "
     "you, and the pizza is on me next time!"),
    ("Explain why the sky is blue.", "",
     "Sunlight is scattered by the molecules in the air, and shorter blue wavelengths are scattered much "
     "more than red ones, so blue light reaches our eyes from every direction of the sky."),
    ("Convert the sentence to a question.", "The train leaves at noon.", "Does the train leave at noon?"),
    ("Convert the sentence to a question.", "They have finished the report.", "Have they finished the report?"),
    ("List four countries in South America.", "", "Brazil, Argentina, Peru and Chile."),
    ("What is the boiling point of water at sea level?", "",
     "At sea level water boils at 100 degrees Celsius, which is 212 degrees Fahrenheit."),
    ("Give a synonym for the word.", "happy", "Joyful"),
    ("Give a synonym for the word.", "quick", "Rapid"),
]


def number_words(n: int) -> str:
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))


def generated(rng: random.Random) -> list[tuple[str, str, str]]:
    records = []
    for country, capital in CAPITALS.items():
        records.append((f"What is the capital of {country}?", "", f"The capital of {country} is {capital}."))
    for word, opposite in ANTONYMS.items():
        records.append((f"What is the opposite of the word \"{word}\"?", "", f"The opposite of \"{word}\" is \"{opposite}\"."))
    for word, plural in PLURALS.items():
        records.append(("Give the plural form of the noun.", word, plural))
    for _ in range(14):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        records.append((f"What is {a} plus {b}?", "", f"{a} plus {b} is {a + b}."))
    for _ in range(10):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        records.append((f"What is {a} times {b}?", "", f"{a} times {b} is {a * b}."))
    for _ in range(10):
        celsius = rng.randint(-20, 40)
        fahrenheit = celsius * 9 / 5 + 32
        records.append(("Convert the temperature from Celsius to Fahrenheit.", f"{celsius} °C",
                        f"{celsius} °C is {fahrenheit:g} °F."))
    for _ in range(8):
        km = rng.randint(1, 50) * 5
        records.append((f"How many miles are {km} kilometers?", "", f"{km} kilometers are about {km * 0.621371:.1f} miles."))
    for _ in range(10):
        words = rng.sample(WORDS, 4)
        records.append(("Sort the words in alphabetical order.", ", ".join(words), ", ".join(sorted(words))))
    for word in rng.sample(WORDS, 8):
        records.append(("Spell the word backwards.", word, word[::-1]))
    for _ in range(8):
        n = rng.randint(1, 999)
        records.append(("Write the number in words.", str(n), number_words(n).capitalize() + "."))
    for _ in range(6):
        n = rng.randint(10, 500)
        records.append((f"Is {n} an even or an odd number?", "", f"{n} is an {'even' if n % 2 == 0 else 'odd'} number."))
    for word in rng.sample(WORDS, 6):
        vowels = sum(ch in "aeiou" for ch in word)
        records.append(("Count the vowels in the word.", word, f"The word \"{word}\" has {vowels} vowels."))
    return records


def main() -> None:
    rng = random.Random(20261122)
    rows = generated(rng) + HANDWRITTEN
    rng.shuffle(rows)
    records = [{"instruction": i, "input": x, "output": o} for i, x, o in rows]
    OUTPUT.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with_input = sum(1 for r in records if r["input"])
    print(f"wrote {len(records)} records ({with_input / len(records):.0%} with an input) to {OUTPUT}")


if __name__ == "__main__":
    main()
