"""Tokens a run adds to the vocabulary (``model.add_tokens``, ``model.add_special_tokens``) and how their rows start.

The tokenizer gets them in the data stage (:func:`add_configured_tokens`, called by
:func:`sft.engine.data.build_datasets`, so ``sft preview`` and ``sft validate`` tokenize as
training does); the run resizes the embeddings for them as it does for a template's
end-of-turn token, and the backend trains their rows (PEFT's ``trainable_token_indices``, or
whole modules where the backend has only ``modules_to_save``). The saved tokenizer carries
them, so the merged model and the GGUF do too.

Their rows start (:func:`initialise_new_rows`) as ``model.new_token_init`` says:

- ``mean``: the mean of the existing rows, which transformers' resize gives (sampled around it);
  rows that already existed (a vocabulary padded to a multiple of 64) are set to it too;
- ``description``: the mean of the rows of the tokens of ``model.new_token_descriptions[token]``
  (LLaMA-Factory's ``desc_init``), for the input embedding and an untied output head alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sft.core.notices import notice

if TYPE_CHECKING:
    from omegaconf import DictConfig

__all__ = ["configured_tokens", "add_configured_tokens", "initialise_new_rows"]


def configured_tokens(cfg: "DictConfig") -> list[tuple[str, bool]]:
    """``(token, special)`` for every token the config adds, in order."""
    return ([(str(t), False) for t in cfg.model.add_tokens]
            + [(str(t), True) for t in cfg.model.add_special_tokens])


def add_configured_tokens(tokenizer: Any, cfg: "DictConfig") -> int:
    """Add the config's tokens to ``tokenizer`` (idempotent); return how many were new.

    Neither kind is normalized, so the token matches the text exactly; a token the vocabulary
    already holds as one token is left as it is, with a notice (its row is the model's own).
    """
    from tokenizers import AddedToken

    added = 0
    for token, special in configured_tokens(cfg):
        if token in tokenizer.get_added_vocab():  # added already: by an earlier call, or the model's own
            continue
        if len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1:
            notice(f"model.add_tokens: {token!r} is already one token of the vocabulary; not added")
            continue
        added += tokenizer.add_tokens([AddedToken(token, special=special, normalized=False)], special_tokens=special)
    return added


def initialise_new_rows(model: Any, tokenizer: Any, cfg: "DictConfig", base_vocabulary: int, loaded_rows: int) -> None:
    """Give the config's added tokens their starting rows (module docstring), before LoRA is attached.

    ``base_vocabulary``: the tokens of the base tokenizer; ``loaded_rows``: the embedding's rows
    as loaded, before any resize (more than the vocabulary where it is padded)."""
    import torch

    tokens = [token for token, _ in configured_tokens(cfg)]
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in tokens}
    ids = {token: i for token, i in ids.items() if isinstance(i, int) and i >= base_vocabulary}
    if not ids:
        return
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    matrices = [inp.weight] + ([out.weight] if out is not None and out.weight is not inp.weight else [])
    described = {str(k): str(v) for k, v in cfg.model.new_token_descriptions.items()}
    with torch.no_grad():
        for weight in matrices:
            mean = weight[:base_vocabulary].float().mean(dim=0)
            for token, row in ids.items():
                if cfg.model.new_token_init == "description":
                    source = [i for i in tokenizer(described[token], add_special_tokens=False)["input_ids"]
                              if i < base_vocabulary]
                    weight[row] = weight[source].float().mean(dim=0).to(weight.dtype) if source else mean.to(weight.dtype)
                elif row < loaded_rows:  # a padding row the resize did not touch
                    weight[row] = mean.to(weight.dtype)
    how = "the mean of their descriptions' embeddings" if cfg.model.new_token_init == "description" else "the mean embedding"
    notice(f"model.add_tokens: added {', '.join(map(repr, ids))} (rows {min(ids.values())}-{max(ids.values())}), "
           f"starting as {how}; their rows train")
