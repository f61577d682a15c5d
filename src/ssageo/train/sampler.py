"""Hard-negative epoch sampler (docs/METHOD.md section 5): batches of mutually confusable places.

A *place* is a training query. Its *key* is the index of its positive reference tile: two places
with the same key (VIGOR panoramas of one tile) never share a batch, because InfoNCE treats every
other sample of the batch as a negative. Every place is used at most once per epoch.

The epoch plan is a pure function of ``(seed, epoch, neighbours)``, so a resumed run replays the
same batches. ``batch_size`` is the **global** batch: with ``world_size`` processes each rank
takes its contiguous slice of every global batch, and the all-gather in InfoNCE reassembles the
same global batch a single process would see.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from ssageo.config import ConfigError
from ssageo.io import DataError

if TYPE_CHECKING:
    from ssageo.data.manifest import Manifest

FIRST_SOURCES = ("random", "gps", "similarity")

# After this many consecutive places that cannot join the current batch (their tile is already
# in it), the rest of the epoch cannot form a full batch and the plan ends.
_MAX_DEFERRED = 1024


class HardNegativeSampler(torch.utils.data.Sampler):
    """Yields this rank's list of dataset indices for each global batch of an epoch.

    Takes ``keys`` (Q,) uniqueness key per place (the positive reference index), the global
    ``batch_size``, ``neighbour_select`` (how many neighbours join each taken place: half the
    nearest, half at random from the rest of its list) and ``neighbour_range`` (how much of a
    neighbour list is used). Without neighbour lists (``set_neighbours`` not called) batches
    are a plain random permutation under the same uniqueness rules. ``max_batches`` cuts every
    epoch short (for smoke tests and benchmarks).
    """

    def __init__(
        self,
        keys: np.ndarray,
        batch_size: int,
        neighbour_select: int = 8,
        neighbour_range: int = 32,
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
        max_batches: int | None = None,
    ) -> None:
        if batch_size % world_size:
            raise ConfigError(
                f"train.batch_size={batch_size} (the global batch) must be divisible by the "
                f"number of processes ({world_size})"
            )
        if len(np.unique(keys)) < batch_size:
            raise ConfigError(
                f"only {len(np.unique(keys))} distinct training places, fewer than "
                f"train.batch_size={batch_size}"
            )
        self.keys = np.asarray(keys, dtype=np.int64)
        self.batch_size = batch_size
        self.neighbour_select = neighbour_select
        self.neighbour_range = neighbour_range
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.max_batches = max_batches
        self.neighbours: np.ndarray | None = None
        self.neighbour_source = "none"
        self.epoch = 0
        self.start_batch = 0
        self._plan: list[np.ndarray] | None = None

    def set_neighbours(self, neighbours: np.ndarray | None, source: str) -> None:
        """Use ``neighbours`` (Q, k) place indices, most similar first; ``source`` names them."""
        self.neighbours = None if neighbours is None else np.asarray(neighbours, dtype=np.int64)
        self.neighbour_source = source if neighbours is not None else "none"
        self._plan = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch to plan and the batch to start from (non-zero when resuming)."""
        self.epoch = epoch
        self.start_batch = start_batch
        self._plan = None

    def plan(self) -> list[np.ndarray]:
        """The epoch's global batches (each ``batch_size`` place indices), computed once."""
        if self._plan is None:
            self._plan = plan_epoch(
                self.keys, self.batch_size, self.neighbours, self.neighbour_select,
                self.neighbour_range, np.random.default_rng([self.seed, self.epoch]),
            )[:self.max_batches]
        return self._plan

    def __len__(self) -> int:
        return max(0, len(self.plan()) - self.start_batch)

    def __iter__(self) -> Iterator[list[int]]:
        share = self.batch_size // self.world_size
        for batch in self.plan()[self.start_batch:]:
            yield batch[self.rank * share:(self.rank + 1) * share].tolist()

    def state_dict(self, position: int | None = None) -> dict:
        """Everything needed to replay the epoch from batch ``position`` (default: the start
        batch): plain values plus the neighbour array."""
        return {
            "epoch": self.epoch, "seed": self.seed,
            "start_batch": self.start_batch if position is None else position,
            "neighbour_source": self.neighbour_source, "neighbours": self.neighbours,
        }

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.set_neighbours(state["neighbours"], state["neighbour_source"])
        self.set_epoch(int(state["epoch"]), int(state["start_batch"]))


