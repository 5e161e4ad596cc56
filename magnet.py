"""Magnet: one decoder-only LLM that encodes, infills and generates (Khosla et al., 2025).

    m = Magnet.load("stories260K.bin", "tok512.model")           # a base model (+ adapter=... after training)
    m.generate("Once upon a time", 40)                           # left to right, all-SPAN attention, KV cache
    m.infill("Mia found a", " under the tree. The kite was red.", 1)   # fill a gap from BOTH sides
    m.infill("Mia found a", " under the tree. The story book was red.")  # ... whose length the model chooses
    m.encode(["a sentence", "another"])                          # sentence vectors, all-CONTEXT attention
    m.token_features("a sentence")                               # per-token vectors

Inference only: the training losses of a batch are objectives.magnet_losses.
"""
import torch
from tqdm import tqdm

from attention import CONTEXT, PAD, SPAN
from checkpoint import load_adapter, load_checkpoint, read_encoder_settings
from data import IGNORE, Tokenizer, pad_rows, sscl_views, text_start
from inputs import check_arguments, check_length, token_ids
from model import KVCache
from objectives import pool


MAX_UNKNOWN_GAP = 64  # longest gap infill_ids chooses the length of


class Magnet:
    def __init__(self, model, tokenizer: Tokenizer, pooling="last", instruction="", attention="bidirectional"):
        if model.args.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"{tokenizer.path}: {tokenizer.vocab_size} tokens, but the model has "
                             f"{model.args.vocab_size}; the tokenizer must be the model's own")
        if attention not in ("bidirectional", "causal"):
            raise ValueError(f"attention={attention!r}: expected 'bidirectional' or 'causal'")
        self.model, self.tok = model, tokenizer
        self.pooling, self.instruction = pooling, instruction  # how the model was trained to encode
        self.text_start = text_start(tokenizer, instruction)  # where mean pooling starts in an encode row
        self.attention = attention  # how encode / token_features read text; "causal" suits a plain causal LM

    @classmethod
    def load(cls, checkpoint, tokenizer, adapter=None, device="cpu", dtype=None, **options):
        """A base checkpoint (Meta directory or llama2.c .bin), its tokenizer, optionally a LoRA adapter file.
        The settings the model was trained with (instruction, pooling), stored with the adapter or in a merged
        export's magnet.json, are used unless `options` say otherwise."""
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r}, but this torch sees no CUDA GPU")
        tok = Tokenizer(tokenizer)
        model = load_checkpoint(checkpoint, device=device, dtype=dtype, vocab_size=tok.vocab_size)
        if adapter is not None:
            load_adapter(model, adapter)
        return cls(model.eval(), tok, **{**read_encoder_settings(checkpoint, adapter), **options})

    @property
    def device(self):
        return self.model.tok_embeddings.weight.device

    # ------------------------------------------------------------------------------------------------ inference

    def _sample(self, logits, temperature, top_p, gen):
        """Next token from (V,) logits: greedy at temperature 0, else nucleus sampling."""
        if temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p * keep
        return int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)])

    @torch.inference_mode()  # no_grad, minus autograd's bookkeeping on every tensor (faster decode steps)
    def generate(self, prompt, max_new_tokens=64, temperature=0.0, top_p=1.0, seed=0, use_cache=True):
        """Continue `prompt` left to right (all-SPAN = the ordinary causal LM); stops at EOS. Returns the new text.
        The prompt starts with BOS only where the tokenizer adds one (Llama-2 does, SmolLM2 does not)."""
        check_arguments(dict(prompt=prompt), dict(max_new_tokens=max_new_tokens), temperature, top_p, seed)
        ids = self.tok.encode(prompt, bos=self.tok.add_bos) or [self.tok.bos_id]  # the tokenizer's own convention
        check_length(self.model, len(ids) + max_new_tokens)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        x = torch.tensor([ids], device=self.device)
        cache = KVCache(self.model.args, 1, len(ids) + max_new_tokens, self.device, self.model.output.weight.dtype)
        logits = self.model(x, cache=cache if use_cache else None)[0, -1]
        new = []
        for _ in range(max_new_tokens):
            nxt = self._sample(logits, temperature, top_p, gen)
            if nxt == self.tok.eos_id:
                break
            new.append(nxt)
            if use_cache:
                logits = self.model(torch.tensor([[nxt]], device=self.device), start_pos=len(ids) + len(new) - 1,
                                    cache=cache)[0, -1]
            else:  # recompute the whole sequence: the reference the cache must equal
                logits = self.model(torch.tensor([ids + new], device=self.device))[0, -1]
        return self.tok.decode(new)

    def infill(self, left, right, n_tokens=None, max_tokens=8, temperature=0.0, top_p=1.0, seed=0, use_cache=True,
               length_score="sum"):
        """Fill the gap between `left` and `right`, reading both (docs/design.md §5). Returns the gap's text.
        n_tokens: the gap's length in tokens; None when it is unknown: the model chooses it, 1..max_tokens (infill_ids).
        Both sides are tokenized as they are in the whole text (Tokenizer.context_ids): a space at an edge of the
        gap belongs to the word after it, so no stray piece shifts the right context."""
        check_arguments(dict(left=left, right=right), {})
        if not left.strip() and not right.strip():
            raise ValueError("infill needs some context: left and right are both empty")
        return self.tok.decode(self.infill_ids(*self.tok.context_ids(left, right), n_tokens, max_tokens,
                                               temperature=temperature, top_p=top_p, seed=seed, use_cache=use_cache,
                                               length_score=length_score))

    @torch.inference_mode()  # returns token ids, never tensors, so nothing leaks out of inference mode
    def infill_ids(self, left_ids, right_ids, n_tokens=None, max_tokens=8, temperature=0.0, top_p=1.0, seed=0,
                   use_cache=True, length_score="sum"):
        """The gap's token ids between left_ids (BOS + left) and right_ids.

        Known length (n_tokens): CONTEXT = left + right at positions 0..L-1 and L+n..; the gap is SPAN at L..L+n-1.
        The context is encoded once (it never attends to the span, so its K/V are final); then each span token is
        decoded from the output before it, which sees all context and the span so far.
        Unknown length (n_tokens=None): PROPOSE with the hybrid mask, CHOOSE with the causal LM. Every length
        n = 1..max_tokens is one row of a batch: its right context sits at its own positions L+n.., so each row is
        decoded knowing how much room it has. The proposals are then read left to right (all SPAN, the causal LM
        MAGNET keeps), and the gap that makes left + gap + right most likely wins: argmax log p(gap, right | left)
        (length_score="sum"), or per scored token (length_score="mean": a longer gap is not charged for its length).
        """
        if length_score not in ("sum", "mean"):
            raise ValueError(f"length_score={length_score!r}: expected 'sum' or 'mean'")
        counts = dict(n_tokens=n_tokens) if n_tokens is not None else dict(max_tokens=max_tokens)
        check_arguments({}, counts, temperature, top_p, seed)
        left_ids, right_ids = token_ids(left_ids, "left_ids", self.tok), token_ids(right_ids, "right_ids", self.tok)
        if not left_ids:
            raise ValueError("infill needs at least one left token (BOS) to predict the gap's first token from")
        check_length(self.model, len(left_ids) + (n_tokens or max_tokens) + len(right_ids))
        if n_tokens is None and max_tokens > MAX_UNKNOWN_GAP:  # one cached row per candidate length, decoded at once
            raise ValueError(f"max_tokens={max_tokens}: a gap of unknown length is at most {MAX_UNKNOWN_GAP} tokens "
                             "(each candidate length is a row with its own KV cache); give n_tokens for a longer one")
        lengths = [n_tokens] if n_tokens is not None else list(range(1, max_tokens + 1))
        gen = torch.Generator(device=self.device).manual_seed(seed)
        decode = self._decode_gaps if use_cache else self._decode_gaps_recomputed
        gaps = decode(left_ids, right_ids, lengths, temperature, top_p, gen)
        if len(gaps) == 1:
            return gaps[0]
        scores = self.causal_logprob(left_ids, [gap + right_ids for gap in gaps])
        if length_score == "mean":
            scores = scores / torch.tensor([len(gap) + len(right_ids) for gap in gaps])
        return gaps[int(scores.argmax())]  # ties go to the shorter gap

    def _decode_gaps(self, left_ids, right_ids, lengths, temperature, top_p, gen):
        """One gap per length in `lengths`, decoded together with a KV cache (batch row k has a gap of lengths[k])."""
        dev, (L, R, K, n_max) = self.device, (len(left_ids), len(right_ids), len(lengths), max(lengths))
        cache = KVCache(self.model.args, K, L + R + n_max, dev, self.model.output.weight.dtype)
        pos = torch.stack([torch.cat([torch.arange(L), torch.arange(L + n, L + n + R)]) for n in lengths]).to(dev)
        tokens = torch.tensor([left_ids + right_ids], device=dev).expand(K, -1)  # (K, L+R): one context, own positions
        logits = self.model(tokens, torch.full_like(tokens, CONTEXT), positions=pos, cache=cache)[:, L - 1]  # (K, V)
        gaps = [[] for _ in lengths]
        for i in range(n_max):
            for k, n in enumerate(lengths):
                if i < n:
                    gaps[k].append(self._sample(logits[k], temperature, top_p, gen))
            if i == n_max - 1:
                break
            # the next step: row k feeds its new span token at L+i, or a PAD once its gap is full
            step = torch.tensor([[g[i] if i < n else self.tok.pad_id] for g, n in zip(gaps, lengths)], device=dev)
            roles = torch.tensor([[SPAN if i < n else PAD] for n in lengths], device=dev)
            logits = self.model(step, roles, positions=torch.full((K, 1), L + i, device=dev), cache=cache)[:, 0]
        return gaps

    def _decode_gaps_recomputed(self, left_ids, right_ids, lengths, temperature, top_p, gen):
        """The reference _decode_gaps must equal: each step recomputes each gap's whole row, not-yet-decoded span
        tokens as placeholders (same order of samples, so even sampled gaps match)."""
        gaps = [[] for _ in lengths]
        for i in range(max(lengths)):
            for gap, n in zip(gaps, lengths):
                if i < n:
                    row = left_ids + gap + [self.tok.unk_id] * (n - i) + right_ids
                    roles = [CONTEXT] * len(left_ids) + [SPAN] * n + [CONTEXT] * len(right_ids)
                    logits = self.model(torch.tensor([row], device=self.device),
                                        torch.tensor([roles], device=self.device))[0, len(left_ids) - 1 + i]
                    gap.append(self._sample(logits, temperature, top_p, gen))
        return gaps

    @torch.no_grad()
    def causal_logprob(self, prefix_ids, continuations):
        """log p(continuation | prefix) read left to right (all SPAN: the plain causal LM), one per continuation:
        a (K,) float tensor."""
        prefix_ids = token_ids(prefix_ids, "prefix_ids", self.tok)
        continuations = [token_ids(c, "each continuation", self.tok) for c in continuations]
        if not prefix_ids or not continuations:
            raise ValueError("causal_logprob needs a prefix of at least one token (BOS) and at least one continuation")
        rows = [prefix_ids + c for c in continuations]
        tokens = pad_rows(rows, self.tok.pad_id).to(self.device)  # (K, T)
        roles = pad_rows([[SPAN] * len(r) for r in rows], PAD).to(self.device)
        targets = torch.full_like(tokens, IGNORE)  # (K, T): the outputs that predict a continuation token
        for k, r in enumerate(rows):
            targets[k, len(prefix_ids) - 1:len(r) - 1] = tokens[k, len(prefix_ids):len(r)]  # the token after each
        nll = self.model(tokens, roles, targets=targets)  # (N,)
        row = torch.arange(len(rows), device=self.device)[:, None].expand_as(tokens)[targets != IGNORE]  # (N,)
        return -torch.zeros(len(rows), device=self.device).index_add_(0, row, nll.float()).cpu()

    def _encoder_roles(self, roles):
        """MAGNET encodes with all-CONTEXT (bidirectional) attention. attention="causal" reads text as a plain
        left-to-right LM was trained to (a baseline): every non-PAD token a SPAN, so each sees only its left."""
        return roles if self.attention == "bidirectional" else torch.where(roles == PAD, PAD, SPAN)

    @torch.no_grad()
    def encode(self, texts, pooling=None, batch_size=32):
        """Sentence vectors (N, dim) with all-CONTEXT (bidirectional) attention (all-SPAN with attention="causal");
        EOS appended, last-token pooling by default (or "mean")."""
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError("encode expects a non-empty list of non-empty strings")
        check_arguments({}, dict(batch_size=batch_size))
        out = []
        for i in tqdm(range(0, len(texts), batch_size), desc="encode", leave=False, disable=len(texts) <= batch_size):
            ids = [self.tok.encode(t) for t in texts[i:i + batch_size]]
            check_length(self.model, max(len(t) for t in ids) + 2 + len(self.tok.encode(self.instruction)))
            tokens, roles, last = (x.to(self.device) for x in sscl_views(ids, self.tok, 10 ** 9, self.instruction))
            roles = self._encoder_roles(roles)
            hidden = self.model(tokens, roles, compute_logits=False)  # (b, T, dim)
            out.append(pool(hidden, roles, last, pooling or self.pooling, self.text_start).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def token_features(self, text, batch_size=32):
        """Per-token vectors, all-CONTEXT attention. As in MNTP, the output at t-1 represents token t, so piece t's
        vector is hidden[t-1] (BOS's output represents the first piece); with attention="causal" it is piece t's own
        output hidden[t] (at t-1 a left-to-right model has not seen t). Returns (pieces, Tensor[T, dim]); for a list
        of texts, one such pair per text (computed batch_size texts at a time)."""
        texts = text if isinstance(text, list) else [text]
        for t in texts:
            check_arguments(dict(text=t), {})
        if not texts or not all(t.strip() for t in texts):
            raise ValueError("token_features needs non-empty texts")
        check_arguments({}, dict(batch_size=batch_size))
        out, shift = [], int(self.attention == "causal")
        for i in range(0, len(texts), batch_size):
            ids = [self.tok.encode(t, bos=True) for t in texts[i:i + batch_size]]
            check_length(self.model, max(map(len, ids)))
            tokens = pad_rows(ids, self.tok.pad_id).to(self.device)  # (b, T+1)
            roles = self._encoder_roles(pad_rows([[CONTEXT] * len(r) for r in ids], PAD).to(self.device))
            hidden = self.model(tokens, roles, compute_logits=False).float().cpu()  # (b, T+1, dim)
            out += [([self.tok.id_to_piece(j) for j in r[1:]], h[shift:len(r) - 1 + shift]) for r, h in zip(ids, hidden)]
        return out if isinstance(text, list) else out[0]
