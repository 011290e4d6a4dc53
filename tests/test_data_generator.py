"""Examples as token ids: layout, placement, determinism, split hygiene, streaming."""

import numpy as np
import pytest

from rmt.data.generator import SPLITS, TaskGenerator, split_of
from rmt.data.noise import load_noise
from rmt.data.tasks import TASKS, get_task
from rmt.hub import MINILM, load_tokenizer

SEGMENT = 64


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MINILM)


@pytest.fixture(scope="module")
def sentences():
    return load_noise("pydoc").sentences


@pytest.fixture(scope="module")
def generators(tokenizer, sentences):
    return {
        (name, placement): TaskGenerator(
            task=get_task(name), noise_sentences=sentences, tokenizer=tokenizer,
            segment_length=SEGMENT, placement=placement, seed=0,
        )
        for name in TASKS
        for placement in ("sentence", "segment")
    }


def contains_at(tokens, ids, position) -> bool:
    return np.array_equal(tokens[position : position + len(ids)], ids)


@pytest.mark.parametrize("placement", ["sentence", "segment"])
@pytest.mark.parametrize("name", sorted(TASKS))
def test_examples_have_the_exact_length_facts_where_stated_and_the_question_last(generators, name, placement):
    generator = generators[(name, placement)]
    for segments in (1, 2, 5):
        num_tokens = segments * SEGMENT
        for index in range(40):
            layout, tokens = generator.example("train", index, num_tokens)
            assert tokens.shape == (num_tokens,)
            assert contains_at(tokens, layout.question_ids, num_tokens - len(layout.question_ids))
            for position, ids in zip(layout.fact_positions, layout.fact_ids):
                assert contains_at(tokens, ids, position)
            assert generator.task.solve(layout.sample.facts, layout.sample.question) == layout.sample.answer


def test_memorize_puts_the_fact_first(generators):
    generator = generators[("memorize", "sentence")]
    assert all(generator.layout("train", i, 4 * SEGMENT).fact_positions == (0,) for i in range(50))


def test_sentence_placement_puts_facts_between_noise_sentences(generators, tokenizer):
    generator = generators[("detect_and_memorize", "sentence")]
    positions = []
    for index in range(100):
        layout, tokens = generator.example("train", index, 6 * SEGMENT)
        position = layout.fact_positions[0]
        positions.append(position)
        if position > 0:  # the tokens before a fact end a noise sentence (maybe as `.)` or `."`)
            assert set(tokenizer.decode(tokens[position - 2 : position])) & {".", "!", "?"}
    assert min(positions) < 2 * SEGMENT and max(positions) > 4 * SEGMENT  # spread over the input


def test_segment_placement_puts_facts_at_segment_starts(generators):
    """Segments are right-aligned (the encoder's cut): their starts lie a whole number of
    segments before the end."""
    for name in ("detect_and_memorize", "reasoning"):
        generator = generators[(name, "segment")]
        for index in range(60):
            num_tokens = 5 * SEGMENT
            layout = generator.layout("train", index, num_tokens)
            for position in layout.fact_positions:
                assert (num_tokens - position) % SEGMENT == 0


def test_same_inputs_same_example_and_the_seed_changes_it(generators, tokenizer, sentences):
    generator = generators[("reasoning", "sentence")]
    first = generator.example("valid", 7, 3 * SEGMENT)[1]
    assert np.array_equal(first, generator.example("valid", 7, 3 * SEGMENT)[1])
    other_seed = TaskGenerator(
        task=get_task("reasoning"), noise_sentences=sentences, tokenizer=tokenizer, segment_length=SEGMENT, seed=1
    )
    assert not np.array_equal(first, other_seed.example("valid", 7, 3 * SEGMENT)[1])
    assert not np.array_equal(first, generator.example("valid", 8, 3 * SEGMENT)[1])


