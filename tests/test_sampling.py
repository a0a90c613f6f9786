"""Sampling must be exact: the nucleus found without sorting equals the one a full sort gives."""

import pytest
import torch

from textgen.engine import sampling
from textgen.engine.params import SamplingParams
from textgen.engine.sampling import _nucleus_threshold, apply_penalties, sample


def reference_nucleus(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> set[int]:
    """Hugging Face's order and definition, by full sort: temperature, top-k, then top-p."""
    scaled = logits / temperature
    if top_k:
        kth = scaled.topk(top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, -1)
    order = probs.argsort(descending=True)
    before = probs[order].cumsum(0) - probs[order]
    return set(order[before < top_p].tolist())


def sampled_support(logits: torch.Tensor, params: SamplingParams, draws: int = 3000) -> set[int]:
    generators = [torch.Generator().manual_seed(i) for i in range(draws)]
    batch = logits.expand(draws, -1).clone()
    return set(sample(batch, [params] * draws, generators).tolist())


@pytest.mark.parametrize(
    "shape,top_k,top_p",
    [
        ("peaked", 0, 0.9),  # nucleus inside the first candidates: fast path
        ("flat", 0, 0.9),  # nucleus of thousands of tokens: threshold bisection
        ("flat", 0, 0.3),
        ("flat", 20, 0.8),  # top-k then top-p over the renormalised rest
        ("peaked", 5, 1.0),
    ],
)
def test_nucleus_matches_full_sort(shape, top_k, top_p):
    torch.manual_seed(0)
    vocab = 3000
    logits = torch.randn(vocab) * (4.0 if shape == "peaked" else 0.05)
    params = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p)
    expected = reference_nucleus(logits, 0.8, top_k, top_p)
    small = len(expected) < 400
    support = sampled_support(logits, params, draws=4000 if small else 1000)
    assert support <= expected
    if small:  # every member of a small nucleus shows up in enough draws
        assert support == expected


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999])
def test_bisected_threshold_gives_the_exact_nucleus_of_a_flat_distribution(top_p):
    torch.manual_seed(0)
    logits = torch.randn(50257) * 0.05  # like an untrained GPT-2: thousands of tokens in the nucleus
    probs = torch.softmax(logits, -1)
    threshold = _nucleus_threshold(logits[None], probs[None], torch.tensor([top_p]))[0]
    found = set((probs >= threshold).nonzero().flatten().tolist())
    assert found == reference_nucleus(logits, 1.0, 0, top_p)


@pytest.mark.parametrize(
    "top_p,draws",
    [
        (0.75, 4),  # rows draw from the whole distribution and keep draws inside the nucleus
        (0.75, 1),  # one draw, then the rows that drew outside find their nucleus first
        (0.3, 4),  # below DRAW_FROM_TOP_P: the nucleus is found first
    ],
)
def test_sampled_frequencies_are_the_nucleus_renormalised(top_p, draws, monkeypatch):
    monkeypatch.setattr(sampling, "DRAWS", draws)
    probs = torch.tensor([0.25, 0.4, 0.05, 0.15, 0.1, 0.05])
    # By a full sort: 0.4, 0.25 (0.4 before it), 0.15 (0.65 before) are the nucleus at 0.75; 0.4 alone at 0.3.
    nucleus = {0.75: [0, 1, 3], 0.3: [1]}[top_p]
    expected = torch.zeros(6)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
    rows = 20000
    params = SamplingParams(temperature=1.0, top_p=top_p)
    generators = [torch.Generator().manual_seed(i) for i in range(rows)]
    tokens = sample(probs.log().expand(rows, -1).clone(), [params] * rows, generators)
    frequencies = torch.bincount(tokens, minlength=6) / rows
    # Binomial standard deviation at 20000 draws is at most 0.0036: 0.015 is four of them.
    assert (frequencies - expected).abs().max() < 0.015, frequencies.tolist()


@pytest.mark.parametrize("top_p", [0.5, 0.9, 1.0])
def test_a_lone_row_samples_the_token_it_samples_in_a_batch(top_p, monkeypatch):
    """A lone stream's path (`_sample_lone`) against the batch's, seed by seed: the same draws from the
    row's generator, the same token, through rejected draws and, with DRAWS 1, the nucleus found first."""
    torch.manual_seed(2)
    logits = torch.randn(2, 5000) * 0.5  # flat: at top_p 0.5 about half the draws land outside
    params = SamplingParams(temperature=0.8, top_p=top_p)
    assert sampling._draws_lone(params)
    for draws in (sampling.DRAWS, 1):
        monkeypatch.setattr(sampling, "DRAWS", draws)
        for seed in range(100):
            alone = sample(logits[:1].clone(), [params], [torch.Generator().manual_seed(seed)])
            rngs = [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(7)]
            batched = sample(logits.clone(), [params, params], rngs)
            assert alone[0] == batched[0], (draws, seed)


