"""Texts: a CSV whose text column holds them (with a label column beside it), a .txt of one text per line to
predict, and the tokenizer that turns texts into the token ids a text model reads.

The tokenizer is Hugging Face `tokenizers`' word-level model, learnt from the training split only (never the
validation or test rows) and saved beside the weights as tokenizer.json; it downloads nothing. A text is
lower-cased (after NFKC), split into words and punctuation, cut after `max_tokens` tokens (tokens, not
characters) and padded with PAD_ID to that length; a word the vocabulary lacks is UNK_ID.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.trainers import WordLevelTrainer

from al.data.dataset import TEXT, DataError, Summary, check_label_values, counted_summary, parse_labels

TEXT_COLUMN = "text"  # the default name of a CSV's text column
LABEL_COLUMN = "label"
TOKENIZER_FILE = "tokenizer.json"
PAD, UNK = "[PAD]", "[UNK]"
PAD_ID, UNK_ID = 0, 1


def as_texts(texts: Iterable[str]) -> np.ndarray:
    """Texts as the object array (N,) that a Dataset holds (numpy's fixed-width strings would pad every text to
    the longest)."""
    texts = list(texts)
    array = np.empty(len(texts), dtype=object)
    array[:] = texts
    return array


class TextCsvFile:
    """A CSV with a text column (`text_column`) and a label column: `label`, else the last other column (a
    DataFile). Fields may be quoted and hold commas, quotes and line breaks; line numbers are the file's."""

    def __init__(self, path: Path, header: list[str], text_column: str):
        self.path, self.header, self.text_column = path, header, text_column
        self.text_index = header.index(text_column)

    def samples(self) -> tuple[np.ndarray, np.ndarray]:
        texts, labels = [], []
        for _, text, label in self._rows(with_labels=True):
            texts.append(text)
            labels.append(label)
        self._check_texts(any(text.strip() for text in texts))
        return as_texts(texts), check_label_values(parse_labels(np.array(labels)), self.path.name)

    def inputs(self) -> np.ndarray:
        return as_texts(text for _, text, _ in self._rows(with_labels=False))

    def summary(self, max_bytes: int, max_classes: int) -> Summary:
        """The texts are read a row at a time and not kept (`max_bytes` bounds decompression, which a CSV has not)."""
        rows, any_text, label_counts = 0, False, {}
        for _, text, label in self._rows(with_labels=True):
            rows, any_text = rows + 1, any_text or bool(text.strip())
            label_counts[label] = label_counts.get(label, 0) + 1
            if len(label_counts) > max_classes:
                break  # refused by counted_summary, before the rest is read
        self._check_texts(any_text or len(label_counts) > max_classes)
        return counted_summary(self.path.name, rows, (), label_counts, max_classes, TEXT)

    def _check_texts(self, any_text: bool) -> None:
        if not any_text:
            raise DataError(f"{self.path.name}: the text column {self.text_column!r} is empty (no row holds a text)")

    def _label_index(self) -> int:
        if LABEL_COLUMN in self.header and LABEL_COLUMN != self.text_column:
            return self.header.index(LABEL_COLUMN)
        others = [j for j in range(len(self.header)) if j != self.text_index]
        if not others:
            raise DataError(f"{self.path.name} needs a label column besides the text column {self.text_column!r}")
        return others[-1]

    def _rows(self, with_labels: bool) -> Iterator[tuple[int, str, str | None]]:
        """(line, text, label stripped of blanks or None) of each data row; an empty label is refused."""
        name, width = self.path.name, len(self.header)
        label_index = self._label_index() if with_labels else None
        any_rows = False
        try:
            with open(self.path, encoding="utf-8", newline="") as f:
                reader = csv.reader(f)
                next((row for row in reader if any(field.strip() for field in row)), None)  # the header
                for row in reader:
                    if not any(field.strip() for field in row):
                        continue  # a blank line
                    if len(row) != width:
                        raise DataError(f"{name} line {reader.line_num}: {len(row)} fields, the header has {width}")
                    label = None
                    if label_index is not None:
                        label = row[label_index].strip()
                        if not label:
                            raise DataError(f"{name} line {reader.line_num}: the label is empty")
                    any_rows = True
                    yield reader.line_num, row[self.text_index], label
        except UnicodeDecodeError:
            raise DataError(f"{name} is not UTF-8 text") from None
        except csv.Error as e:
            raise DataError(f"{name} line {reader.line_num}: not readable as CSV ({e})") from None
        if not any_rows:
            raise DataError(f"{name} needs a header row and at least one data row")


def read_lines(path: Path) -> np.ndarray:
    """The texts of a .txt file, one per line; blank lines are skipped."""
    try:
        texts = [line.rstrip("\r\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise DataError(f"{path.name} is not UTF-8 text") from None
    if not texts:
        raise DataError(f"{path.name} holds no text (one text per line)")
    return as_texts(texts)


def with_a_token(ids: torch.Tensor) -> torch.Tensor:
    """Token ids (N, max_tokens) as the tokenizer makes them, with UNK_ID first in a text that has no token (an
    empty or blank one): every text has a token to read. Also part of an exported graph (al/export.py)."""
    first = ids[:, :1]
    return torch.cat([torch.where(first == PAD_ID, UNK_ID, first), ids[:, 1:]], dim=1)


class TextEncoding:
    """Texts -> token ids of shape (N, max_tokens), with the tokenizer of a model (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def fit(cls, texts: Iterable[str], vocab_size: int, max_tokens: int) -> TextEncoding:
        """A vocabulary of the `vocab_size` most frequent tokens of `texts` (ties: in alphabetical order), PAD and
        UNK included."""
        tokenizer = Tokenizer(WordLevel(unk_token=UNK))
        tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = WordLevelTrainer(vocab_size=vocab_size, special_tokens=[PAD, UNK], show_progress=False)
        tokenizer.train_from_iterator(texts, trainer)
        tokenizer.enable_truncation(max_tokens)
        tokenizer.enable_padding(pad_id=PAD_ID, pad_token=PAD, length=max_tokens)
        return cls(tokenizer)

    @classmethod
    def load(cls, path: Path) -> TextEncoding:
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception for a missing or malformed file
            raise ValueError(f"{path.name} is not a readable tokenizer ({e})") from None

    @property
    def max_tokens(self) -> int:
        return self.tokenizer.truncation["max_length"]

    @property
    def vocabulary(self) -> int:
        return self.tokenizer.get_vocab_size()

    def apply(self, texts: Iterable[str]) -> torch.Tensor:
        """Token ids (N, max_tokens), padding after the tokens; a text without a token reads as one UNK."""
        encoded = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encoded], dtype=torch.long).reshape(len(encoded), self.max_tokens)
        return with_a_token(ids)

    def files(self) -> dict[str, str]:
        """What a model directory holds of it: name -> text."""
        return {TOKENIZER_FILE: self.tokenizer.to_str()}
