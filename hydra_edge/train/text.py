"""The text task: next-token prediction on a user's text file with a byte-level BPE tokenizer.

The last 10% of the file is held out, cut at a line start where there is one. The tokenizer is trained on the other 90% only, so the held-out
perplexity does not profit from merges learned on the held-out text.
Training samples windows of seq_len + 1 tokens at random offsets; the
evaluation reads the held-out tokens in consecutive windows.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from ..errors import UsageError
from .tokenizer import check_vocab_fits, train_bpe_tokenizer

log = logging.getLogger(__name__)

HELD_OUT_FRACTION = 0.1


def read_text_file(path: str | Path) -> str:
    """Read a UTF-8 text file and return its contents. Raise UsageError if it is missing, empty or binary."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"data file {path} not found; pass an existing text file with --data")
    if not path.is_file():
        raise UsageError(f"data path {path} is not a file; pass a text file with --data")
    raw = path.read_bytes()
    if not raw.strip():
        raise UsageError(f"data file {path} is empty; pass a file with text in it")
    # NUL bytes decode as valid UTF-8 but only occur in binary files
    if b"\x00" in raw:
        raise UsageError(f"data file {path} is binary (it contains NUL bytes); pass a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"data file {path} is not UTF-8 text (invalid byte at offset {exc.start}); pass a UTF-8 text file"
        ) from None


def split_held_out(text: str) -> tuple[str, str]:
    """Split ``text`` into the first 90% and the held-out rest, at a line break where there is one."""
    cut = int(len(text) * (1 - HELD_OUT_FRACTION))
    # move the cut to the next line start, unless it already is one
    newline = text.find("\n", max(cut - 1, 0))
    if newline != -1 and newline + 1 < len(text):
        cut = newline + 1
    return text[:cut], text[cut:]


class TextTask:
    """Random training windows and the held-out loss of a tokenized text file."""

    def __init__(
        self, path: str | Path, vocab_size: int, seq_len: int, *, seed: int, tokenizer: Tokenizer | None = None
    ) -> None:
        """Read and encode ``path``, with a tokenizer trained on its first 90% unless ``tokenizer`` is given."""
        text = read_text_file(path)
        train_text, held_out_text = split_held_out(text)
        if tokenizer is None:
            tokenizer = train_bpe_tokenizer(train_text.splitlines(keepends=True), vocab_size)
        self.tokenizer = tokenizer
        check_vocab_fits(self.tokenizer, vocab_size)
        self.train_ids = self._encode(train_text)
        self.eval_ids = self._encode(held_out_text)
        log.info(
            "encoded %s: %d training tokens, %d held-out tokens", path, len(self.train_ids), len(self.eval_ids)
        )
        for name, ids in (("training", self.train_ids), ("held-out", self.eval_ids)):
            if len(ids) < seq_len + 1:
                raise UsageError(
                    f"the {name} part of {path} has {len(ids)} tokens, fewer than --seq-len + 1 = {seq_len + 1}; "
                    "use a longer file or a smaller --seq-len"
                )
        self.seq_len = seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def _encode(self, text: str) -> torch.Tensor:
        # line by line: concatenated, the ids still decode to the original text
        encodings = self.tokenizer.encode_batch(text.splitlines(keepends=True))
        return torch.tensor([i for e in encodings for i in e.ids], dtype=torch.long)

    def sample_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return inputs and labels (B, seq_len) from windows at random offsets of the training tokens."""
        starts = torch.randint(0, len(self.train_ids) - self.seq_len, (batch_size,), generator=self.generator)
        windows = torch.stack([self.train_ids[s:s + self.seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]

    def record_step(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, str]:
        """Return no progress-bar fields: the text task has no curriculum."""
        return {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, *, batches: int, batch_size: int) -> dict:
        """Measure the mean cross-entropy and perplexity on up to ``batches`` x ``batch_size`` held-out windows.

        Returns {"loss": nats per token, "perplexity": exp(loss), "tokens": tokens scored}.
        """
        n_windows = min((len(self.eval_ids) - 1) // self.seq_len, batches * batch_size)
        was_training = model.training
        model.eval()
        loss_sum, tokens = 0.0, 0
        for first in range(0, n_windows, batch_size):
            starts = range(first * self.seq_len, min(first + batch_size, n_windows) * self.seq_len, self.seq_len)
            windows = torch.stack([self.eval_ids[s:s + self.seq_len + 1] for s in starts])
            logits, _ = model(windows[:, :-1])
            loss_sum += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction="sum"
            ).item()
            tokens += windows[:, 1:].numel()
        model.train(was_training)
        loss = loss_sum / tokens
        return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}
