"""Budget-aware value tree search: the budget split down a tree of steps by estimated value.

The tree. A node is a path (its steps so far); the root is the empty path. A node's value is
``V(n) = R(n) + gamma * max V(c)`` over the children it has (``V(n) = R(n)`` for a leaf), where
``R(n)`` is the process reward of its prefix: its step scores folded by ``aggregation`` (default
"last", the scorer's view of the whole prefix; unscored counts 0). ``gamma`` weighs what a subtree
has found below its root: 0 values a node by its own reward, 1 by the best path below it. Each
search step expands the live leaves, each into up to ``branching`` (k) children with one request
of n = its children, all leaves' requests in one round, then scores every new child in one call
of the process scorer.

Splitting in proportion to value. Whatever is split, at a node it goes to the node's children
that still have a live leaf below them, in proportion to their values ``V(c)`` (whole parts by
largest remainders, so they add up exactly; equal parts where every value is 0), and on down.

- Tokens. The search has a pool of output tokens, all of it the root's share. A leaf's request
  asks for no more than its share has left (c children of at most ``share // c`` tokens), and
  what it did not spend is split among its new live children. So a subtree never spends more
  output tokens than it was given (``ShareTree``). A subtree left with no live leaf hands what it
  did not spend back to its parent, which splits it among its other children by their values,
  which by then include what their own subtrees found. A leaf whose share cannot pay for one
  step of ``SamplingOptions.min_tokens`` is pruned (the lowest-valued first), except the last
  live path when nothing has finished, which ends as a "budget" candidate.
- Paths. Each search step, the paths N leaves room for (N less those finished) are split the
  same way, a leaf taking at most k and what its share pays for (``ShareTree.paths_for``; what one
  cannot take goes to the others); a leaf given none is pruned, a leaf given c asks for c children.
  So branching goes where the value is, and a low-valued branch gives way to a better one.

The search ends when N paths have finished, no leaf is live, or the budget refuses a request or
the scoring.

The answer: the finished leaf with the best value, which for a leaf is its reward ``R``, the same
aggregated score ``steps.choose`` ranks by: among the paths the model ended with an answer
(``vote``: the answer with the highest summed score), else among all with an answer.

Budget meaning of ``--budget N``:

- generations: N paths, each finished path one generation (``algorithms/steps.py``: a path holds
  its generation from the moment it is asked for, so finished plus live paths never pass N, and a
  pruned path gives it back). Steps are continuations, never generations; with no generation
  limit, ``width`` is N (default 8).
- tokens: the pool is what the budget's output-token and total-token limits leave (the smaller,
  along the ledger and every ledger above it), split as above; without a token limit it is a
  notional pool of ``SamplingOptions.max_tokens`` x N (what N full-length paths could write).
  Shares count the output tokens of step requests; prompts' input tokens and the process
  scorer's calls are charged to the ledger, which bounds every request: where they draw on the
  same limit the ledger refuses a request before the shares run out, and the search ends there.
- dollars: not split; every request and scoring call is reserved at its worst case and refused
  past the limit, which ends the search.
- deadline: every request is bounded by it; a step cut by the deadline ends the search, and the
  paths still live end as "deadline" candidates.

Round trips: one round of step requests plus one of scoring per search step.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from apportion.algorithms.base import Algorithm, RunContext, SamplingOptions
from apportion.algorithms.steps import (
    ROOT,
    Path,
    SearchOptions,
    StepOptions,
    StepSearch,
    best_first,
    search_result,
    start_search,
    step_sampling,
)
from apportion.answers.equivalence import Equivalence
from apportion.budget.ledger import Ledger
from apportion.budget.units import Budget
from apportion.errors import ConfigError
from apportion.lm.base import Backend, Prompt
from apportion.result import Candidate, Result
from apportion.reward.process import AGGREGATIONS, ProcessScorer


@dataclass(frozen=True, slots=True)
class ValueTreeSearchOptions:
    """The search's settings."""

    sampling: SamplingOptions = field(default_factory=step_sampling)
    """``max_tokens`` bounds a whole path's output tokens (and sets the notional pool without a
    token limit); ``min_tokens`` is the least a child's step is asked for."""
    steps: StepOptions = field(default_factory=StepOptions)
    branching: int = 3
    """k: the children asked of each live leaf per search step."""
    gamma: float = 0.9
    """The discount of a child's value in its parent's: 0 values a node by its own reward, 1 by
    the best path found below it."""
    width: int | None = None
    """N where the budget sets no generation limit (default 8); under one, at most N of it."""
    aggregation: str = "last"
    """How a path's step scores make its reward R and its score (``reward.process.AGGREGATIONS``)."""
    vote: bool = False
    """Answer with the highest summed score over paths instead of the best path's."""

    def __post_init__(self) -> None:
        if self.branching < 1:
            raise ConfigError(f"branching must be >= 1, got {self.branching}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"gamma must be between 0 and 1, got {self.gamma}")
        if self.width is not None and self.width < 1:
            raise ConfigError(f"width must be >= 1, got {self.width}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")

    @classmethod
    def from_search(cls, search: SearchOptions, *, gamma: float = 0.9) -> ValueTreeSearchOptions:
        """The settings a step-wise search's options give (``beam_width`` is k)."""
        return cls(search.sampling, search.steps, search.beam_width, gamma, search.width, search.aggregation,
                   search.vote)


@dataclass(eq=False, slots=True)
class Node:
    """A node of the searched tree: its path, its place, and its subtree's token share."""

    path: Path
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)
    share: int = 0
    """Output tokens granted to its subtree so far (what its parent handed down, and later what
    its closed siblings handed back)."""
    free: int = 0
    """Of the share, what is neither spent nor handed on: only a live leaf holds any."""
    spent: int = 0
    """The output tokens of its own step request (its children's newest steps)."""
    live: bool = True
    """A leaf still to be expanded."""
    open: bool = True
    """Its subtree has a live leaf."""

    def subtree(self) -> list[Node]:
        """It and every node below it, parents before children."""
        out, todo = [], [self]
        while todo:  # not recursive: a path may have many more steps than Python's stack has frames
            node = todo.pop()
            out.append(node)
            todo.extend(reversed(node.children))
        return out

    def subtree_spent(self) -> int:
        return sum(n.spent for n in self.subtree())


