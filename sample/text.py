"""Prompt features at sampling time: the cache's own computation, run online.

Each encoder the model consumes is rebuilt from its cache record with the same
`PromptEncoder` class the embed job used, so a prompt is tokenised and encoded exactly as
a training caption was. The instruction prefix and the unconditional (empty-caption)
states are not recomputed: they come from the export, the very tensors training saw.
`CachedText` gives the same interface over captions the cache already holds (its held-out
rows), for the scores during training and `make eval`: no LLM is loaded.
"""

from __future__ import annotations

import warnings

import torch

from embed.encoder import encoder_from_record
from store.reader import CacheReader, TextFeatures, assemble_text


class PromptFeatureError(ValueError):
    """Prompt features were asked of a PromptFeatures built without its encoders."""


class PromptFeatures:
    """Prompts -> per-encoder TextFeatures (prefix + caption), in the model's encoder order."""

    def __init__(self, records: list[dict], prefix: dict[str, torch.Tensor],
                 null: dict[str, torch.Tensor], device: str = "cpu", load_encoders: bool = True):
        """`load_encoders=False` skips the LLMs: only `null` works then (the floor reference)."""
        self.names = [r["name"] for r in records]
        self.prefix = {n: prefix[n] for n in self.names}  # [P, D] each
        self.null_states = {n: null[n] for n in self.names}  # [n_null, D] each
        # Each refuses, before loading, weights that differ from those the cache was made with.
        self.encoders = [encoder_from_record(r, device) for r in records] if load_encoders else []

    def encode(self, prompts: list[str]) -> list[TextFeatures]:
        """One TextFeatures [B, P + max n_i, D] per encoder for the prompts."""
        if not self.encoders:
            raise PromptFeatureError("PromptFeatures was built without encoders; it can only give `null`")
        features = []
        for name, encoder in zip(self.names, self.encoders):
            encoded = encoder.encode(prompts)
            truncated = [p for p, e in zip(prompts, encoded) if e.truncated]
            if truncated:
                warnings.warn(f"encoder {name!r}: {len(truncated)} prompt(s) longer than "
                              f"max_tokens={encoder.config.max_tokens} were truncated, "
                              f"e.g. {truncated[0][:80]!r}", stacklevel=2)
            features.append(assemble_text(self.prefix[name], [e.states for e in encoded]))
        return features

    def null(self, batch: int) -> list[TextFeatures]:
        return null_text(self.prefix, self.null_states, self.names, batch)


class CachedText:
    """PromptFeatures' interface over the cache's own features of fixed rows: no LLM is loaded.

    For captions the cache already holds (its held-out rows), the states `make embed` wrote are
    the prompt encoder's output, so the training-time scores and `make eval` read them instead
    of running the LLM again; both then run where training runs, LLM packages or not."""

    def __init__(self, reader: CacheReader, row_of_caption: dict[str, int], names: list[str]):
        text = reader.take(list(row_of_caption.values()), with_latents=False)["text"]
        self.names, self.index = names, {c: i for i, c in enumerate(row_of_caption)}
        self.features = [text[n] for n in names]
        self.reader = reader

    def encode(self, captions: list[str]) -> list:
        """Per encoder, the captions' cached TextFeatures, padded to the longest of these captions."""
        index = torch.tensor([self.index[c] for c in captions])
        out = []
        for f in self.features:
            mask = f.mask[index]
            longest = int(mask.sum(dim=1).max())  # right-padded: the real tokens come first
            out.append(TextFeatures(f.states[index, :longest], mask[:, :longest], f.prefix_len))
        return out

    def null(self, batch: int) -> list[TextFeatures]:
        return null_text(self.reader.prefix, self.reader.null, self.names, batch)


def null_text(prefix: dict[str, torch.Tensor], null: dict[str, torch.Tensor], names: list[str],
              batch: int) -> list[TextFeatures]:
    """The unconditional text (prefix + empty-caption states) for `batch` rows, per encoder."""
    return [assemble_text(prefix[n], [null[n]] * batch) for n in names]


def _pad_to(features: TextFeatures, length: int) -> TextFeatures:
    """Right-pad to `length` tokens: zero states, mask False."""
    batch, current, dim = features.states.shape
    states = features.states.new_zeros(batch, length, dim)
    mask = features.mask.new_zeros(batch, length)
    states[:, :current] = features.states
    mask[:, :current] = features.mask
    return TextFeatures(states, mask, features.prefix_len)


def doubled_batch(cond: TextFeatures, uncond: TextFeatures) -> TextFeatures:
    """[cond; uncond] along the batch ([2B, L, D], L the longer of the two), as CFG wants."""
    if cond.prefix_len != uncond.prefix_len:
        raise ValueError(f"prefix lengths differ: {cond.prefix_len} vs {uncond.prefix_len}")
    length = max(cond.states.shape[1], uncond.states.shape[1])
    cond, uncond = _pad_to(cond, length), _pad_to(uncond, length)
    return TextFeatures(torch.cat([cond.states, uncond.states]), torch.cat([cond.mask, uncond.mask]),
                        cond.prefix_len)
