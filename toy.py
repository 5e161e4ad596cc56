"""The toy world: simple English stories with known answers, generated from a seed (no download), and the demo
that `python train.py` ends with.

Every story opens with "<name> found a <object> <place>." The object is drawn independently of everything before it
and is named again only in the NEXT sentence, so a blank over it is determined by the right context alone: a causal
model is at chance (1/8), a model that reads both sides is not. Objects are named by 1 to 4 words ("kite", "story
book", "little paper boat", ...), so the blank's LENGTH is also known only from the right: the test of infilling
without being told the gap's size. Sentences built from a frame (name, verb, object, place) have several surface
forms, giving paraphrases and pairs of graded similarity. Each word carries a part-of-speech tag (lexicon below;
"word/TAG" in a template overrides it, e.g. "light" is a NOUN in "a warm light" and an ADJ in "the drum was light").
"""
import io
import random
import re
from pathlib import Path

import sentencepiece as spm
import torch

from checkpoint import tokenizer_beside
from data import Tokenizer
from magnet import Magnet

EVAL_SEED = 1_000_000  # toy-world evaluation data comes from seeds >= this; training data from the run's seed
NAMES = ["Mia", "Tom", "Sam", "Lily", "Ben", "Anna", "Max", "Zoe"]
OBJECTS = {"kite": "it flew high in the wind", "ball": "it bounced on the grass",
           "story book": "it had many pages", "birthday cake": "it tasted very sweet",
           "little paper boat": "it floated on the pond", "big toy drum": "it made a loud sound",
           "shiny old oil lamp": "it gave a warm light", "funny straw sun hat": "it kept the sun away"}
PLACES = ["under the tree", "in the garden", "near the river", "in a box", "behind the house", "on the hill"]
ADJECTIVES = ["red", "blue", "green", "yellow", "big", "small", "old", "light/ADJ"]
VERBS = [("found", "discovered"), ("spotted", "noticed"), ("lost", "misplaced"), ("bought", "purchased")]
LEXICON = {tag: words.split() for tag, words in {
    "NOUN": "kite ball story book birthday cake paper boat toy drum oil lamp straw hat tree garden river box house "
            "hill wind grass pages pond sound light sun day morning",
    "VERB": "found discovered spotted noticed lost misplaced bought purchased was flew bounced had tasted floated "
            "made gave kept wanted play played went were",
    "ADJ": "red blue green yellow big small old many sweet loud warm happy good little shiny funny",
    "DET": "a the A The",
    "ADP": "under Under in In near Near behind Behind on On by with to",
    "PRON": "it It They",
    "PUNCT": ". ,",
    "NAME": " ".join(NAMES)}.items()}
WORD_TAG = {w: tag for tag, words in LEXICON.items() for w in words}  # anything else: OTHER (very, high, and, ...)


def tag_words(sentence):
    """(words, tags) of a marked-up toy sentence."""
    words, tags = [], []
    for w in re.findall(r"[\w/]+|[.,]", sentence):
        word, _, tag = w.partition("/")
        words.append(word)
        tags.append(tag or WORD_TAG.get(word, "OTHER"))
    return words, tags


def strip_tags(text):
    return re.sub(r"/[A-Z]+", "", text)


def frame_sentence(frame, rng, avoid=None):
    """One surface form of a (name, verb, object, place) frame: 3 word orders x 2 synonyms of the verb."""
    name, verb, obj, place = frame
    forms = [(f"{name} {v} a {obj} {place}.", f"{place[0].upper() + place[1:]}, {name} {v} a {obj}.",
              f"A {obj} was {v} by {name} {place}.")[k] for k in range(3) for v in VERBS[verb]]
    return rng.choice([f for f in forms if f != avoid])


def random_frame(rng):
    return rng.choice(NAMES), rng.randrange(len(VERBS)), rng.choice(list(OBJECTS)), rng.choice(PLACES)


def is_eval_frame(frame):
    """Object/place combinations reserved for evaluation pairs (never used as SSCL training pairs)."""
    return (list(OBJECTS).index(frame[2]) + PLACES.index(frame[3])) % 4 == 0


def story(rng):
    """A story as marked-up sentences; the first names an object that only the second sentence identifies."""
    name, friend = rng.sample(NAMES, 2)
    obj, place, adj = rng.choice(list(OBJECTS)), rng.choice(PLACES), rng.choice(ADJECTIVES)
    opening = rng.choice(["", "One day, ", "In the morning, "])
    return [f"{opening}{name} found a {obj} {place}.",
            f"The {obj} was {adj} and {OBJECTS[obj]}.",
            rng.choice([f"{name} gave the {obj} to {friend}.", f"{friend} wanted to/OTHER play with the {obj}.",
                        f"{name} and {friend} played with the {obj} all day."]),
            frame_sentence(random_frame(rng), rng),
            rng.choice(["They were very happy.", f"Then {name} went home.", "It was a good day."])]