class ShareTree:
    """The tree of a search and its token shares: the pool goes to the root, a leaf spends out of
    its share, what it did not spend is split among its live children by value, and what a closed
    subtree did not spend goes back up. Holds ``subtree_spent() <= share`` for every node (a
    server that generates past ``max_tokens`` aside: that is charged, and leaves the node none)."""

    def __init__(self, pool: int, gamma: float, aggregation: str) -> None:
        self.pool = max(0, pool)
        self.gamma = gamma
        self.aggregation = aggregation
        self.root = Node(ROOT, share=self.pool, free=self.pool)
        self.unused = 0
        """Tokens handed back past the root: the search ended without them."""

    def reward(self, node: Node) -> float:
        """R(n): the node's aggregated process reward (0 unscored, and for the root)."""
        return node.path.score(self.aggregation) or 0.0

    def values(self) -> dict[int, float]:
        """``V(n) = R(n) + gamma * max V(c)`` over its children (``R(n)`` for a leaf), by ``id`` of
        every node."""
        out: dict[int, float] = {}
        for node in reversed(self.root.subtree()):  # children before parents
            below = max((out[id(c)] for c in node.children), default=None)
            out[id(node)] = self.reward(node) + (self.gamma * below if below is not None else 0.0)
        return out

    def value(self, node: Node) -> float:
        return self.values()[id(node)]

    def live(self) -> list[Node]:
        """The live leaves, best value first (earlier first among equals)."""
        leaves = [n for n in self.root.subtree() if n.live]
        rewards = [self.reward(n) for n in leaves]  # a leaf's value is its reward
        return [leaves[i] for i in sorted(range(len(leaves)), key=lambda i: best_first(rewards[i], i))]

    def paths_for(self, total: int, capacity: Callable[[Node], int]) -> dict[int, int]:
        """``total`` new paths (children) split down the tree as tokens are: at each node among its
        open children in proportion to their values, none given more than its live leaves can
        take (``capacity`` of each), the rest to the others; by ``id`` of every live leaf."""
        values = self.values()
        room: dict[int, int] = {}
        for node in reversed(self.root.subtree()):  # children before parents
            room[id(node)] = capacity(node) if node.live else sum(room[id(c)] for c in node.children if c.open)
        out: dict[int, int] = {}
        todo = [(self.root, min(total, room[id(self.root)]))]
        while todo:
            at, amount = todo.pop()
            if at.live:
                out[id(at)] = amount
                continue
            heirs = [c for c in at.children if c.open]
            parts = proportional(amount, [values[id(c)] for c in heirs], [room[id(c)] for c in heirs])
            todo.extend(zip(heirs, parts))
        return out

    def grow(self, node: Node, kids: Sequence[Path]) -> list[Node]:
        """Attach ``kids`` (at least one) to the live leaf ``node``: their new steps are charged
        to its share, and the rest is split among the kids still live."""
        if not node.live or not kids:
            raise ValueError("only a live leaf grows, and only with children")
        node.spent = sum(max(0, k.tokens - node.path.tokens) for k in kids)
        rest = max(0, node.free - node.spent)
        node.free = 0
        node.live = False
        made = [Node(k, node, live=not k.finished, open=not k.finished) for k in kids]
        node.children.extend(made)
        self._hand_down(node, rest)
        return made

    def prune(self, node: Node) -> None:
        """End the live leaf ``node``: what its share has left goes back up."""
        if not node.live:
            raise ValueError("only a live leaf is pruned")
        rest, node.free, node.live = node.free, 0, False
        self._hand_down(node, rest)

    def _hand_down(self, node: Node, amount: int) -> None:
        """``amount`` of ``node``'s share to its open children by value, or to itself as a live
        leaf; a node with neither closes and hands it to its parent."""
        values = self.values()
        todo = [(node, amount)]
        while todo:
            at, amount = todo.pop()
            if at.live:
                at.free += amount
                continue
            heirs = [c for c in at.children if c.open]
            if not heirs:
                at.open = False
                if at.parent is None:
                    self.unused += amount
                else:
                    todo.append((at.parent, amount))
                continue
            for heir, part in zip(heirs, proportional(amount, [values[id(c)] for c in heirs])):
                if part:
                    heir.share += part
                    todo.append((heir, part))


