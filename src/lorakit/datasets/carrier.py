"""The "carrier policy" fine-tuning set: route support tickets to a code checked by exact match.

The base model already knows the standard flow (the system prompt states it). Training teaches
one new rule: damaged items delivered by Kestrel Express go to CODE_TIER2. Undamaged returns keep
RET-STD whatever the carrier, so the model must read carrier AND damage, not carrier alone.

Every pool of strings is split once, independently of the seed, so held-out products, names and
phrasings never appear in any training file, whichever seeds made the two files. This module
knows nothing about tokenization or models; it only makes rows of chat messages.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import NamedTuple

from ..atomic import atomic_path

CODE_TIER2 = "CLM-T2-KX"
CODE_DAMAGED = "CLM-STD"
CODE_RETURN = "RET-STD"
POLICY_CARRIER = "Kestrel Express"
SYSTEM_PROMPT = (
    "You route warehouse support tickets. Reply with the routing code only. "
    "Undamaged returns: RET-STD. Damaged items: CLM-STD."
)
SPLITS = ("train", "heldout")

OTHER_CARRIERS = ("Northwind Freight", "BluePost", "Orbit Parcel", "Harbor Line Logistics", "Swiftway Couriers")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")

# Issues are predicates that follow "the <product>", so any issue fits any template.
TEMPLATES = (
    "Order #{order}: the {product} {issue}. It came with {carrier} on {day}. What should I do? - {customer}",
    "Hi, this is {customer}. My {product} (order #{order}) {issue}. {carrier} dropped it off on {day}. Can you help?",
    "Hello team, the {product} from order #{order} {issue}. Delivery was by {carrier} last {day}. "
    "Please advise. Thanks, {customer}",
    "{customer} here. Just received order #{order} through {carrier}, and the {product} {issue}. "
    "How do I sort this out?",
    "Re: order #{order}. The {product} {issue}. Carrier was {carrier}, delivered {day}. "
    "What happens next? Regards, {customer}",
    "Good morning, I'm writing about order #{order}. The {product} {issue}. {carrier} brought it on {day}. "
    "Kind regards, {customer}",
    "Quick question about #{order}: my {product} {issue}. It was shipped with {carrier}. "
    "Where do I go from here? {customer}",
    "Dear support, the {product} I ordered (#{order}) {issue}. It reached me via {carrier} on {day}. "
    "Sincerely, {customer}",
    "Hey, {customer} again. Order {order} turned up on {day} with {carrier} and the {product} {issue}. "
    "Not sure what the next step is.",
    "My name is {customer}. The {product} in order #{order}, handed over by {carrier}, {issue}. "
    "Could you tell me what to do?",
    "Following up on order #{order}: the {product} {issue}. The parcel came through {carrier} on {day}. "
    "Appreciate any help, {customer}",
    "Support request from {customer}. Item: {product}. Order: #{order}. Courier: {carrier}. "
    "Problem: the item {issue}. What should happen now?",
)
DAMAGES = (
    "arrived with one corner completely crushed",
    "came out of the box with a long crack down the side",
    "arrived in pieces because the box had clearly been dropped",
    "has a deep dent across the top",
    "arrived soaked through and is now warped",
    "came with the front panel shattered",
    "has a broken hinge and will not close",
    "arrived with deep scratches all over the front",
    "was snapped clean in half inside the packaging",
    "arrived with the casing split open",
    "rattles inside and a piece has broken off",
    "came with the legs bent out of shape",
    "arrived with a hole punched through the side",
    "has a chipped edge and loose fragments in the box",
    "arrived with the handle torn off",
    "was flattened as if something heavy sat on the carton",
    "arrived with the glass front cracked into a web",
    "came with a torn seam and the stuffing spilling out",
    "has a bent frame and wobbles badly",
    "arrived with the screen smashed",
    "came with water damage and the cardboard turned to mush",
    "arrived with the lid caved in",
    "has a big gouge in the finish",
    "arrived with two wheels ripped off",
)
REASONS = (
    "arrived in perfect condition but is the wrong colour",
    "is fine, but it turned out too big for my room",
    "is undamaged, I just no longer need it",
    "was ordered twice by mistake and this spare is still sealed",
    "works perfectly but is not the model I ordered",
    "is in great shape, though it clashes with my other furniture",
    "arrived intact, but I found it cheaper elsewhere",
    "is unopened, it was a gift the recipient already had",
    "is in good order, I simply changed my mind",
    "arrived safely but is smaller than the photos suggested",
    "is in mint condition but too heavy for me to use",
    "works fine, but it is much louder than I expected",
    "arrived in perfect shape, but the size is wrong",
    "is brand new in the box, I ordered the wrong one",
    "is perfectly fine, my partner bought the same thing",
    "is still in its wrapping and I no longer want it",
    "looks great but does not match the description",
    "is flawless, but it arrived too late for the event",
    "has nothing wrong with it, I just prefer another brand",
    "is untouched and I would like a refund",
)
PRODUCTS = (
    "ceramic table lamp", "steel desk fan", "bamboo bookshelf", "espresso machine", "oak side table",
    "bluetooth speaker", "glass fruit bowl", "cast iron skillet", "full-length mirror", "mesh office chair",
    "electric kettle", "wall clock", "toaster oven", "rice cooker", "brass floor lamp",
    "stand mixer", "air purifier", "computer monitor", "record player", "porcelain dinner set",
    "bread maker", "aluminium laptop stand", "pendant light", "robot vacuum", "walnut coffee table",
    "inkjet printer", "camping stove", "food processor", "pine storage chest", "ceramic plant pot",
    "microwave", "kids' bicycle", "pedal bin", "gaming keyboard", "photo frame set",
    "marble chopping board", "guitar amplifier", "folding ladder", "crystal vase", "rowing machine",
)
# Every first and every last name is unique, so held-out names share no part with training ones.
CUSTOMERS = (
    "Maria Okafor", "James Whitfield", "Priya Raman", "Tomasz Nowak", "Aiko Tanaka",
    "Samuel Mensah", "Elena Petrova", "Diego Alvarez", "Fatima Haddad", "Liam O'Connor",
    "Grace Mwangi", "Noah Lindqvist", "Chloé Dubois", "Arjun Mehta", "Sofia Rossi",
    "Kwame Boateng", "Hannah Becker", "Mateo Fernández", "Yuki Sato", "Olivia Grant",
    "Ibrahim Yilmaz", "Emma Kowalski", "Lucas Moreau", "Zara Khan", "Daniel Brooks",
    "Ingrid Halvorsen", "Mei Chen", "Oscar Reyes", "Nadia Rahman", "Felix Wagner",
    "Amara Nwosu", "Ruben Castillo", "Leila Farouk", "Henrik Berg", "Isabel Cruz",
    "Marcus Bell", "Anya Sokolova", "Tobias Keller", "Rosa Delgado", "Kenji Mori",
)


class Pools(NamedTuple):
    """The strings one split may draw from."""
    products: tuple[str, ...]
    customers: tuple[str, ...]
    templates: tuple[str, ...]
    damages: tuple[str, ...]
    reasons: tuple[str, ...]


def pools(split: str) -> Pools:
    """Every fourth item of each pool is held out: fixed, so no seed can leak it into training."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    held = split == "heldout"
    return Pools(*(tuple(x for i, x in enumerate(pool) if (i % 4 == 3) == held)
                   for pool in (PRODUCTS, CUSTOMERS, TEMPLATES, DAMAGES, REASONS)))


