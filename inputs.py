"""What a user passes to Magnet, checked: a bad argument is a clear error that names it, not a torch traceback
from deep inside a forward pass."""
import math
import numbers


def check_arguments(texts, counts, temperature=0.0, top_p=1.0, seed=0):
    """`texts` ({name: value}) must be str, `counts` ints > 0, the sampling settings numbers in range."""
    for name, value in texts.items():
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {value!r}")
    for name, value in counts.items():
        if type(value) is not int or value <= 0:
            raise (ValueError if type(value) is int else TypeError)(f"{name} must be an int > 0, got {value!r}")
    if any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in (temperature, top_p)) or \
            isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -2 ** 63 <= seed < 2 ** 64:
        raise TypeError(f"temperature and top_p must be numbers and seed an int in [-2^63, 2^64) (torch's range); "
                        f"got temperature={temperature!r}, top_p={top_p!r}, seed={seed!r}")
    if not (0 <= temperature < math.inf and 0 < top_p <= 1):  # also catches NaN
        raise ValueError(f"need a finite temperature >= 0 (0 = greedy) and 0 < top_p <= 1; got temperature="
                         f"{temperature}, top_p={top_p}")


def token_ids(ids, name, tok):
    """A list of token ids of the tokenizer `tok`, from a list or a 1-D tensor of them."""
    ids = ids.tolist() if hasattr(ids, "tolist") else ids  # a tensor or a numpy array
    if not isinstance(ids, (list, tuple)) or not all(
            isinstance(i, numbers.Integral) and not isinstance(i, bool) and 0 <= i < tok.vocab_size for i in ids):
        raise ValueError(f"{name} must be token ids in [0, {tok.vocab_size}) (a list, or a 1-D tensor), got "
                         f"{ids!r:.80}")
    return list(ids)


def check_length(model, n):
    """n positions fit the model (its max_seq_len: the longest row it was made for)."""
    if n > model.args.max_seq_len:
        raise ValueError(f"{n} positions requested but the model's max_seq_len is {model.args.max_seq_len}")