def plan_epoch(
    keys: np.ndarray,
    batch_size: int,
    neighbours: np.ndarray | None,
    neighbour_select: int,
    neighbour_range: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Plan one epoch of hard-negative batches (docs/METHOD.md section 5).

    Places are taken in a random order; after a place joins the batch, its nearest
    ``neighbour_select // 2`` neighbours and ``neighbour_select // 2`` drawn at random from the
    rest of its first ``neighbour_range`` neighbours join too, each only if it is unused this
    epoch and its key is not yet in the batch. A taken place whose key is already in the batch
    waits for a later batch. An incomplete last batch is dropped. Returns a list of (B,) arrays.
    """
    n = len(keys)
    half = neighbour_select // 2
    used = np.zeros(n, dtype=bool)
    pool = deque(rng.permutation(n).tolist())
    batches: list[np.ndarray] = []
    batch: list[int] = []
    batch_keys: set[int] = set()
    deferred = 0

    def take(place: int) -> None:
        batch.append(place)
        batch_keys.add(int(keys[place]))
        used[place] = True

    while pool and deferred < _MAX_DEFERRED:
        place = pool.popleft()
        if used[place]:
            continue  # already co-batched as someone's neighbour
        if int(keys[place]) in batch_keys:
            pool.append(place)
            deferred += 1
            continue
        deferred = 0
        take(place)
        if neighbours is not None and half > 0:
            near = neighbours[place, :neighbour_range]
            rest = near[half:]
            drawn = rng.choice(rest, size=min(half, len(rest)), replace=False)
            for other in np.concatenate([near[:half], drawn]):
                if len(batch) >= batch_size:
                    break
                if other >= 0 and not used[other] and int(keys[other]) not in batch_keys:
                    take(int(other))
        if len(batch) >= batch_size:
            batches.append(np.asarray(batch, dtype=np.int64))
            batch, batch_keys = [], set()
    return batches


def similarity_neighbours(
    query: torch.Tensor | np.ndarray,
    reference: torch.Tensor | np.ndarray,
    positive: np.ndarray,
    k: int,
    block_size: int = 4096,
) -> np.ndarray:
    """Top-``k`` most confusable places for each place, by descriptor similarity.

    Takes L2-normalised ``query`` (Q, D) and ``reference`` (R, D) descriptors (tensors or
    arrays) of the training set and ``positive`` (Q,) reference index per query. Place j is a
    neighbour of place i when i's query is similar to j's positive reference; places sharing
    i's tile (i itself included) are excluded. Works in blocks of queries so Q x Q is never
    materialised. Returns (Q, k).
    """
    query, reference = torch.as_tensor(query), torch.as_tensor(reference)
    positive_t = torch.as_tensor(positive, dtype=torch.long)
    candidates = reference[positive_t].float()  # (Q, D): each place's own tile
    k = min(k, len(positive) - 1)
    out = []
    for start in range(0, len(positive), block_size):
        sim = query[start:start + block_size].float() @ candidates.T  # (b, Q)
        same_tile = positive_t[start:start + block_size, None] == positive_t[None, :]
        sim.masked_fill_(same_tile, float("-inf"))
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out).numpy()


def first_source(sampling: dict) -> str:
    """``train.sampling.first`` checked (a config without it, from before the key existed, reads
    its old ``gps`` flag: GPS lists when true, random batches otherwise)."""
    first = sampling.get("first", "gps" if sampling.get("gps", True) else "random")
    if first not in FIRST_SOURCES:
        raise ConfigError(f"train.sampling.first must be one of {', '.join(FIRST_SOURCES)}, "
                          f"got {first!r}")
    return first


def epoch_neighbours(sampler: HardNegativeSampler, model: torch.nn.Module, manifest: Manifest,
                     config: dict, epoch: int, log: Callable[[str], None] = print) -> None:
    """Give ``sampler`` the neighbour lists epoch ``epoch`` uses (docs/METHOD.md section 5).

    Similarity neighbours of the current ``model`` are recomputed at epoch ``similarity_start``
    and every ``similarity_every`` epochs after (when ``similarity`` is on). Before the first
    recomputation, ``train.sampling.first`` decides: ``random`` batches, ``gps`` neighbour lists,
    or ``similarity`` neighbours of the starting (pretrained) model, computed once before the
    first epoch. Lists already held (restored from a checkpoint) are kept until the next
    recomputation, so a resumed run uses the lists an uninterrupted run would.
    """
    from ssageo.data.neighbours import gps_neighbours
    from ssageo.evaluate.embed import embed_manifest

    s = config["train"]["sampling"]
    first = first_source(s)
    start, every = int(s["similarity_start"]), int(s["similarity_every"])
    due = s["similarity"] and epoch >= start and (epoch - start) % every == 0
    if not due and (sampler.neighbours is not None or first == "random"):
        return
    if due or first == "similarity":
        query, reference = embed_manifest(model, manifest, config)
        sampler.set_neighbours(
            similarity_neighbours(query, reference, manifest.positive, s["neighbour_range"]),
            f"similarity@epoch{epoch}",
        )
        log(f"epoch {epoch + 1}: similarity neighbours computed with the "
            f"{'current' if due else 'starting'} model")
        return
    try:
        sampler.set_neighbours(gps_neighbours(manifest, k=s["gps_k"]), "gps")
    except DataError as exc:
        raise DataError(f"{exc} (or set train.sampling.first=random)") from None
    log(f"epoch {epoch + 1}: GPS neighbour lists")
