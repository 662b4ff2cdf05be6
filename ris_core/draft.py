"""A guess at how a caption goes on, from product names: the draft of speculative greedy decoding.

At batch 1 a decoder step costs about the same for one position as for several (it streams the decoder's weights
either way), so `ris_core.decoding.drafted_greedy` can check a guessed continuation in one step and keep the part
the model would have chosen itself: the caption is the greedy caption, in fewer steps. Most greedy captions are a
training name or close to one (64% verbatim for the reference run), so names are good guesses:

    draft = NameDraft(token_ids_of_training_names, end_token_id)  # each sequence ending with the end token
    draft.propose([...caption so far...], 8)  # the likeliest continuation, up to 8 tokens

While the caption so far is the beginning of some name, the guess follows the most common continuation among the
names that begin that way; once it is not, the most common token after its last two tokens (then its last one).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence


class NameDraft:
    """Most common continuations of a set of token sequences (a prefix tree, and bigram/unigram fallbacks)."""

    def __init__(self, sequences: Iterable[Sequence[int]], end_token_id: int) -> None:
        self.end_token_id = end_token_id
        self._child: dict[tuple[int, int], int] = {}  # (node, token) -> node; node 0 is the empty prefix
        passing: list[int] = [0]  # sequences through each node
        after_two: defaultdict[tuple[int, int], Counter[int]] = defaultdict(Counter)
        after_one: defaultdict[int, Counter[int]] = defaultdict(Counter)
        for sequence in sequences:
            node = 0
            for i, token in enumerate(sequence):
                node = self._child.setdefault((node, token), len(passing))
                if node == len(passing):
                    passing.append(0)
                passing[node] += 1
                if i >= 2:
                    after_two[(sequence[i - 2], sequence[i - 1])][token] += 1
                if i >= 1:
                    after_one[sequence[i - 1]][token] += 1
        # each node's likeliest next token (the first seen among equally common ones)
        self._next: dict[int, int] = {}
        most: dict[int, int] = {}
        for (node, token), child in self._child.items():
            if passing[child] > most.get(node, 0):
                most[node], self._next[node] = passing[child], token
        self._after_two = {key: counts.most_common(1)[0][0] for key, counts in after_two.items()}
        self._after_one = {key: counts.most_common(1)[0][0] for key, counts in after_one.items()}

    def _node(self, prefix: Sequence[int]) -> int | None:
        node: int | None = 0
        for token in prefix:
            node = self._child.get((node, token))
            if node is None:
                return None
        return node

    def propose(self, prefix: Sequence[int], max_tokens: int) -> list[int]:
        """Up to `max_tokens` tokens likely to follow `prefix`, stopping after the end token."""
        node, seen, out = self._node(prefix), list(prefix), []
        while len(out) < max_tokens:
            token = self._next.get(node) if node is not None else None
            if token is None and len(seen) >= 2:
                token = self._after_two.get((seen[-2], seen[-1]))
            if token is None and seen:
                token = self._after_one.get(seen[-1])
            if token is None:
                break
            out.append(token)
            if token == self.end_token_id:
                break
            node = self._child.get((node, token)) if node is not None else None
            seen.append(token)
        return out