def stories(n, seed):
    rng = random.Random(seed)
    return [strip_tags(" ".join(story(rng))) for _ in range(n)]


def blanks(n, seed):
    """(left, answer, right) triples: the answer is the object (1-4 words) that only the right context names."""
    out = []
    for text in stories(n, seed):
        found = re.search(" found a (" + "|".join(OBJECTS) + ") ", text)  # the first sentence's object
        out.append((text[:found.start(1) - 1], found.group(1), text[found.end(1):]))
    return out


def sts_pairs(n, seed, split):
    """STS-style (a, b, score) pairs: b changes d of the 4 frame slots, score = 5 (4 - d) / 4; d = 0 is a
    paraphrase. split="test" uses only held-out frames, split="train" only the others."""
    rng, out = random.Random(seed), []
    slot_values = [NAMES, range(len(VERBS)), list(OBJECTS), PLACES]
    while len(out) < n:
        a = random_frame(rng)
        if is_eval_frame(a) != (split == "test"):
            continue
        d, b = rng.randint(0, 4), list(a)
        for slot in rng.sample(range(4), d):
            b[slot] = rng.choice([v for v in slot_values[slot] if v != a[slot]])
        first = frame_sentence(a, rng)
        out.append((strip_tags(first), strip_tags(frame_sentence(tuple(b), rng, avoid=first)), 5 * (4 - d) / 4))
    return out


def multiple_choice(n, seed):
    """{"context", "choices", "label"} items: which property does the object named in the context have?"""
    rng, items = random.Random(seed), []
    for _ in range(n):
        name, obj, place = rng.choice(NAMES), rng.choice(list(OBJECTS)), rng.choice(PLACES)
        context = f"{name} found a {obj} {place}. The {obj} was {strip_tags(rng.choice(ADJECTIVES))} and"
        choices = [f" {fact}." for fact in rng.sample(list(OBJECTS.values()), 4)]
        if f" {OBJECTS[obj]}." not in choices:
            choices[rng.randrange(4)] = f" {OBJECTS[obj]}."
        items.append(dict(context=context, choices=choices, label=choices.index(f" {OBJECTS[obj]}.")))
    return items


def tagged_sentences(n, seed):
    """Tagged sentences in eval_data.read_conll's layout (key "pos" holds the toy tags)."""
    rng = random.Random(seed)
    sentences = [s for _ in range(n) for s in story(rng)][:n]
    return [dict(zip(("words", "pos"), tag_words(s))) for s in sentences]


def write_world(directory, n_stories=4000, n_pairs=4000, seed=0, vocab_size=256):
    """Write the toy corpus (stories.txt), SSCL paraphrase pairs (pairs.tsv) and a tokenizer (tok.model).
    Returns (corpus path, pairs path, Tokenizer). Deterministic for a seed."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    texts = stories(n_stories, seed)
    (d / "stories.txt").write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    pairs = [(a, b) for a, b, score in sts_pairs(4 * n_pairs, seed, "train") if score == 5][:n_pairs]
    (d / "pairs.tsv").write_text("".join(f"{a}\t{b}\n" for a, b in pairs), encoding="utf-8")
    return d / "stories.txt", d / "pairs.tsv", train_tokenizer(texts, d / "tok.model", vocab_size)


def train_tokenizer(texts, path, vocab_size):
    """Train a small BPE SentencePiece model (unk=0, bos=1, eos=2, as Llama's) on `texts`; writes `path`."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=out, vocab_size=vocab_size,
                                   model_type="bpe", character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(out.getvalue())
    return Tokenizer(path)


def demo(merged, base=None, adapter=None, seed=0):
    """Show the two things MAGNET adds, on held-out toy-world data: the merged export, or (exact at any dtype) the
    base + adapter."""
    tok = tokenizer_beside(merged)
    m = Magnet.load(base, tok, adapter=adapter) if adapter else Magnet.load(merged, tok)
    (left, answer, right), (left2, answer2, right2) = blanks(2, EVAL_SEED + seed)
    fill = m.infill(left, right, len(m.tok.encode(answer)))
    print(f"\ninfill (only the right context names the object; answer: {answer}):\n  {left} [{fill}]{right}")
    print(f"infill, not told the length (answer: {answer2}, {len(m.tok.encode(answer2))} tokens):\n"
          f"  {left2} [{m.infill(left2, right2)}]{right2}")
    pairs = sts_pairs(40, EVAL_SEED + seed, "test")
    query, positive = next((a, b) for a, b, s in pairs if s == 5.0)
    candidates = [positive] + [b for _, b, s in pairs if s == 0.0][:4]
    vectors = torch.nn.functional.normalize(m.encode([query] + candidates), dim=-1)
    scores = (vectors[1:] @ vectors[0]).tolist()
    print(f"cosine similarity to {query!r} (its paraphrase: {positive!r}):")
    for s, c in sorted(zip(scores, candidates), reverse=True):
        print(f"  {s:+.3f}  {c}")