def test_each_row_of_a_batch_gets_its_own_exact_nucleus():
    """The boundary tokens of all rows are ranked together: no row's count may leak into another's."""
    torch.manual_seed(1)
    spreads = [0.05, 4.0, 0.5, 0.05, 1.0, 0.02]
    top_ps = [0.9, 0.5, 0.999, 0.3, 0.95, 0.99999994]  # the last: above what float32 sums may reach
    logits = torch.stack([torch.randn(50257) * spread for spread in spreads])
    probs = torch.softmax(logits, -1)
    thresholds = _nucleus_threshold(logits, probs, torch.tensor(top_ps))
    for row, top_p in enumerate(top_ps):
        found = set((probs[row] >= thresholds[row]).nonzero().flatten().tolist())
        assert found == reference_nucleus(logits[row], 1.0, 0, top_p), row


def test_greedy_rows_take_the_argmax_and_sampling_rows_follow_their_seed():
    torch.manual_seed(1)
    logits = torch.randn(3, 100)
    params = [SamplingParams(temperature=0), SamplingParams(seed=3), SamplingParams(do_sample=False)]
    gens = [torch.Generator().manual_seed(p.seed or 0) for p in params]
    tokens = sample(logits.clone(), params, gens)
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()
    alone = sample(logits[1:2].clone(), [params[1]], [torch.Generator().manual_seed(3)])
    assert tokens[1] == alone[0]


def test_top_k_one_is_greedy():
    torch.manual_seed(2)
    logits = torch.randn(8, 500)
    params = [SamplingParams(top_k=1, top_p=1.0, temperature=1.5)] * 8
    gens = [torch.Generator().manual_seed(i) for i in range(8)]
    assert torch.equal(sample(logits.clone(), params, gens), logits.argmax(-1))


def test_repetition_penalty_follows_hf_semantics_and_ngram_ban():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_penalties(logits.clone(), [SamplingParams(repetition_penalty=2.0)], seen, [[3]])
    assert out.tolist() == [[1.0, -4.0, 1.0, float("-inf")]]
    untouched = apply_penalties(logits.clone(), [SamplingParams(repetition_penalty=1.0)], seen, [[]])
    assert torch.equal(untouched, logits)
    # The tokens that end the text are spared: a chat template writes its end-of-turn after every message
    spared = apply_penalties(logits.clone(), [SamplingParams(repetition_penalty=2.0)], seen, [[]], ends={0})
    assert spared.tolist() == [[2.0, -4.0, 1.0, 0.5]]


def test_a_chat_answer_penalized_for_repetition_still_ends(engine, encode, loaded_tiny):
    """The end-of-text token in a prompt that counts for the repetition penalty does not keep the answer
    from ending: made the likeliest token by logit_bias, end-of-text still comes first with a penalty of 10,
    which would have left it a tenth of its logit, below the runner-up's."""
    eos = loaded_tiny.tokenizer.eos_token_id
    prompt = encode("Hi") + [eos] + encode("Hello")
    runner_up = next(t for t in range(100, 200) if t not in prompt)
    bias = ((eos, 6.0), (runner_up, 3.0))  # the tiny model's own logits are within +-1
    params = SamplingParams(max_new_tokens=8, temperature=0, repetition_penalty=10.0, logit_bias=bias)
    result = engine.submit(prompt, params).wait(30)
    assert result.finish_reason == "eos" and result.completion_tokens == 1


