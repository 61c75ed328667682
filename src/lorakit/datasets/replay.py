"""Rehearsal rows: the base model's own answers to general prompts, mixed into task training.

Fine-tuning on a narrow task moves the whole model; rows whose targets are what the base already
says (self-distillation) hold the adapter to the base's behaviour outside the task, at the price
of a few generations before training. The prompts here are deliberately disjoint from the
regression evaluation's prompts (`lorakit.evaluate.regression.GENERAL_PROMPTS`).
"""
from __future__ import annotations

from ..evaluate.regression import render_chat
from ..evaluate.task import generate

REPLAY_PROMPTS = [
    "What is the largest ocean on Earth?", "How many days are in a leap year?", "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?", "Name a mammal that can fly.", "What is 12 plus 15?",
    "Translate 'thank you' into French.", "What color do you get by mixing blue and yellow?",
    "Give me a synonym for 'happy'.", "What is the capital of Japan?", "How many legs does a spider have?",
    "What gas do plants absorb from the air?", "Write one sentence about autumn.", "What is the square root of 81?",
    "Name three fruits.", "What is the freezing point of water in Fahrenheit?", "Who painted the Mona Lisa?",
    "What is the chemical symbol for gold?", "How many continents are there?", "Suggest a name for a pet cat.",
    "What does a thermometer measure?", "What is the opposite of 'ancient'?", "Name a famous scientist.",
    "What language is spoken in Brazil?", "How many minutes are in two hours?", "What is the tallest animal?",
    "Describe the moon in one sentence.", "What is the plural of 'mouse'?", "Which season comes after winter?",
    "What is 9 times 6?", "Name a musical instrument with strings.", "What is the capital of Canada?",
    "Why do we need sleep?", "What is photosynthesis, in one sentence?", "Give an example of a prime number.",
    "What do cows drink?", "How many sides does a hexagon have?", "What is the main ingredient of bread?",
    "Name a country in Africa.", "What is the hottest planet in the solar system?", "Write a short greeting for a friend.",
    "What is the past tense of 'run'?", "How many hours are in a day?", "What is the largest desert in the world?",
    "Recommend a healthy breakfast.", "What is an adjective?", "Name a bird that cannot fly.",
    "What is 100 divided by 4?", "What is the capital of Italy?", "Explain what a verb is.",
    "Give me a tip for staying focused.", "What is the color of a ripe banana?", "How many weeks are in a year?",
    "What instrument has 88 keys?", "Name something you can find at the beach.", "What is the first letter of the alphabet?",
    "Which animal is known as the king of the jungle?", "What is a haiku?", "What is the capital of Germany?",
    "Tell me a fun fact about octopuses.",
]


def replay_rows(model, tokenizer, n: int | None = None, max_new_tokens: int = 48, progress: bool = True) -> list[dict]:
    """`messages` rows pairing each general prompt with the base model's own greedy answer."""
    prompts = REPLAY_PROMPTS[:n] if n else REPLAY_PROMPTS
    answers = generate(model, tokenizer, [render_chat(tokenizer, p) for p in prompts], max_new_tokens=max_new_tokens,
                       batch_size=32, progress=progress)
    return [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": _whole_sentences(a)}]}
            for p, a in zip(prompts, answers) if _whole_sentences(a)]


def _whole_sentences(text: str) -> str:
    """Drop a trailing fragment cut by max_new_tokens, so rehearsal never teaches stopping mid-sentence."""
    text = text.strip()
    end = max(text.rfind(c) for c in ".!?")
    return text[: end + 1] if end > 0 else text
