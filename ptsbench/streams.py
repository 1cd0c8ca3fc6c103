"""Every random stream of a job, by name, and how each is seeded.

A stream is seeded from one of the job's seeds (`seed`, `calib.seed` or `train.seed`) by one of three
rules:

* ``identity``: the seed itself;
* ``offset``: ``seed * 1_000_003 + offset``;
* ``hashed``: the first 63 bits of ``sha256(f"{seed}:{label}")``.

The streams that existed before they had names keep their exact seeding (the identity and offset rules,
and the hashed label random pruning always used), so every committed number stays reproducible. A new
stream takes the hashed rule with its own name as the label: it needs no central numbering and cannot
collide with another by accident. Changing how any registered stream is seeded changes results, so it
must come with a new `RNG_SCHEME_VERSION`, which every job record carries (`rng_scheme`).

The three `train.seed` streams share the seed itself, as they always did: `dense.init` and
`dense.train.torch` reseed torch's global RNG at different times, and `dense.train` is a generator of its own.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import torch

RNG_SCHEME_VERSION = "streams-v1"
OFFSET_STRIDE = 1_000_003

Rule = Literal["identity", "offset", "hashed"]
SeedKey = Literal["seed", "calib.seed", "train.seed"]


@dataclass(frozen=True)
class Stream:
    name: str
    seed_key: SeedKey  # the config key whose value seeds the stream
    rule: Rule
    purpose: str
    offset: int = 0  # the `offset` rule
    label: str | None = None  # the `hashed` rule; None hashes the name

    def seed_from(self, seed: int) -> int:
        seed = int(seed)
        if self.rule == "identity":
            return seed
        if self.rule == "offset":
            return seed * OFFSET_STRIDE + self.offset
        digest = hashlib.sha256(f"{seed}:{self.label or self.name}".encode()).digest()
        return int.from_bytes(digest[:8], "big") >> 1


def _streams(*streams: Stream) -> dict[str, Stream]:
    return {s.name: s for s in streams}


STREAMS: dict[str, Stream] = _streams(
    # the harness
    Stream("calib.draw", "calib.seed", "identity", "which train images form the calibration set"),
    Stream("dense.init", "train.seed", "identity", "torch's global RNG when the architecture is built"),
    Stream("dense.train", "train.seed", "identity", "batch order and augmentation of the dense recipe"),
    Stream("dense.train.torch", "train.seed", "identity", "torch's global RNG during the dense recipe"),
    Stream("job.torch", "seed", "identity", "torch's global RNG when the algorithm is called"),
    # methods, through PruneContext.generator
    Stream("fcpts.data", "seed", "offset", "FCPTS: calibration batch order", offset=1),
    Stream("fcpts.torch", "seed", "offset", "FCPTS: torch's global RNG inside the optimisation", offset=2),
    Stream("fcpts.augment", "seed", "offset", "FCPTS: random resized crops and flips", offset=3),
    Stream("reconstruction.batches", "seed", "offset", "unit reconstruction: batch draws", offset=31),
    Stream("unipts.genome", "seed", "offset", "UniPTS: the evolutionary search", offset=101),
    Stream("unipts.fitness_set", "seed", "offset", "UniPTS: the fitness subset of the calibration set",
           offset=102),
    Stream("unipts.bn_noise", "seed", "offset", "UniPTS: noise of the BN statistics", offset=103),
    Stream("unipts.shuffle", "seed", "offset", "UniPTS: batch order of the sparse training", offset=104),
    Stream("unipts.augment", "seed", "offset", "UniPTS: augmentation of the sparse training", offset=105),
    Stream("random.scores", "seed", "hashed", "a score's random draws (the random control)",
           label="random scores"),
)


def stream(name: str) -> Stream:
    """The registered stream `name`; any other name is a programming error."""
    try:
        return STREAMS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"{name!r} is not a registered random stream. Add it to STREAMS in ptsbench/streams.py (a new "
            f"stream takes the hashed rule); registered: {', '.join(sorted(STREAMS))}.") from None


def stream_seed(name: str, seed: int) -> int:
    """The seed of stream `name` for the value `seed` of its config key (`Stream.seed_key`)."""
    return stream(name).seed_from(seed)


def stream_generator(name: str, seed: int) -> torch.Generator:
    """A CPU generator on stream `name`."""
    return torch.Generator().manual_seed(stream_seed(name, seed))
