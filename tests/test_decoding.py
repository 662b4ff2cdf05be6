"""Step-by-step decoding (ris_core.decoding) makes generate()'s decisions: the same greedy captions and the same
beam hypotheses in the same order, at any batch size, with the shortlist head or a full output layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from ris_core import decoding
from ris_core.draft import NameDraft
from ris_core.encoder_decoder import Captioner
from ris_core.modeling import ModelSpec, build_captioner
from ris_core.output_head import ShortlistHead
from ris_core.prefix_tree import PrefixTree
from tests.conftest import REPO

pytestmark = pytest.mark.slow
REFERENCE = REPO / "results" / "runs" / "reference-cpu"  # the committed captioner: real captions of every length


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted((REPO / "data" / "demo" / "images").glob("*.jpg"))[:24]]


@pytest.fixture(scope="module")
def reference() -> Captioner:
    return Captioner.load(REFERENCE)


def both_paths(captioner: Captioner, call):
    captioner.fast_decoding = False
    slow = call()
    captioner.fast_decoding = True
    return slow, call()


def test_greedy_captions_equal_generate_at_every_batch_size(reference: Captioner, images):
    captioner = reference
    assert isinstance(captioner.model.decoder.lm_head, ShortlistHead) and captioner.decodes_fast
    for batch_size in (1, 5, 24):
        slow, fast = both_paths(captioner, lambda b=batch_size: captioner.caption(images, batch_size=b))
        assert fast == slow
    # the captions end at different lengths, so rows left the batch while others went on decoding
    assert len({len(c.split()) for c in fast}) > 2 and all(fast), fast


@pytest.mark.parametrize("num_beams", [2, 5])
def test_beam_hypotheses_equal_generate_in_order(reference: Captioner, images, num_beams: int):
    captioner = reference
    slow, fast = both_paths(captioner, lambda: captioner.n_best(images, num_beams))
    assert fast == slow and all(len(beams) == num_beams for beams in fast)
    assert len({len(beams[-1].split()) for beams in fast}) > 2  # hypotheses of many lengths
    single_slow, single_fast = both_paths(captioner, lambda: captioner.caption(images[:6], num_beams=num_beams))
    assert single_fast == single_slow == [beams[0] for beams in fast[:6]]


def test_a_full_output_layer_and_captions_that_run_to_the_length_limit(images):
    torch.manual_seed(0)  # untrained: rarely ends, so the length limit and the beams' last step are exercised
    spec = ModelSpec(n_layer=2, n_embd=64, n_head=2)
    captioner = Captioner(model=build_captioner(spec).eval(), spec=spec)
    # an untied random output layer (tied, the start token's own row wins and every caption ends at once)
    captioner.model.decoder.lm_head = torch.nn.Linear(64, 50257, bias=False)
    for call in (lambda: captioner.run_batch(images[:4], max_new_tokens=8).captions,
                 lambda: captioner.n_best(images[:3], 3, max_new_tokens=6)):
        slow, fast = both_paths(captioner, call)
        assert fast == slow and all(fast)


def test_settings_it_does_not_implement_go_to_generate(tiny_run: Path, images, monkeypatch):
    captioner = Captioner.load(tiny_run)
    captioner.model.generation_config.repetition_penalty = 1.3
    assert not captioner.decodes_fast

    def refuse(*args, **kwargs):
        raise AssertionError("step-by-step decoding used for a setting it does not implement")

    monkeypatch.setattr(decoding, "greedy", refuse)
    monkeypatch.setattr(decoding, "beam_search", refuse)
    assert len(captioner.caption(images[:2])) == 2 and len(captioner.n_best(images[:2], 2)[0]) == 2


def test_output_columns_give_the_full_softmax(tiny_run: Path):
    head = Captioner.load(tiny_run).model.decoder.lm_head
    columns = decoding.OutputColumns.of(head)
    hidden = torch.randn(3, columns.weight.shape[1])
    full = torch.log_softmax(head(hidden).float(), dim=-1)
    assert columns.log_probs(hidden) == pytest.approx(full[:, columns.tokens], rel=1e-5)  # float rounding only
    assert int(columns.tokens[-1]) == int(torch.nonzero(head.column == len(head.shortlist))[0, 0])
    # every token id maps to the column holding its logit
    assert torch.equal(columns.tokens[columns.column_of[columns.tokens]], columns.tokens)


def test_prefix_tree_feeds_each_shared_prefix_once():
    tree = PrefixTree.of([[5, 6, 7, 0], [5, 6, 0], [5, 9, 0], [5, 6, 7, 0], [0]], start_token_id=0)
    assert tree.tokens == [0, 5, 6, 7, 9] and tree.parents == [-1, 0, 1, 2, 1] and tree.depths == [0, 1, 2, 3, 2]
    assert len(tree.edges) == 4 + 3 + 3 + 4 + 1  # one target per token of each candidate, end token included
    mask = tree.ancestry(6)
    assert mask[3].tolist() == [True, True, True, True, False, False]  # node 3 sees the start, 5, 6 and itself
    assert mask[4].tolist() == [True, True, False, False, True, False] and mask[5].tolist() == [False] * 5 + [True]


def test_prefix_tree_likelihoods_equal_one_row_per_candidate(reference: Captioner, images):
    """Candidates sharing prefixes, one a prefix of another, a repeat, an empty one, beams, an image without
    candidates: the same scores as the padded rows of `sequence_log_likelihoods` (fast_decoding False)."""
    captioner = reference
    beams = captioner.n_best(images[:6], 5)
    shared = ["Nike Men Black Shoes", "Nike Men Black Shoes Grey", "Nike Men Blue T-shirt", "Nike Men Black Shoes", ""]
    texts = [[*b, *shared[: i + 1]] for i, b in enumerate(beams)]
    texts[3] = []
    slow, fast = both_paths(captioner, lambda: captioner.log_likelihoods(images[:6], texts))
    for a, b, t in zip(slow, fast, texts, strict=True):
        assert len(a) == len(b) == len(t) and list(b) == pytest.approx(list(a), abs=1e-3)
    assert fast[5][5] == fast[5][8] and fast[5][0] != fast[5][1]  # a repeat scores alike; beams differ


def test_drafted_greedy_keeps_the_greedy_caption_whatever_the_guesses(reference: Captioner, images, monkeypatch):
    """No guesses, good ones (names), near-perfect ones (the captions themselves), useless ones, and a length limit
    inside a guess: the same captions as plain greedy one image at a time, in fewer steps when the guesses are
    good."""
    import pandas as pd

    captioner = reference
    plain = captioner.caption(images, batch_size=1)
    short = [captioner.run_batch([im], max_new_tokens=3).captions[0] for im in images[:4]]
    names = pd.read_csv(REPO / "data" / "demo" / "styles.csv")["productDisplayName"].dropna().astype(str).tolist()
    steps: list[int] = []  # positions fed at each decoder step
    extend = decoding.IncrementalDecoder.extend
    monkeypatch.setattr(decoding.IncrementalDecoder, "extend",
                        lambda state, tokens: (steps.append(tokens.shape[1]), extend(state, tokens))[1])
    drafts = {"none": NameDraft([], captioner.eos_token_id), "names": captioner.draft_from(names),
              "the captions": captioner.draft_from(plain),
              "useless": NameDraft([[11, 11, 11, captioner.eos_token_id]] * 3, captioner.eos_token_id)}
    taken = {}
    for name, draft in drafts.items():
        captioner.draft, steps[:] = draft, []
        assert captioner.caption(images, batch_size=1) == plain, name
        taken[name] = len(steps)
        assert [captioner.run_batch([im], max_new_tokens=3).captions[0] for im in images[:4]] == short, name
        if name == "none":  # a step a token, as plain greedy
            assert set(steps) == {1}
    assert taken["names"] < 0.8 * taken["none"] and taken["the captions"] < 0.5 * taken["none"]
    captioner.draft = None
    with pytest.raises(ValueError, match="one image"):
        decoding.drafted_greedy(captioner.model.decoder, torch.zeros(2, 4, 256), 0, 0, 8, drafts["none"])


def test_name_draft_follows_the_commonest_name_then_the_last_tokens():
    end = 0
    draft = NameDraft([[1, 2, 3, end], [1, 2, 3, end], [1, 2, 4, end], [5, 2, 4, 6, end], [5, 2, 4, 6, end]], end)
    assert draft.propose([], 8) == [1, 2, 3, end]  # from the start: the commonest name, end token included
    assert draft.propose([1, 2], 8) == [3, end] and draft.propose([1, 2, 3], 1) == [end]
    assert draft.propose([5], 2) == [2, 4]  # the only name beginning so, cut at max_tokens
    # a prefix no name begins with: the commonest token after its last two, then after its last one
    assert draft.propose([9, 2, 4], 8) == [6, end]
    assert draft.propose([9, 9, 3], 8) == [end]
    assert draft.propose([9, 9, 7], 8) == [] and draft.propose([], 0) == []
    assert NameDraft([], end).propose([1], 4) == []