def proportional(total: int, weights: Sequence[float], caps: Sequence[int] | None = None) -> list[int]:
    """``total`` in whole parts proportional to ``weights`` (negative as 0; equal parts where all
    are 0), adding up to ``total`` exactly: floors, then the remainder one each to the largest
    fractions (earlier first among equals), in exact arithmetic. With ``caps``, no part passes its
    cap: what a capped part cannot take goes to the others the same way (``total`` must fit)."""
    limits = list(caps) if caps is not None else [total] * len(weights)
    if total > sum(limits):
        raise ValueError(f"{total} does not fit parts capped at {limits}")
    parts = [0] * len(weights)
    left = total
    while left > 0:
        open_ = [i for i in range(len(weights)) if parts[i] < limits[i]]
        for i, due in zip(open_, _largest_remainders(left, [weights[i] for i in open_])):
            took = min(due, limits[i] - parts[i])
            parts[i] += took
            left -= took
    return parts


def _largest_remainders(total: int, weights: Sequence[float]) -> list[int]:
    exact = [Fraction(max(0.0, w)) for w in weights]
    whole = sum(exact)
    if whole == 0:
        exact, whole = [Fraction(1)] * len(weights), Fraction(len(weights))
    dues = [total * w / whole for w in exact]
    parts = [math.floor(d) for d in dues]
    for i in sorted(range(len(dues)), key=lambda i: (-(dues[i] - parts[i]), i))[: total - sum(parts)]:
        parts[i] += 1
    return parts