def test_a_vanishing_penalty_or_temperature_never_yields_nan() -> None:
    # 5e-324 is a legal float that float32 rounds to 0: dividing by it gave inf logits, then NaN.
    logits = torch.tensor([[3.0, -1.0, 2.0, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    for penalty, temperature in ((5e-324, 0.7), (1.2, 5e-324), (5e-324, 5e-324)):
        params = [SamplingParams(repetition_penalty=penalty, temperature=temperature, top_p=0.9, seed=1)]
        penalized = apply_penalties(logits.clone(), params, seen, [[]])
        assert torch.isfinite(penalized).all()
        token = sample(penalized, params, [torch.Generator().manual_seed(1)])
        assert 0 <= int(token[0]) < 4


def test_presence_and_frequency_penalties_follow_openai_and_touch_only_their_rows():
    # logit -= frequency_penalty * count + presence_penalty * (count > 0), over the generated tokens.
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    params = [
        SamplingParams(repetition_penalty=1.0, frequency_penalty=0.5, presence_penalty=1.0),
        SamplingParams(repetition_penalty=1.0),
        SamplingParams(repetition_penalty=1.0, frequency_penalty=-1.0, presence_penalty=0.25),
    ]
    counts = [
        (torch.tensor([1, 3]), torch.tensor([2.0, 1.0])),  # token 1 twice, token 3 once
        None,  # no penalties: no counts kept
        (torch.tensor([0]), torch.tensor([3.0])),
    ]
    seen = torch.zeros(3, 4, dtype=torch.bool)
    out = apply_penalties(logits.clone(), params, seen, [[], [], []], counts)
    assert out.tolist() == [[1.0, 0.0, 3.0, 2.5], [1.0, 2.0, 3.0, 4.0], [3.75, 2.0, 3.0, 4.0]]


def test_logit_bias_is_added_to_its_own_row_only():
    logits = torch.zeros(2, 5)
    params = [SamplingParams(logit_bias=((4, -100.0), (1, 2.5))), SamplingParams()]
    out = apply_penalties(logits.clone(), params, torch.zeros(2, 5, dtype=torch.bool), [[], []])
    assert out.tolist() == [[0.0, 2.5, 0.0, 0.0, -100.0], [0.0] * 5]
    # A bias of 100 all but forces its token, whatever the row samples with.
    forced = apply_penalties(
        torch.randn(8, 50),
        [SamplingParams(logit_bias=((7, 100.0),), temperature=1.5)] * 8,
        torch.zeros(8, 50, dtype=torch.bool),
        [[]] * 8,
    )
    tokens = sample(
        forced,
        [SamplingParams(temperature=1.5, top_p=1.0)] * 8,
        [torch.Generator().manual_seed(i) for i in range(8)],
    )
    assert tokens.tolist() == [7] * 8


@pytest.mark.parametrize("min_p,temperature,top_p", [(0.1, 1.0, 1.0), (0.3, 0.7, 1.0), (0.05, 1.2, 0.9)])
def test_min_p_keeps_exactly_the_tokens_at_least_min_p_times_as_likely_as_the_best(min_p, temperature, top_p):
    torch.manual_seed(3)
    logits = torch.randn(200) * 2.0
    probs = torch.softmax(logits / temperature, -1)
    kept = set((probs >= min_p * probs.max()).nonzero().flatten().tolist())
    # top-p applies to what min-p left (renormalised), as in vLLM.
    renormalised = torch.where(probs >= min_p * probs.max(), logits / temperature, float("-inf"))
    expected = reference_nucleus(renormalised, 1.0, 0, top_p) & kept
    params = SamplingParams(min_p=min_p, temperature=temperature, top_p=top_p)
    assert sampled_support(logits, params, draws=4000) == expected


def test_min_p_costs_only_its_rows_and_one_is_greedy():
    torch.manual_seed(4)
    logits = torch.randn(6, 300)
    params = [SamplingParams(min_p=1.0, temperature=2.0, top_p=1.0, seed=i) for i in range(3)]
    params += [SamplingParams(temperature=2.0, top_p=1.0, seed=i) for i in range(3)]
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    tokens = sample(logits.clone(), params, gens)
    assert tokens[:3].tolist() == logits[:3].argmax(-1).tolist()  # only the likeliest is kept
    alone = sample(logits[3:].clone(), params[3:], [torch.Generator().manual_seed(i) for i in range(3, 6)])
    assert tokens[3:].tolist() == alone.tolist()  # rows without min_p sample as they would alone


def test_the_two_level_inverse_cdf_draws_the_token_one_cumulative_sum_does():
    """Over GPT-2's vocabulary (the last block short), whole-number weights so that every sum is exact: for
    each uniform number, the block and then the token within it are the token of the full cumulative sum,
    and never one without weight (zero rows, a zero tail, weight only at the edges of blocks)."""
    width = 50257
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 4, (width,), generator=generator).float() for _ in range(3)]
    sparse = torch.zeros(width)
    sparse[[0, 255, 256, 40000, width - 1]] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    tail_free = torch.randint(0, 4, (width,), generator=generator).float()
    tail_free[-300:] = 0.0
    one = torch.zeros(width)
    one[width - 2] = 7.0
    rows += [sparse, tail_free, one]
    count = 4 * sampling.TWO_LEVEL_ROWS
    edges = torch.tensor([0.0, 1.0, 1.0 - 2.0**-24, 0.5])
    uniform = torch.cat([edges, (torch.arange(count - len(edges)) + 0.5) / (count - len(edges))])
    for weights in rows:
        batch = weights.expand(count, width)
        picked = sampling._inverse_cdf(batch, uniform)
        assert torch.equal(picked, sampling._search(batch.cumsum(-1), uniform))
        assert bool((weights[picked] > 0).all())


def test_the_mass_above_a_probability_is_the_masked_sum():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(5, 50257) * torch.tensor([[0.1], [1.0], [3.0], [8.0], [20.0]]), -1)
    floor = probs.gather(1, torch.randint(0, 50257, (5, 1)))
    expected = (probs * (probs > floor)).sum(-1)
    assert torch.allclose(sampling._mass_above(probs, floor), expected, atol=1e-6)