def test_splits_never_share_noise_or_examples(generators, sentences):
    shares = {split: sum(split_of(s) == split for s in sentences) / len(sentences) for split in SPLITS}
    assert shares["train"] > 0.7 and 0.05 < shares["valid"] < 0.15 and 0.05 < shares["test"] < 0.15
    # Memorize at one segment is the most collision-prone layout: fact first, then noise.
    generator = generators[("memorize", "sentence")]
    split_of_example = {}
    for split in SPLITS:
        for index in range(300):
            key = generator.example(split, index, SEGMENT)[1].tobytes()
            assert split_of_example.setdefault(key, split) == split


def test_noise_never_mentions_a_name_or_place(generators, tokenizer):
    for name in TASKS:
        generator = generators[(name, "sentence")]
        reserved = {tokenizer.convert_tokens_to_ids(word) for word in generator.task.reserved_words}
        for split in SPLITS:
            assert reserved.isdisjoint(np.unique(generator.noise[split].tokens).tolist())


def test_streaming_gives_the_same_tokens_in_any_chunking(generators):
    generator = generators[("detect_and_memorize", "sentence")]
    num_tokens = 37 * SEGMENT
    whole = generator.example("test", 3, num_tokens)[1]
    for chunk_size in (7, 64, 1000):
        chunks = list(generator.chunks("test", 3, num_tokens, chunk_size))
        assert max(len(chunk) for chunk in chunks) <= chunk_size
        assert np.array_equal(np.concatenate(chunks), whole)
    batch = np.concatenate(list(generator.batch_chunks("test", [3, 4, 5], num_tokens, chunk_size=500)), axis=1)
    assert batch.shape == (3, num_tokens)
    assert np.array_equal(batch[0], whole)
    assert np.array_equal(batch[2], generator.example("test", 5, num_tokens)[1])


def test_a_two_million_token_example_streams_in_bounded_chunks(generators):
    generator = generators[("reasoning", "sentence")]
    num_tokens = 32768 * SEGMENT  # 2,097,152 tokens: the noise wraps around many times
    layout = generator.layout("test", 0, num_tokens)
    total, largest = 0, 0
    for chunk in generator.chunks("test", 0, num_tokens, chunk_size=1 << 16):
        total += len(chunk)
        largest = max(largest, len(chunk))
    assert total == num_tokens and largest <= 1 << 16
    assert len(generator.noise["test"].tokens) * 5 < num_tokens
    assert max(layout.fact_positions) < num_tokens


def test_bad_settings_fail_before_anything_is_made(tokenizer, sentences):
    with pytest.raises(ValueError, match="raise segment_length"):
        TaskGenerator(task=get_task("reasoning"), noise_sentences=sentences, tokenizer=tokenizer, segment_length=5)
    with pytest.raises(ValueError, match="use a longer noise source"):
        TaskGenerator(task=get_task("memorize"), noise_sentences=sentences[:40], tokenizer=tokenizer, segment_length=64)
    with pytest.raises(ValueError, match="placement"):
        TaskGenerator(task=get_task("memorize"), noise_sentences=sentences, tokenizer=tokenizer, segment_length=64,
                      placement="middle")
    generator = TaskGenerator(task=get_task("memorize"), noise_sentences=sentences, tokenizer=tokenizer, segment_length=64)
    with pytest.raises(ValueError, match="Unknown split"):
        generator.layout("dev", 0, 64)
    with pytest.raises(ValueError, match="cannot hold"):
        generator.layout("train", 0, 8)


def test_a_byte_level_bpe_tokenizer_keeps_the_spaces_between_sentences(sentences):
    """GPT-2-style tokenizers put a word's leading space into its token: sentences laid side
    by side must still read as separate words."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)  # as GPT-2 and OPT tokenize
    bpe.train_from_iterator(list(sentences[:800]) + get_task("memorize").all_texts(), vocab_size=600, min_frequency=1,
                            show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    generator = TaskGenerator(task=get_task("memorize"), noise_sentences=sentences, tokenizer=tokenizer,
                              segment_length=64)
    assert generator.space_prefix == " "
    layout, tokens = generator.example("train", 0, 3 * 64)
    text = tokenizer.decode(tokens)
    assert text.startswith(" " + layout.sample.facts[0] + " ")
    assert text.endswith(" " + layout.sample.question)
    assert "  " not in text and ".The" not in text