def token_pool(ledger: Ledger, sampling: SamplingOptions, width: int) -> int:
    """The search's pool of output tokens: the least output or total tokens left along the ledger
    chain, else ``sampling.max_tokens`` x N."""
    limits: list[int] = []
    at: Ledger | None = ledger
    while at is not None:
        left = at.remaining()
        limits.extend(v for v in (left.output_tokens, left.total_tokens) if v is not None)
        at = at.parent
    return max(0, min(limits)) if limits else sampling.max_tokens * width


class ValueTreeSearch(Algorithm):
    name = "value-tree-search"

    def __init__(self, options: ValueTreeSearchOptions | None = None, *,
                 process_scorer: ProcessScorer | None = None, equivalence: Equivalence | None = None) -> None:
        super().__init__(equivalence=equivalence)
        self.options = options or ValueTreeSearchOptions()
        self.process_scorer = process_scorer

    def options_dict(self) -> dict[str, object]:
        scorer = self.process_scorer.name if self.process_scorer is not None else None
        return {**super().options_dict(), "process_scorer": scorer}

    async def stream(self, lm: Backend, prompt: str | Prompt, budget: Budget | Ledger, *,
                     seed: int | None = None, prior: Sequence[Candidate] = ()) -> AsyncIterator[Result]:
        opts = self.options
        ctx, search = await start_search(self, lm, prompt, budget, seed, opts.sampling, opts.steps,
                                         self.process_scorer, opts.aggregation, opts.width)
        tree = ShareTree(token_pool(ctx.ledger, opts.sampling, search.width), opts.gamma, opts.aggregation)
        try:
            while search.room > 0 and not search.stopped:
                plan = self._plan(ctx, tree, search)
                if not plan:
                    break
                children = await search.step([(n.path, c) for n, c, _ in plan], [cap for _, _, cap in plan])
                if not any(children):
                    break
                for (node, _, _), kids in zip(plan, children):
                    if kids:  # a leaf the budget refused stays live, and ends with the search
                        tree.grow(node, kids)
                yield search_result(ctx, search, prior, opts.vote, final=False)
            search.finish([n.path for n in tree.live() if n.path.steps])
        finally:
            search.close()
        yield search_result(ctx, search, prior, opts.vote, final=True)

    def _plan(self, ctx: RunContext, tree: ShareTree, search: StepSearch) -> list[tuple[Node, int, int]]:
        """The live leaves to expand, best first, with their children and the tokens each child
        may take. Leaves whose share cannot pay for a step are pruned first, the lowest-valued
        first (what each hands back may feed the rest), except a last live path with nothing
        finished, which ends as a candidate. Then the paths N leaves room for are split among
        the rest by value (``ShareTree.paths_for``); a leaf given none is pruned."""
        while True:
            live = tree.live()
            starved = [n for n in live if self._afford(n, search) == 0]
            if not starved:
                break
            worst = starved[-1]
            if len(live) == 1 and not search.finished and worst.path.steps:
                search.finish([worst.path], "budget")
            elif worst.path.steps:
                search.prune(1)
            tree.prune(worst)
            if len(live) == 1:  # the pool, not N, ended the search
                ctx.ledger.exhausted_reason = (ctx.ledger.exhausted_reason
                                               or f"tokens: the search's pool of {tree.pool} output tokens is spent")
        counts = tree.paths_for(search.room, lambda n: self._afford(n, search))
        for node in live:
            if not counts[id(node)]:
                if node.path.steps:
                    search.prune(1)
                tree.prune(node)
        # after the pruning: what the pruned handed back may raise the others' shares
        return [(n, counts[id(n)], n.free // counts[id(n)]) for n in live if counts[id(n)]]

    def _afford(self, node: Node, search: StepSearch) -> int:
        """How many children ``node``'s share pays for: at most k, each given at least the least a
        step is asked for (0 where not even one is)."""
        left = min(search.steps.step_tokens, self.options.sampling.max_tokens - node.path.tokens)
        need = max(1, min(self.options.sampling.min_tokens, left))
        return min(self.options.branching, node.free // need)
