"""Fair shares of the model between clients (``edgecap serve``).

The queue bounds how many images wait, but not what they cost: images with the widest beams
and the longest captions cost as much as thousands of greedy ones, and one inference thread
serves them in turn. So each client may have at most ``per_client`` units of work in flight, a unit being one
image x one beam x one new token. A request over its client's share is answered Too Many Requests with
``Retry-After`` at once; a client with nothing in flight is always admitted (so a single request
the share cannot hold still runs, alone). A heavy client thus has one heavy request queued at a
time, and a light client waits behind at most that one, not behind all of them.
"""

from __future__ import annotations

from collections import Counter

from ..manifest import GenerationOptions


def request_cost(images: int, options: GenerationOptions) -> int:
    """Work units of a caption request: images x beams x most new tokens."""
    return images * max(1, options.num_beams) * max(1, options.max_new_tokens)


class CostShares:
    """Work in flight per client, within ``per_client`` units (event-loop only, no locks)."""

    def __init__(self, per_client: int):
        self.per_client = per_client
        self.in_flight: Counter[str] = Counter()

    def admit(self, client: str, cost: int) -> bool:
        """Take ``cost`` units of ``client``'s share; False (nothing taken) when over it."""
        held = self.in_flight[client]
        if held and held + cost > self.per_client:
            return False
        self.in_flight[client] = held + cost
        return True

    def release(self, client: str, cost: int) -> None:
        self.in_flight[client] -= cost
        if self.in_flight[client] <= 0:
            del self.in_flight[client]  # the table holds only clients with work in flight