def route(carrier: str, damaged: bool) -> str:
    """The routing code a ticket should get: the label the model is trained and scored on."""
    if not damaged:
        return CODE_RETURN
    return CODE_TIER2 if carrier == POLICY_CARRIER else CODE_DAMAGED


def _plan(n: int) -> list[tuple[bool, bool]]:
    """(kestrel, damaged) per row: exactly 40% tier-2, 30% other damaged, 30% returns, half of those Kestrel."""
    n_tier2, n_damaged = round(0.4 * n), round(0.3 * n)
    n_return = n - n_tier2 - n_damaged
    n_kx_return = n_return // 2
    return ([(True, True)] * n_tier2 + [(False, True)] * n_damaged
            + [(True, False)] * n_kx_return + [(False, False)] * (n_return - n_kx_return))


def _rows(rng: random.Random, n: int, split: str) -> list[dict]:
    pool = pools(split)
    plan = _plan(n)
    rng.shuffle(plan)
    rows = []
    for kestrel, damaged in plan:
        carrier = POLICY_CARRIER if kestrel else rng.choice(OTHER_CARRIERS)
        product, customer = rng.choice(pool.products), rng.choice(pool.customers)
        ticket = rng.choice(pool.templates).format(
            order=rng.randint(10000, 99999), product=product, customer=customer, carrier=carrier,
            day=rng.choice(DAYS), issue=rng.choice(pool.damages if damaged else pool.reasons))
        rows.append({
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": ticket},
                {"role": "assistant", "content": route(carrier, damaged)},
            ],
            "meta": {"carrier": carrier, "damaged": damaged, "product": product, "customer": customer,
                     "split": split},
        })
    return rows


def generate(n_train: int = 600, n_heldout: int = 120, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, heldout) rows in the chat "messages" shape; the same seed gives the same rows."""
    for name, n in (("n_train", n_train), ("n_heldout", n_heldout)):
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    rng = random.Random(seed)  # never the global state: callers' randomness must not change the data
    return _rows(rng, n_train, "train"), _rows(rng, n_heldout, "heldout")


def write(out_dir: str | os.PathLike, n_train: int = 600, n_heldout: int = 120,
          seed: int = 0) -> dict[str, Path]:
    """Write train.jsonl and heldout.jsonl into out_dir, each atomically; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in zip(SPLITS, generate(n_train, n_heldout, seed)):
        paths[split] = out_dir / f"{split}.jsonl"
        with atomic_path(paths[split]) as tmp:  # temp file beside the target, then os.replace
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return paths
